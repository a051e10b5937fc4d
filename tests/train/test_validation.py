"""The label-free validation that picks the registered epoch and stops training,
the full-quality share of the training mix, and the size rule a student inherits (issue 12)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_CONFIG, random_images
from vpr.describe.cache import image_sha256
from vpr.model.network import build_model
from vpr.model.preprocess import load_image
from vpr.model.registry import Registry
from vpr.settings import HomeSettings
from vpr.train import ddp
from vpr.train.distill import (
    DistillConfig,
    Distiller,
    camera_twins,
    crop_view,
    level_draw_weights,
    plan_crops,
    plan_qualities,
    run_distill,
)
from vpr.train.validation import (
    EPOCH_CHOICES,
    holdout_split,
    improves,
    make_validation_set,
    margin,
    score,
    self_retrieval,
    should_stop,
    validation_qualities,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_holdout_is_evenly_spread_and_never_the_ends():
    train, val = holdout_split(100, 0.1)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert 0 not in val and 99 not in val and np.all(np.diff(val) == 10)
    assert len(holdout_split(8, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="leaves 1 of 3 images"):
        holdout_split(3, 0.67)


def test_right_answers_are_the_original_or_neighbours_within_the_radius():
    _, vs = make_validation_set(10, 0.2, ["h60-jpeg20"])
    assert vs is not None and vs.qualities == ["orig", "h60-jpeg20"] and vs.radius is None
    assert [p.tolist() for p in vs.positives] == [[i] for i in vs.val_ids]
    utm = np.stack([np.arange(10) * 10.0, np.zeros(10)], axis=1)  # one image every 10 m
    _, vs = make_validation_set(10, 0.2, ["orig"], utm, radius=15.0)
    for i, pos in zip(vs.val_ids, vs.positives):
        assert pos.tolist() == [j for j in range(10) if abs(j - i) <= 1]
    assert validation_qualities(["h90", "orig"]) == ["orig", "h90"]


def test_neighbours_rule_leaves_the_held_out_images_out_and_asks_for_a_neighbour():
    train, vs = make_validation_set(30, 0.1, ["h60-jpeg20"], rule="neighbours")
    assert vs is not None and vs.rule == "neighbours" and vs.val_ids.tolist() == [5, 15, 25]
    assert vs.database_ids is not None and vs.database_ids.tolist() == train.tolist()
    assert not set(vs.val_ids.tolist()) & set(vs.database_ids.tolist())  # own originals are not there
    for i, rows in zip(vs.val_ids, vs.positives):  # rows of the validation database: images within 2 places
        assert vs.database_ids[rows].tolist() == [j for j in (i - 2, i - 1, i + 1, i + 2)]
    # with positions, the radius decides; a held-out image with no neighbour in reach is left out
    utm = np.stack([np.arange(30) * 10.0, np.zeros(30)], axis=1)
    utm[15] = (5000.0, 5000.0)
    train, vs = make_validation_set(30, 0.1, ["orig"], utm, radius=15.0, rule="neighbours")
    assert vs is not None and vs.val_ids.tolist() == [5, 25] and vs.radius == 15.0
    assert 15 in train.tolist() and vs.database_ids is not None and vs.database_ids.tolist() == train.tolist()
    assert [vs.database_ids[r].tolist() for r in vs.positives] == [[4, 6], [24, 26]]
    with pytest.raises(ValueError, match="unknown validation rule 'own'"):
        make_validation_set(30, 0.1, ["orig"], rule="own")


def test_a_run_with_the_neighbours_rule_records_it(tmp_path):
    home, cfg = tiny_run(tmp_path, n_images=20, seed=7, val_rule="neighbours")
    res = run_distill(cfg, home)
    m = Registry(home.models_dir).manifest(res.ref)
    assert m["details"]["validation"] == "neighbours" and m["details"]["val_images"] == 2
    assert res.history[0]["val"]["rule"] == "neighbours"
    assert 0.0 <= res.history[0]["val"]["recall@1"] <= 1.0


def test_self_retrieval_counts_own_original_or_a_neighbour():
    db = np.eye(6, dtype=np.float32)
    # queries 0 and 1 find their own originals; query 2 finds image 4, a neighbour only with positions
    q = db[[1, 3, 4]] + 0.01
    q[2, 5] = 0.3  # its own original comes second
    own = [np.array([1]), np.array([3]), np.array([5])]
    assert self_retrieval(db, q, own)["recall@1"] == pytest.approx(2 / 3)
    near = [np.array([1]), np.array([3]), np.array([4, 5])]
    assert self_retrieval(db, q, near)["recall@1"] == 1.0
    assert self_retrieval(db, q, own)["recall@5"] == 1.0 and self_retrieval(db, q[:2], own[:2])["recall@1"] == 1.0


def test_score_prefers_recall_then_lower_held_out_loss_and_stops_after_patience():
    a = score({"recall@1": 0.8, "val_loss": 0.5}, 9.0)
    b = score({"recall@1": 0.8, "val_loss": 0.4}, 1.0)
    c = score({"recall@1": 0.9, "val_loss": 2.0}, 1.0)
    assert a < b < c
    assert score(None, 0.3) == (-0.3,)
    assert not should_stop(best_epoch=3, epoch=4, patience=2) and should_stop(3, 5, 2)
    assert not should_stop(1, 50, None)


def test_full_quality_share_of_the_training_mix():
    qs = ["h90-jpeg20", "h60-jpeg20", "h90-h264-qp40"]
    plan = plan_qualities(qs, 0.25, 20000, [0, 1, 7])
    assert plan == plan_qualities(qs, 0.25, 20000, [0, 1, 7])  # seeded
    assert plan.count("orig") / len(plan) == pytest.approx(0.25, abs=0.01)
    assert {q: plan.count(q) / len(plan) for q in qs} == pytest.approx(dict.fromkeys(qs, 0.25), abs=0.01)
    assert "orig" not in plan_qualities(qs, 0.0, 1000, [0, 1, 7])
    assert DistillConfig(teacher="t@1", name="s", qualities=qs, images=Path(".")).orig_share == 0.25
    # a listed `orig` does not add to the share (it did: 0.25 + 0.75 / 4 = 0.44 here)
    listed = plan_qualities(["orig", *qs], 0.25, 20000, [0, 1, 7])
    assert listed == plan  # the same draws as the list without it
    assert plan_qualities(["orig"], 0.25, 50, [0, 1, 7]) == ["orig"] * 50
    assert plan_qualities(["orig", "h90-jpeg20"], 0.0, 100, [0, 1, 7]) == ["h90-jpeg20"] * 100


def test_low_light_share_of_the_training_mix():
    qs = ["h90-jpeg20", "h60-jpeg20", "h90-h264-qp40"]
    cfg = DistillConfig(teacher="t@1", name="s", qualities=qs, images=Path("."))
    assert (cfg.low_light_share, cfg.low_light_factor) == (0.0, 32)  # off unless asked for
    plan = plan_qualities(qs, 0.25, 20000, [0, 1, 7], [("dark32", 0.25)])
    dark = [q for q in plan if "-dark32" in q]
    assert plan.count("orig") / len(plan) == pytest.approx(0.25, abs=0.01)  # full quality stays full quality
    assert len(dark) / len(plan) == pytest.approx(0.75 * 0.25, abs=0.01)  # a quarter of the degraded ones
    assert {q.replace("-dark32", "") for q in dark} == set(qs)
    # off: exactly the plan without the option (old runs reproduce)
    assert plan_qualities(qs, 0.25, 500, [0, 1, 7], []) == plan_qualities(qs, 0.25, 500, [0, 1, 7])
    # the validation checks every training quality in low light too, `orig` included
    assert camera_twins(["h90-jpeg20", "orig"], [("dark32", 0.25)]) == ["orig-dark32", "h90-dark32-jpeg20"]
    assert camera_twins(qs, []) == []
    # by default a quarter of the degraded samples are underexposed (-dim8), nothing else
    assert cfg.conditions() == [("dim8", 0.25)]


def test_monochrome_share_of_the_training_mix():
    qs = ["h90-jpeg20", "h60-jpeg20", "h90-h264-qp40"]
    assert DistillConfig(teacher="t@1", name="s", qualities=qs, images=Path(".")).grey_share == 0.0
    plan = plan_qualities(qs, 0.25, 20000, [0, 1, 7], [("grey", 0.25)])
    grey = [q for q in plan if "-grey" in q]
    assert plan.count("orig") / len(plan) == pytest.approx(0.25, abs=0.01)
    assert len(grey) / len(plan) == pytest.approx(0.75 * 0.25, abs=0.01)
    assert {q.replace("-grey", "") for q in grey} == set(qs) and "h90-grey-jpeg20" in grey
    # conditions are drawn independently, in DistillConfig.conditions' order: some samples are dark and grey
    cfg = DistillConfig(
        teacher="t@1",
        name="s",
        qualities=qs,
        images=Path("."),
        low_light_share=0.5,
        low_light_factor=16,
        grey_share=0.5,
        dim_share=0.25,
    )
    assert cfg.conditions() == [("dark16", 0.5), ("grey", 0.5), ("dim8", 0.25)]
    both = plan_qualities(qs, 0.25, 20000, [0, 1, 7], cfg.conditions()[:2])
    assert sum("-dark16-grey" in q for q in both) / len(both) == pytest.approx(0.75 * 0.25, abs=0.015)
    # a light step already taken stays: -dim is drawn after -dark and never stacks on it
    every = plan_qualities(qs, 0.25, 20000, [0, 1, 7], cfg.conditions())
    assert not any("-dark16" in q and "-dim" in q for q in every) and any("-dim8" in q for q in every)
    assert camera_twins(["h90-jpeg20"], [("grey", 0.25)]) == ["orig-grey", "h90-grey-jpeg20"]
    assert camera_twins(["h90-jpeg20"], cfg.conditions()) == [
        "orig-dark16",
        "h90-dark16-jpeg20",
        "orig-grey",
        "h90-grey-jpeg20",
        "orig-dim8",
        "h90-dim8-jpeg20",
    ]


def tiny_teacher(home: Path) -> str:
    torch.manual_seed(0)
    net = build_model(TINY_CONFIG)  # max_side 96, small_policy `database` (the default)
    net.netvlad.init_from_centroids(F.normalize(torch.randn(8, net.backbone.out_channels), dim=1).numpy(), alpha=10.0)
    return str(Registry(HomeSettings(home=home).models_dir).register("teacher", net, role="teacher"))


def tiny_run(tmp_path: Path, n_images: int = 10, seed: int = 6, **settings) -> tuple[HomeSettings, DistillConfig]:
    """A tiny teacher, `n_images` random images and a one-epoch run's config with `settings`."""
    home = HomeSettings(home=tmp_path / "home")
    images = tmp_path / "imgs"
    random_images(images, n_images, size=(64, 48), seed=seed)
    base: dict = dict(teacher=tiny_teacher(home.home), name="s", qualities=["h24"], images=images, epochs=1)
    return home, DistillConfig(**{**base, "batch_size": 4, "progress": False, **settings})


def test_student_inherits_the_size_rule_from_its_teacher(tmp_path):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    images = tmp_path / "small"
    random_images(images, 6, size=(48, 36), seed=5)
    cfg = DistillConfig(teacher=teacher, name="s", qualities=["h24-jpeg20"], images=images, progress=False)
    ctx = ddp.init_distributed("cpu")
    try:
        d = Distiller(cfg, HomeSettings(home=home), ctx)
    finally:
        ddp.shutdown(ctx)
    assert d.student.config.preprocess.small_policy == "database"
    assert d.description["side"] == 48
    # degraded 32x24 copies are upsampled to the database's 48 px, not to max_side 96
    assert (d.student_preprocess.max_side, d.student_preprocess.small_policy) == (48, "upsample")
    assert tuple(d.student_input(0, "h24-jpeg20").shape[-2:]) == tuple(d.student_input(0, "orig").shape[-2:])


def test_mirror_adds_a_second_view_of_the_training_images_only(tmp_path):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    images = tmp_path / "imgs"
    random_images(images, 10, size=(64, 48), seed=6)
    cfg = DistillConfig(teacher=teacher, name="s", qualities=["h24"], images=images, mirror=True, progress=False)
    ctx = ddp.init_distributed("cpu")
    try:
        d = Distiller(cfg, HomeSettings(home=home), ctx)
        plain = Distiller(cfg.model_copy(update={"mirror": False}), HomeSettings(home=home), ctx)
        again = Distiller(cfg, HomeSettings(home=home), ctx)
    finally:
        ddp.shutdown(ctx)
    held_out = set(d.val_ids.tolist())
    originals = [i for i in plain.train_ids.tolist()]
    assert held_out == set(plain.val_ids.tolist()) and len(held_out) == 1  # the same held-out image
    assert len(d.images) == 10 + 9 and d.n_originals == 10
    assert d.train_ids.tolist() == [*originals, *range(10, 19)]  # every training image and its mirror
    for k, i in enumerate(originals):  # each mirror is its original flipped, pixel for pixel
        flipped = np.asarray(load_image(d.images[i].path))[:, ::-1]
        assert np.array_equal(np.asarray(load_image(d.images[10 + k].path)), flipped)
    assert not any(d.images[10 + k].path == d.images[i].path for k, i in enumerate(originals))
    # the held-out image has no mirror anywhere in training
    assert image_sha256(d.images[next(iter(held_out))].path) not in {p.path.stem for p in d.images[10:]}
    # made once: a second run finds the same files; the size rule reads the originals only
    assert [i.path for i in again.images] == [i.path for i in d.images]
    assert d.description == plain.description
    assert len(d.targets.paths) == 19


@pytest.mark.slow
def test_validation_chooses_the_epoch_and_stops_early(tmp_path, monkeypatch):
    home = tmp_path / "home"
    teacher = tiny_teacher(home)
    images = tmp_path / "imgs"
    random_images(images, 10, size=(64, 48), seed=6)
    recalls = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # baseline, then epochs 1.. : epoch 1 best, no gain after

    def fake_validate(self):
        return {"recall@1": next(recalls), "val_loss": 1.0, "rule": "self-retrieval", "per_quality": {}}

    monkeypatch.setattr(Distiller, "validate", fake_validate)
    cfg = DistillConfig(
        teacher=teacher, name="s", qualities=["h24"], images=images, epochs=6, patience=2, batch_size=4, progress=False
    )
    res = run_distill(cfg, HomeSettings(home=home))
    assert res.best_epoch == 1 and [h["epoch"] for h in res.history] == [1, 2, 3]
    state = json.loads((res.run_dir / "state.json").read_text())
    assert state["stopped"].startswith("early stop after epoch 3") and state["baseline"]["recall@1"] == 0.5
    m = Registry(HomeSettings(home=home).models_dir).manifest(res.ref)
    assert m["metrics"]["best_epoch"] == 1 and m["details"]["stopped"] == state["stopped"]


def test_epoch_choice_within_the_validation_noise():
    # one standard error of a difference of two recalls on n queries; never 0, smaller with more queries
    assert margin(0.92, 50) == pytest.approx(math.sqrt(2 * (47 / 52) * (5 / 52) / 50))
    assert margin(1.0, 50) > 0 and margin(0.9, 400) < margin(0.9, 100) < margin(0.9, 25)
    assert margin(0.9, 0) == 0.0
    m = margin(0.94, 50)  # about 0.05
    best = (0.94, -0.50)  # (recall@1, -held-out loss), as score() gives
    # exact: any higher recall wins; a lower one never does, whatever its loss
    assert improves((0.96, -0.60), best, top=0.96, queries=50, choice="exact")
    assert not improves((0.92, -0.40), best, top=0.94, queries=50, choice="exact")
    assert improves((0.94, -0.40), best, top=0.94, queries=50, choice="exact")  # tie: the loss
    # within-noise: one query lower (2 points) with a lower loss replaces the best ...
    assert improves((0.92, -0.40), best, top=0.94, queries=50, choice="within-noise")
    # ... one query higher with a higher loss does not (a tie; the loss decides) ...
    assert not improves((0.96, -0.60), best, top=0.96, queries=50, choice="within-noise")
    # ... a gain beyond the margin does, and a loss beyond it never does
    assert improves((0.94 + m + 0.01, -0.60), best, top=0.94 + m + 0.01, queries=50, choice="within-noise")
    assert not improves((0.94 - m - 0.01, -0.10), best, top=0.94, queries=50, choice="within-noise")
    # the margin is measured from the highest recall seen, not from the best epoch's: no drifting down
    assert not improves((0.90, -0.30), (0.92, -0.40), top=0.98, queries=50, choice="within-noise")
    # more queries, a narrower margin: 2 points is no longer noise on 2,000 queries
    assert not improves((0.92, -0.40), best, top=0.94, queries=2000, choice="within-noise")
    # no validation: the training loss decides either way; the first epoch is always the best
    assert improves((-0.3,), (-0.4,), top=-0.3, queries=0, choice="within-noise")
    assert improves((0.5, -1.0), None, top=0.5, queries=50, choice="within-noise")
    with pytest.raises(ValueError, match="unknown epoch choice"):
        improves((0.9, -0.4), best, top=0.94, queries=50, choice="best")
    assert DistillConfig(teacher="t@1", name="s", qualities=["h90"], images=Path(".")).epoch_choice in EPOCH_CHOICES


def test_levels_drawn_in_proportion_to_the_baseline_loss():
    qs = ["h90", "h60-jpeg20", "h45-jpeg20"]
    baseline = {"per_quality": {"orig": {"val_loss": 0.0}, **{q: {"val_loss": v} for q, v in zip(qs, [0.1, 0.3, 0.6])}}}
    weights = level_draw_weights(["orig", *qs], baseline)  # a listed `orig` is not a degraded level
    assert weights == pytest.approx([0.1, 0.3, 0.6])
    plan = plan_qualities(qs, 0.25, 40000, [0, 1, 7], [("dim8", 0.25)], weights)
    assert plan.count("orig") / len(plan) == pytest.approx(0.25, abs=0.01)  # full quality is not reweighed
    dim = [q for q in plan if "-dim8" in q]
    assert len(dim) / len(plan) == pytest.approx(0.75 * 0.25, abs=0.01)  # nor are the conditions
    level = [q.replace("-dim8", "") for q in plan if q != "orig"]
    assert {q: level.count(q) / len(level) for q in qs} == pytest.approx(dict(zip(qs, [0.1, 0.3, 0.6])), abs=0.01)
    assert "h90" not in plan_qualities(qs, 0.0, 1000, [0, 1, 7], weights=[0.0, 1.0, 1.0])
    # the same loss everywhere (or none at all) draws uniformly
    flat = {"per_quality": {q: {"val_loss": 0.0} for q in qs}}
    assert level_draw_weights(qs, flat) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="no loss for h45-jpeg20"):
        level_draw_weights(qs, {"per_quality": {q: {"val_loss": 1.0} for q in qs[:2]}})
    with pytest.raises(ValueError, match="2 weights for 3 degraded levels"):
        plan_qualities(qs, 0.25, 10, [0], weights=[0.5, 0.5])
    cfg = DistillConfig(teacher="t@1", name="s", qualities=qs, images=Path("."))
    assert cfg.level_weights == "uniform"
    with pytest.raises(ValueError, match="measured by the held-out validation"):
        DistillConfig(
            teacher="t@1", name="s", qualities=qs, images=Path("."), level_weights="baseline-loss", val_fraction=0
        )


def test_a_run_weighs_its_levels_by_its_own_baseline(tmp_path):
    qs = ["h48", "h16-jpeg5"]
    home, cfg = tiny_run(tmp_path, qualities=qs, dim_share=0.0, level_weights="baseline-loss")
    res = run_distill(cfg, home)
    state = json.loads((res.run_dir / "state.json").read_text())
    losses = [state["baseline"]["per_quality"][q]["val_loss"] for q in qs]
    assert losses[1] > losses[0] > 0  # a 16 px JPEG 5 copy is further from the original than a 48 px one
    details = Registry(home.models_dir).manifest(res.ref)["details"]
    p = details["level_weights"]["p"]
    assert details["level_weights"]["rule"] == "baseline-loss"
    assert [p[q] for q in qs] == pytest.approx([x / sum(losses) for x in losses])
    # the run drew its epoch with those weights: the same plan as plan_qualities given them
    ctx = ddp.init_distributed("cpu")
    try:
        d = Distiller(cfg, home, ctx)
    finally:
        ddp.shutdown(ctx)
    d.state.baseline = state["baseline"]
    ids, quality, crop = d.epoch_plan(1)
    full = plan_qualities(qs, cfg.orig_share, len(d.images), [cfg.seed, 1, 7], [], [p[q] for q in qs])
    assert [quality[i] for i in ids] == [full[i] for i in ids]
    assert full != plan_qualities(qs, cfg.orig_share, len(d.images), [cfg.seed, 1, 7])
    assert set(crop.values()) == {None}  # no crops unless asked for


def test_crop_windows_of_the_prefix_maps():
    x = torch.arange(2 * 10 * 20, dtype=torch.float32).reshape(2, 10, 20)
    assert torch.equal(crop_view(x, 0.8, (0.0, 0.0)), x[:, :8, :16])  # top left
    assert torch.equal(crop_view(x, 0.8, (0.999, 0.999)), x[:, 2:, 4:])  # bottom right
    assert torch.equal(crop_view(x, 0.8, (0.5, 0.5)), x[:, 1:9, 2:18])
    assert torch.equal(crop_view(x, 1.0, (0.7, 0.2)), x)
    assert crop_view(x, 0.01, (0.5, 0.5)).shape == (2, 1, 1)
    plan = plan_qualities(["h90-jpeg20", "h45-jpeg20"], 0.25, 20000, [0, 1, 7])
    crops = plan_crops(plan, 0.5, [0, 1, 11])
    assert crops == plan_crops(plan, 0.5, [0, 1, 11])  # seeded
    assert all(c is None for q, c in zip(plan, crops) if q == "orig")  # full quality stays whole
    degraded = [c for q, c in zip(plan, crops) if q != "orig"]
    assert sum(c is not None for c in degraded) / len(degraded) == pytest.approx(0.5, abs=0.015)
    tops = [c[0] for c in degraded if c is not None]
    assert min(tops) >= 0 and max(tops) < 1 and np.mean(tops) == pytest.approx(0.5, abs=0.02)
    assert plan_crops(plan, 0.0, [0, 1, 11]) == [None] * len(plan)


def test_the_student_trains_on_the_crop_windows_and_keeps_whole_targets(tmp_path, monkeypatch):
    home, cfg = tiny_run(tmp_path, qualities=["h48"], crop_share=1.0)
    ctx = ddp.init_distributed("cpu")
    try:
        d = Distiller(cfg, home, ctx)
        d._prepare(resume=False)
        ids, quality, crop = d.epoch_plan(1)
        assert all((c is None) == (quality[i] == "orig") for i, c in crop.items())
        whole = d.student_input(ids[0], "h48")
        shapes: list[tuple[int, ...]] = []
        real = d.head_ddp.forward
        monkeypatch.setattr(d.head_ddp, "forward", lambda x: shapes.append(tuple(x.shape)) or real(x))
        d.total_steps = 1
        out = d.train_step(ids[:2], ["h48", "h48"], 0, [(0.0, 0.0), None])
    finally:
        ddp.shutdown(ctx)
    cropped = crop_view(whole, 0.8, (0.0, 0.0)).shape
    assert sorted(shapes) == sorted([(1, *cropped), (1, *whole.shape)])  # one pass per shape
    assert cropped[-1] < whole.shape[-1] and math.isfinite(out["loss"])


def test_a_run_with_the_regions_term_reads_the_teachers_regions(tmp_path):
    home, cfg = tiny_run(tmp_path, qualities=["h24-jpeg20"], loss="mse+ickd+regions")
    res = run_distill(cfg, home)
    state = json.loads((res.run_dir / "state.json").read_text())
    val = state["baseline"]["per_quality"]["h24-jpeg20"]
    assert val["regions"] > 0 and val["val_loss"] == pytest.approx(val["mse"] + val["ickd"] + val["regions"])
    assert state["baseline"]["per_quality"]["orig"]["regions"] == pytest.approx(0.0, abs=1e-5)  # the teacher itself
    assert res.history[0]["regions"] > 0
    details = Registry(home.models_dir).manifest(res.ref)["details"]
    assert details["losses"] == {"mse": 1.0, "ickd": 1.0, "regions": 1.0}
