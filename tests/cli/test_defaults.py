"""The CLI takes its defaults from the models that own them, and `--help` shows them."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vpr.cli import data_cmd, index_cmd, model_cmd, train_cmd
from vpr.cli.common import OwnerDefaults, _shown
from vpr.cli.main import build_parser, main
from vpr.model.config import ModelConfig
from vpr.train.distill import DistillConfig
from vpr.train.mining import TripletConfig

DISTILL_ARGS = ["train", "distill", "--teacher", "t@1", "--quality", "orig,h90", "--register", "s", "--images", "imgs"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def subparser(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def help_text(*names: str) -> str:
    # argparse wraps lines anywhere, hyphenated words (within-noise) at their hyphen
    return re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(subparser(*names).format_help().split()))


def test_distill_without_flags_is_distill_config_defaults():
    cfg = train_cmd.distill_config(parse(DISTILL_ARGS))
    assert cfg == DistillConfig(teacher="t@1", name="s", qualities=["orig", "h90"], images=Path("imgs"))


def test_distill_flags_set_only_their_fields():
    args = parse([*DISTILL_ARGS, "--lr", "0.01", "--margin", "0.3", "--grad-clip", "0", "--no-progress"])
    cfg = train_cmd.distill_config(args)
    assert (cfg.lr, cfg.grad_clip, cfg.progress) == (0.01, None, False)
    assert cfg.triplet == TripletConfig(margin=0.3)
    assert cfg.epochs == DistillConfig.model_fields["epochs"].default


def test_distill_help_shows_the_models_defaults():
    text = help_text("train", "distill")
    shown = 0
    for dest, field in train_cmd.DISTILL.fields.items():
        value = train_cmd.DISTILL.default(field)
        if value is None or isinstance(value, bool):
            continue
        assert f"default {_shown(value)}" in text, (dest, value)
        shown += 1
    assert shown >= 15  # epochs, lr, schedule, the triplet margins, ...
    assert "(default 0.0002)" in text and "one of constant, cosine, step; default cosine" in text


def test_model_init_without_flags_is_model_config_defaults():
    base = ["model", "init", "--name", "t", "--weights", "none", "--cluster-images", "imgs"]
    assert model_cmd.ARCHITECTURE.given(parse(base)) == {} and model_cmd.INIT.given(parse(base)) == {}
    args = parse([*base, "--backbone", "resnet18", "--cut", "layer4", "--clusters", "16", "--policy", "native"])
    config = ModelConfig.model_validate(model_cmd.ARCHITECTURE.given(args))
    assert config == ModelConfig.model_validate(
        {
            "backbone": {"name": "resnet18", "cut": "layer4"},
            "netvlad": {"clusters": 16},
            "preprocess": {"small_policy": "native"},
        }
    )
    text = help_text("model", "init")
    assert "NetVLAD clusters (K) (default 64)" in text and "one of database, native, upsample; default database" in text
    assert "(default 50000)" in text  # init_teacher's own default


def test_other_commands_leave_defaults_to_their_owners():
    cases: list[tuple[OwnerDefaults, list[str]]] = [
        (data_cmd.EVAL, ["eval", "--dataset", "folder:x", "--db-model", "a", "--query-model", "a", "--quality", "o"]),
        (data_cmd.ROUTE, ["dataset", "synth", "out"]),
        (data_cmd.VIDEO, ["dataset", "from-video", "v.mp4", "g.csv", "out"]),
        (index_cmd.BUILD, ["index", "build", "--model", "m", "--name", "n", "--images", "i"]),
        (index_cmd.SETTINGS, ["index", "build", "--model", "m", "--name", "n", "--images", "i"]),
        (index_cmd.SEARCH, ["index", "search", "n", "q.jpg"]),
    ]
    for owner, argv in cases:
        assert owner.given(parse(argv)) == {}, argv
    assert "recall cut-offs (default 1,5,10,20)" in help_text("eval")
    assert "WIDTHxHEIGHT of the views (default 160x120)" in help_text("dataset", "synth")
    assert "of the query pass (one of day, dusk, night; default dusk)" in help_text("dataset", "synth")
    assert "(default Flat)" in help_text("index", "build")
    assert "matches per query image (default 5)" in help_text("index", "search")


def test_index_settings_come_from_the_environment_unless_a_flag_says(monkeypatch):
    monkeypatch.setenv("VPR_INDEX_BACKEND", "milvus")
    build = ["index", "build", "--model", "m", "--name", "n", "--images", "i"]
    assert index_cmd._settings(parse(build)).backend == "milvus"
    assert index_cmd._settings(parse([*build, "--backend", "faiss"])).backend == "faiss"


def test_every_help_page_renders():
    """Renders every owner's defaults: a misspelt owner or field fails here."""
    for parser in all_parsers(build_parser()):
        assert parser.format_help()
    assert not re.search(r"\(default None\)|default: None", build_parser().format_help())


def test_a_refused_value_is_one_line(capsys):
    assert main([*DISTILL_ARGS, "--schedule", "sometimes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vpr train: error: schedule: Input should be 'constant', 'cosine' or 'step'")
    assert "\n" not in err


@pytest.mark.parametrize("argv", [["--help"], ["query", "--help"], ["dataset", "synth", "--help"]])
def test_starting_vpr_does_not_load_torch(argv):
    """Owners' defaults are looked up when help is shown, so only the owner's module loads."""
    code = (
        "import sys, contextlib, io\n"
        "from vpr.cli.main import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({argv!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
