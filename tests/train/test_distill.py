"""Distillation training: the split student, caching, smoke run, resume, triplet, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_CONFIG, random_images
from vpr.cli.main import main as vpr
from vpr.media.degrade import degrade_image
from vpr.model.network import build_model
from vpr.model.preprocess import load_image, to_input
from vpr.model.registry import Registry
from vpr.settings import HomeSettings
from vpr.train import ddp
from vpr.train.distill import DistillConfig, Distiller, camera_twins, lr_factor, run_distill
from vpr.train.distill_cache import TensorCache
from vpr.train.distill_data import PrefixRunner, split_student, trainable_names
from vpr.train.mining import NegativeMiner, TripletConfig
from vpr.train.validation import improves

QUALITIES = ["orig", "h48-jpeg30", "h36"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_teacher(home: Path, policy: str = "upsample", name: str = "teacher") -> str:
    torch.manual_seed(0)
    cfg = {**TINY_CONFIG, "preprocess": {**TINY_CONFIG["preprocess"], "small_policy": policy}}
    net = build_model(cfg)
    net.netvlad.init_from_centroids(F.normalize(torch.randn(8, net.backbone.out_channels), dim=1).numpy(), alpha=10.0)
    return str(Registry(HomeSettings(home=home).models_dir).register(name, net, role="teacher"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    random_images(tmp_path / "train", 8, seed=3)
    return tmp_path / "train"


def config(teacher: str, images: Path, home: Path, **kw) -> DistillConfig:
    base = dict(
        teacher=teacher,
        name="student",
        qualities=QUALITIES,
        images=images,
        epochs=2,
        batch_size=4,
        lr=1e-3,
        progress=False,
        run_dir=home / "runs" / kw.get("name", "student"),
    )
    return DistillConfig(**{**base, **kw})


def states_close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def trained_student(home: Path, ref: str) -> dict:
    return Registry(HomeSettings(home=home).models_dir).load(ref).net.state_dict()


# ---- the split student ---------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [None, ["layer2", "layer3", "netvlad"], ["stem", "netvlad"], ["netvlad"]])
def test_prefix_then_head_equals_the_full_network(tmp_path, images, trainable):
    home = tmp_path / "home"
    loaded = Registry(HomeSettings(home=home).models_dir).load(tiny_teacher(home, policy="native"))
    student = loaded.net
    prefix, head, cut = split_student(student, trainable_names(student, trainable))
    path = sorted(images.iterdir())[0]
    runner = PrefixRunner(
        prefix,
        cut,
        loaded.sha256,
        student.config.preprocess,
        torch.device("cpu"),
        TensorCache(1 << 20, tmp_path / "cache"),
    )
    for q in QUALITIES:
        x = to_input(degrade_image(load_image(path), q), student.config.preprocess).unsqueeze(0)
        with torch.no_grad():
            want_desc, want_map = student(x, return_features=True)
            for _ in range(2):  # computed, then from the cache
                desc, fmap = head(runner(path, q).unsqueeze(0))
                assert torch.allclose(desc, want_desc, atol=1e-6)
                assert torch.allclose(fmap, want_map, atol=1e-5)
    assert runner.cache.stats()["memory_hits"] == len(QUALITIES)


def test_unknown_trainable_part_is_named(tmp_path):
    net = build_model(TINY_CONFIG)
    with pytest.raises(ValueError, match=r"unknown trainable part\(s\) \['conv5'\].*layer3, netvlad"):
        trainable_names(net, ["conv5", "netvlad"])


def test_lr_schedules():
    cfg = DistillConfig(teacher="t", name="s", qualities=["orig"], images=Path("."), lr=1.0)
    assert [lr_factor(s, 10, 5, cfg) for s in (0, 5, 9)] == pytest.approx(
        [1.0, 0.5 * (1 + np.cos(np.pi / 2)), 0.5 * (1 + np.cos(np.pi * 0.9))]
    )
    step = cfg.model_copy(update={"schedule": "step", "step_gamma": 0.5})
    assert [lr_factor(s, 10, 5, step) for s in (0, 4, 5, 9)] == [1.0, 1.0, 0.5, 0.5]
    warm = cfg.model_copy(update={"schedule": "constant", "warmup_steps": 4})
    assert [lr_factor(s, 10, 5, warm) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_config_validation_names_the_problem(tmp_path, images):
    with pytest.raises(ValueError, match="bad quality spec 'h0x'"):
        config("t@1", images, tmp_path, qualities=["orig", "h0x"])
    with pytest.raises(ValueError, match="exactly one source"):
        DistillConfig(teacher="t@1", name="s", qualities=["orig"])
    with pytest.raises(ValueError, match="unknown loss term"):
        config("t@1", images, tmp_path, loss="mse+kd")
    with pytest.raises(ValueError, match="bad model name"):
        config("t@1", images, tmp_path, name="no/slash")
    with pytest.raises(ValueError, match="mirrored training images have no positions"):
        config("t@1", images, tmp_path, loss="mse+triplet", mirror=True)


# ---- the smoke run through the CLI ------------------------------------------------------------
def test_cli_smoke_run_lowers_loss_and_registers_a_student(tmp_path, images, capsys):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    rc = vpr(
        [
            "--home",
            str(home),
            "train",
            "distill",
            "--teacher",
            teacher,
            "--images",
            str(images),
            "--quality",
            ",".join(QUALITIES),
            "--register",
            "low",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--schedule",
            "constant",
            "--activate",
            "--no-progress",
            "--log-every",
            "1",
            "--val-fraction",
            "0",
        ]
    )
    assert rc == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    assert ref == "low@1"
    reg = Registry(HomeSettings(home=home).models_dir)
    m = reg.manifest(ref)
    assert m["role"] == "student" and m["parent"] == teacher
    d = m["details"]
    assert d["teacher"] == teacher and d["qualities"] == QUALITIES and d["losses"] == {"mse": 1.0, "ickd": 1.0}
    assert d["trainable"] == ["layer3", "netvlad"] and d["epochs"] == 3 and d["train_images"] == 8
    losses = [h["loss"] for h in d["history"]]
    assert losses[-1] < losses[0], losses
    assert m["metrics"]["best_epoch"] == 3 and m["metrics"]["train_loss"] == pytest.approx(losses[-1])
    assert reg.active("low").version == 1
    # frozen layers are the teacher's, trained ones moved
    t, s = reg.load(teacher).net.state_dict(), reg.load(ref).net.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t if k.startswith(("backbone.body.conv1", "backbone.body.layer1")))
    assert any(not torch.equal(t[k], s[k]) for k in t if k.startswith("backbone.body.layer3"))
    run = home / "runs" / "low"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert {"mse", "ickd"} <= set(next(r for r in records if r["kind"] == "step")["terms"])
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "state.json").read_text())["registered"] == ref


def test_cli_reports_bad_input_in_one_line(tmp_path, images, capsys):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    args = [
        "--home",
        str(home),
        "train",
        "distill",
        "--teacher",
        teacher,
        "--images",
        str(images),
        "--register",
        "x",
        "--no-progress",
    ]
    assert vpr(args + ["--quality", "orig,h-1"]) == 2
    assert "bad quality spec 'h-1'" in capsys.readouterr().err
    assert vpr(args + ["--quality", "orig", "--loss", "mse+triplet"]) == 2
    assert "triplet loss needs positions" in capsys.readouterr().err
    assert vpr(args + ["--quality", "orig", "--trainable", "conv5"]) == 2
    assert "unknown trainable part" in capsys.readouterr().err
    assert (
        vpr(
            [
                "--home",
                str(home),
                "train",
                "distill",
                "--teacher",
                "nobody@3",
                "--images",
                str(images),
                "--register",
                "x",
                "--quality",
                "orig",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "nobody@3 not found" in capsys.readouterr().err


@pytest.mark.slow
def test_label_free_validation_picks_the_epoch_with_the_best_self_retrieval(tmp_path, images):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    cfg = config(
        teacher,
        images,
        home,
        name="val",
        limit=6,
        val_fraction=0.34,
        epochs=3,
        schedule="constant",
        low_light_share=0.5,
        epoch_choice="within-noise",
    )
    res = run_distill(cfg, HomeSettings(home=home))
    m = Registry(HomeSettings(home=home).models_dir).manifest(res.ref)
    assert m["details"]["validation"] == "self-retrieval" and m["details"]["epoch_choice"] == "within-noise"
    assert (m["details"]["train_images"], m["details"]["val_images"], m["details"]["image_count"]) == (4, 2, 6)
    # the registered epoch is the one `improves` picks, epoch after epoch, on the recorded scores
    best, chosen, top = None, 0, 0.0
    for epoch, h in enumerate(res.history, 1):
        assert h["val"]["queries"] == 2 * 9  # 2 held-out images x 3 qualities, their low-light and dim twins
        s = (h["val"]["recall@1"], -h["val"]["val_loss"])
        top = max(top, s[0])
        if improves(s, best, top, h["val"]["queries"], "within-noise"):
            best, chosen = s, epoch
    assert res.best_epoch == chosen and best is not None
    assert m["metrics"]["val_recall@1"] == pytest.approx(best[0])
    # with low light in the mix, the validation checks every quality in low light too
    twins = camera_twins(QUALITIES, cfg.conditions())
    assert twins == ["orig-dark32", "h48-dark32-jpeg30", "h36-dark32", "orig-dim8", "h48-dim8-jpeg30", "h36-dim8"]
    assert set(res.history[0]["val"]["per_quality"]) == {*QUALITIES, *twins}
    assert m["details"]["low_light"] == {"share": 0.5, "factor": 32} and m["details"]["dim"] == {
        "share": 0.25,
        "factor": 8,
    }
    state = json.loads((res.run_dir / "state.json").read_text())
    assert state["best"]["epoch"] == res.best_epoch and state["baseline"]["rule"] == "self-retrieval"


# ---- caching changes nothing ---------------------------------------------------------------------
@pytest.mark.slow
def test_prefix_cache_gives_the_same_student_as_recomputing(tmp_path, images):
    home = tmp_path / "home"
    teacher = tiny_teacher(home, policy="native")  # degraded inputs are smaller: several shapes per batch
    settings = HomeSettings(home=home)
    refs = {}
    for mode, name in [("off", "plain"), ("disk", "cold"), ("disk", "warm"), ("memory", "mem")]:
        res = run_distill(config(teacher, images, home, name=name, prefix_cache=mode), settings)
        refs[name] = res
    plain = trained_student(home, str(refs["plain"].ref))
    for name in ("cold", "warm", "mem"):
        assert states_close(plain, trained_student(home, str(refs[name].ref))), name
    cold, warm = refs["cold"].history[-1]["cache"]["prefix"], refs["warm"].history[0]["cache"]["prefix"]
    assert cold["misses"] > 0 and warm["misses"] == 0 and warm["disk_hits"] > 0
    assert refs["plain"].history[-1]["cache"]["prefix"] == "off"


# ---- resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_student(tmp_path, images, monkeypatch):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    settings = HomeSettings(home=home)
    straight = run_distill(config(teacher, images, home, name="straight", epochs=3), settings)

    original = Distiller.train_epoch

    def crash_in_epoch_3(self, epoch):
        if epoch == 3:
            raise RuntimeError("killed")
        return original(self, epoch)

    cfg = config(teacher, images, home, name="crashy", epochs=3)
    monkeypatch.setattr(Distiller, "train_epoch", crash_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_distill(cfg, settings)
    monkeypatch.setattr(Distiller, "train_epoch", original)
    state = json.loads((home / "runs" / "crashy" / "state.json").read_text())
    assert state["epoch"] == 2 and state["registered"] is None
    with pytest.raises(ValueError, match="holds a previous run"):
        run_distill(cfg, settings)
    with pytest.raises(ValueError, match=r"different settings \(lr"):
        run_distill(cfg.model_copy(update={"lr": 5e-4}), settings, resume=True)
    # a state written by a version without some settings: they ran at their defaults
    state_path = home / "runs" / "crashy" / "state.json"
    older = json.loads(state_path.read_text())
    for key in ("val_rule", "triplet", "quality_plan"):
        del older["config"][key]
    del older["top_recall"]  # read off the history instead
    state_path.write_text(json.dumps(older))
    # ... except the quality plan: before version 2 a listed `orig` added to orig_share
    with pytest.raises(ValueError, match=r"different settings \(quality_plan: 1 -> 2"):
        run_distill(cfg, settings, resume=True)
    older["config"]["quality_plan"] = 2
    # ... and the underexposed copies: a run from before the -dim step ran without them
    del older["config"]["dim_share"]
    state_path.write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"different settings \(dim_share: 0.0 -> 0.25"):
        run_distill(cfg, settings, resume=True)
    older["config"]["dim_share"] = 0.25
    state_path.write_text(json.dumps(older))
    resumed = run_distill(cfg, settings, resume=True)
    assert states_close(trained_student(home, str(straight.ref)), trained_student(home, str(resumed.ref)), 1e-6)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    records = [json.loads(x) for x in (home / "runs" / "crashy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    # resuming a finished run registers nothing new
    again = run_distill(cfg, settings, resume=True)
    assert again.ref == resumed.ref
    assert Registry(settings.models_dir).versions("crashy") == [1]


# ---- positions: triplet loss and validation recall ----------------------------------------------------
def test_negative_miner_respects_distances():
    utm = np.array([[0.0, 0], [5, 0], [8, 0], [40, 0], [60, 0], [100, 0]])
    torch.manual_seed(0)
    desc = F.normalize(torch.randn(6, 16), dim=1)
    miner = NegativeMiner(utm, desc, np.arange(6), TripletConfig(pos_dist=10, neg_dist=30, negatives=2), seed=0)
    near = {0: {1, 2}, 1: {0, 2}, 2: {0, 1}}
    for i, options in near.items():
        assert int(miner.positive[i]) in options
        sims = {j: float(desc[i] @ desc[j]) for j in options}
        assert int(miner.positive[i]) == max(sims, key=sims.get)  # the most similar nearby image
    assert int(miner.positive[5]) == 5  # alone: itself
    miner.maybe_refresh(0)
    pos, neg, mask = miner.select([0, 3], desc[[0, 3]], step=0)
    for row, i in enumerate([0, 3]):
        chosen = neg[row][mask[row]].numpy()
        assert len(chosen) == 2
        assert all(abs(utm[j, 0] - utm[i, 0]) > 30 for j in chosen)


@pytest.mark.slow
def test_triplet_training_with_positions_reports_validation_recall(tmp_path):
    from vpr.data.synthetic import make_route

    route = make_route(tmp_path / "route", places=12, size=(96, 72))
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    cfg = DistillConfig(
        teacher=teacher,
        name="tri",
        qualities=["orig", "h36"],
        dataset=f"synthetic:{route}",
        loss="mse+triplet",
        loss_weights={"mse": 1, "triplet": 0.5},
        val_fraction=0.25,
        epochs=2,
        batch_size=4,
        lr=1e-3,
        progress=False,
        triplet=TripletConfig(pos_dist=6, neg_dist=12, negatives=2, refresh_every=1),
    )
    res = run_distill(cfg, HomeSettings(home=home))
    m = Registry(HomeSettings(home=home).models_dir).manifest(res.ref)
    assert m["details"]["validation"] == "self-retrieval" and m["details"]["val_images"] == 3
    assert m["details"]["train_images"] == 9 and m["details"]["losses"] == {"mse": 1.0, "triplet": 0.5}
    for h in res.history:
        assert 0.0 <= h["val"]["recall@1"] <= h["val"]["recall@5"] <= 1.0
        twins = camera_twins(["orig", "h36"], cfg.conditions())
        assert set(h["val"]["per_quality"]) == {"orig", "h36", *twins}
        assert h["triplet"] >= 0
    assert "val_recall@1" in m["metrics"]
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "baseline" and "recall@1" in records[0]["val"]


# ---- data parallel -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, images):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    settings = HomeSettings(home=home)
    # 2 of 8 images held out for validation (rank 0 validates, every rank follows its choice): 6 train
    single = run_distill(config(teacher, images, home, name="one", batch_size=4, val_fraction=0.25), settings)
    ddp.launch_local(
        2, run_distill, config(teacher, images, home, name="two", batch_size=2, val_fraction=0.25), settings
    )
    reg = Registry(settings.models_dir)
    assert reg.versions("two") == [1]
    m = reg.manifest("two@1")
    assert m["details"]["world_size"] == 2 and m["parent"] == teacher and m["details"]["val_images"] == 2
    assert m["details"]["best_epoch"] == single.best_epoch
    # Same trajectory: the epoch losses agree, and the weights moved the same way. (Not bit-equal:
    # the all-reduce sums in another order, and Adam's first steps are ~lr * sign(gradient), which
    # turns 1e-9 differences in near-zero gradients into lr-sized ones for a few elements; a run with
    # another global batch lands ~100% of the distance away.)
    two = json.loads((home / "runs" / "two" / "state.json").read_text())["history"]
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in single.history], rel=1e-4)
    t, a, b = trained_student(home, teacher), trained_student(home, str(single.ref)), trained_student(home, "two@1")
    moved = [k for k in a if not torch.equal(a[k], t[k])]
    apart = sum(float(((a[k] - b[k]) ** 2).sum()) for k in moved) ** 0.5
    travelled = sum(float(((a[k] - t[k]) ** 2).sum()) for k in moved) ** 0.5
    assert moved and apart < 0.01 * travelled, (apart, travelled)
