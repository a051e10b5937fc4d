"""THE dataset spec (data/spec.py): `KIND:PATH` + `KEY=VALUE` options, parsed once for the
command line, the distillation config and the admin rebuild request."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from vpr.cli.main import main
from vpr.data.names import dvgl_name
from vpr.data.spec import DatasetSpec, parse_options


def test_parse_kind_path_and_options():
    spec = DatasetSpec.parse("folder:/data/gardens", {"radius": "10"})
    assert (spec.kind, spec.path, spec.options) == ("folder", Path("/data/gardens"), {"radius": "10"})
    assert str(spec) == "folder:/data/gardens (radius=10)"
    # only the first colon separates: the path keeps its own
    assert DatasetSpec.parse("mat:/x/a:b.mat").path == Path("/x/a:b.mat")
    # the JSON shape of an admin request and a run's recorded config
    again = DatasetSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec
    typed = DatasetSpec.model_validate(
        {"kind": "mat", "path": "/p.mat", "options": {"radius": 5, "check_files": False, "images_root": "/img"}}
    )
    assert typed.options == {"radius": 5, "check_files": False, "images_root": "/img"}


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("folder", None, "bad dataset 'folder': expected KIND:PATH with KIND one of folder, mat, traversal, synthetic"),
        (":/x", None, "expected KIND:PATH"),
        ("folder:", None, "expected KIND:PATH"),
        ("pitts:/x", None, "bad dataset 'pitts:/x': unknown dataset kind 'pitts'; choose one of folder, mat"),
        (
            "folder:/x",
            {"bogus": "1", "radius": "2"},
            "dataset kind 'folder' has no option(s) bogus; it accepts radius, split, database, queries",
        ),
        ("traversal:/x", {"radius": "2"}, "has no option(s) radius"),
    ],
)
def test_parse_errors_are_one_line_naming_the_problem(text, options, message):
    with pytest.raises(ValueError) as e:
        DatasetSpec.parse(text, options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_option_pairs():
    assert parse_options(["radius=10", " images-root = /d ", "note="]) == {
        "radius": "10",
        "images_root": "/d",
        "note": "",
    }
    for bad, message in [
        (["radius"], "bad dataset option 'radius': expected KEY=VALUE"),
        (["=3"], "expected KEY=VALUE"),
        (["radius=1", "radius=2"], "dataset option radius is given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_options(bad)


def test_from_folders(tmp_path: Path):
    gt = DatasetSpec.from_folders(tmp_path / "a" / "db", tmp_path / "a" / "q", ground_truth=tmp_path / "gt.csv")
    assert gt.kind == "traversal" and gt.path == (tmp_path / "a").resolve()
    assert gt.options["ground_truth"] == str((tmp_path / "gt.csv").resolve())
    assert DatasetSpec.from_folders(tmp_path / "db", tmp_path / "q", tolerance=2).options["tolerance"] == 2
    utm = DatasetSpec.from_folders(tmp_path / "db", tmp_path / "q", radius=10)
    assert (utm.kind, utm.options["radius"], utm.path) == ("folder", 10, tmp_path.resolve())
    with pytest.raises(ValueError, match="a radius applies to UTM-named images"):
        DatasetSpec.from_folders(tmp_path / "db", tmp_path / "q", tolerance=1, radius=3)


def _folder_dataset(root: Path) -> Path:
    from PIL import Image

    for part, east in (("database", 500000.0), ("database", 500030.0), ("queries", 500001.0)):
        (root / part).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (int(east) % 255, 90, 40)).save(root / part / dvgl_name(east, 4000000.0, 33, "T"))
    return root


def test_open_reads_with_string_options(tmp_path: Path):
    root = _folder_dataset(tmp_path / "ds")
    wide = DatasetSpec.parse(f"folder:{root}", {"radius": "50"}).open()
    narrow = DatasetSpec.parse(f"folder:{root}", {"radius": "5"}).open()
    assert len(wide.database) == 2 and [p.tolist() for p in wide.positives] == [[0, 1]]
    assert [p.tolist() for p in narrow.positives] == [[0]]
    with pytest.raises(ValueError, match=r"option radius='far': not a number"):
        DatasetSpec.parse(f"folder:{root}", {"radius": "far"}).open()


def test_the_distillation_config_and_the_rebuild_request_use_the_spec(tmp_path: Path):
    from vpr.server.jobs import RebuildRequest
    from vpr.train.distill_data import collect_images

    root = _folder_dataset(tmp_path / "ds")
    cfg = types.SimpleNamespace(images=None, dataset=f"folder:{root}", dataset_options={"radius": "50"}, limit=None)
    images, source = collect_images(cfg)
    assert len(images) == 2 and all(i.utm is not None for i in images) and source["dataset"] == f"folder:{root}"
    with pytest.raises(ValueError, match="has no option"):
        collect_images(types.SimpleNamespace(**{**vars(cfg), "dataset_options": {"bogus": "1"}}))

    req = RebuildRequest.model_validate({"dataset": {"kind": "folder", "path": str(root), "options": {"radius": 9}}})
    assert isinstance(req.dataset, DatasetSpec) and req.dataset.options == {"radius": 9}
    with pytest.raises(ValidationError, match="unknown dataset kind 'pitts'"):
        RebuildRequest.model_validate({"dataset": {"kind": "pitts", "path": str(root)}})
    with pytest.raises(ValidationError, match="has no option"):
        RebuildRequest.model_validate({"dataset": {"kind": "folder", "path": str(root), "options": {"tolerance": 1}}})


def test_every_command_takes_dataset_options(tmp_path: Path, capsys):
    root = _folder_dataset(tmp_path / "ds")
    # `vpr dataset info`: --dataset-option, and --option as its documented alias
    assert main(["dataset", "info", f"folder:{root}", "--dataset-option", "radius=5"]) == 0
    assert '"radius_m": 5.0' in capsys.readouterr().out
    assert main(["dataset", "info", f"folder:{root}", "--option", "radius=6"]) == 0
    assert '"radius_m": 6.0' in capsys.readouterr().out
    assert main(["dataset", "info", f"folder:{root}", "--radius", "5", "--dataset-option", "radius=6"]) == 2
    assert "radius: given both as a flag and as a --dataset-option" in capsys.readouterr().err
    # the spec fails before any model is loaded, with the same message in every command
    home = ["--home", str(tmp_path / "home")]
    bad = ["--dataset", f"folder:{root}", "--dataset-option", "bogus=1"]
    commands = [
        ["index", "build", "--model", "nobody@1", "--name", "x", *bad],
        ["eval", "--db-model", "nobody@1", "--query-model", "nobody@1", "--quality", "orig", *bad],
        ["train", "distill", "--teacher", "nobody@1", "--quality", "orig", "--register", "s", *bad],
    ]
    for argv in commands:
        assert main(home + argv) == 2, argv
        err = capsys.readouterr().err
        assert "dataset kind 'folder' has no option(s) bogus" in err, (argv, err)
    argv = ["train", "distill", "--teacher", "t@1", "--quality", "orig", "--register", "s", "--images", str(root)]
    assert main(home + argv + ["--dataset-option", "radius=3"]) == 2
    assert "--dataset-option applies to a dataset" in capsys.readouterr().err
