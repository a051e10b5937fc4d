"""Hubness: how generic each database place looks, and what an index keeps of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vpr.index import hubness as hub_mod
from vpr.index.hubness import Hubness, hubness
from vpr.index.meta import Entry
from vpr.index.store import IndexStore, ModelStamp


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_a_generic_place_has_the_highest_hubness() -> None:
    """A place that looks like an average of many others is the most similar
    to places elsewhere; an ordinary place is not."""
    rng = np.random.default_rng(0)
    db = unit(rng.standard_normal((200, 64)))
    db[100] = unit(db[rng.choice(np.r_[0:90, 110:200], 30, replace=False)].mean(0))
    h = hubness(db)
    assert h is not None and h.shape == (200,)
    assert int(np.argmax(h)) == 100
    assert h[100] > np.median(h) + 0.05


def test_neighbours_along_the_route_do_not_count() -> None:
    """Consecutive places that look alike (a traversal's neighbouring frames)
    are the same place: a place whose only look-alikes are its neighbours
    within `HUB_EXCLUDE` spacings is not generic."""
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((50, 64)))
    db = unit(np.repeat(base, 3, axis=0) + 0.05 * rng.standard_normal((150, 64)))  # runs of 3 near-twins
    h = hubness(db)
    assert h is not None and h.max() < 0.5  # the twins (cosine ~0.99) were excluded
    # without the exclusion the same places would look generic
    sim = db @ db.T
    np.fill_diagonal(sim, -np.inf)
    assert np.sort(sim, axis=1)[:, -2:].mean() > 0.8


def test_positions_exclude_the_same_spot_in_another_traversal() -> None:
    """Two traversals of one route (ids 0..59 and 60..119 at the same positions):
    with positions, a place's twin in the other traversal is the same place."""
    rng = np.random.default_rng(2)
    base = unit(rng.standard_normal((60, 64)))
    db = unit(np.concatenate([base, base]) + 0.05 * rng.standard_normal((120, 64)))
    xy = [(float(i % 60) * 2.0, 0.0) for i in range(120)]
    with_positions, by_order = hubness(db, xy), hubness(db)
    assert with_positions is not None and by_order is not None
    # by order, the twin 60 ids away is one of the 10 most similar "elsewhere" (cosine ~0.85)
    assert np.all(by_order > with_positions + 0.04)


def test_a_slowly_changing_street_has_no_generic_middle() -> None:
    """A street whose look drifts slowly (cosine 0.93 to the next place, 0.93**d
    to the place d away): without the distance profile the middle of the street,
    with more of it within a few spacings, would look generic and its ends
    distinctive; relative to the profile neither does, and a place that really
    looks like many others elsewhere still stands out."""
    rng = np.random.default_rng(6)
    u = np.zeros((60, 256))
    u[0] = rng.standard_normal(256)
    for i in range(1, 60):
        u[i] = 0.93 * u[i - 1] + np.sqrt(1 - 0.93**2) * rng.standard_normal(256)
    db = unit(u)
    ends, middle = np.r_[0:5, 55:60], np.r_[25:35]
    sim = db @ db.T
    sim[np.abs(np.arange(60)[:, None] - np.arange(60)[None, :]) <= hub_mod.HUB_EXCLUDE] = -np.inf
    raw = np.sort(sim, axis=1)[:, -hub_mod.HUB_K :].mean(axis=1)  # the top-10 mean without the profile
    assert raw[middle].mean() > raw[ends].mean() + 0.05
    h = hubness(db)
    assert h is not None
    assert abs(h[middle].mean() - h[ends].mean()) < 0.02
    generic = db.copy()
    generic[30] = unit(db[[0, 8, 16, 44, 52, 59]].sum(axis=0))  # like six places along the street at once
    g = hubness(generic)
    assert g is not None and int(np.argmax(g)) == 30


def test_distance_profile_is_non_increasing() -> None:
    """Two traversals of one route in id order: the same spot 60 ids on is not
    "usual" at that distance (the profile does not rise back to it)."""
    rng = np.random.default_rng(7)
    base = unit(rng.standard_normal((60, 32)))
    db = unit(np.concatenate([base, base]) + 0.05 * rng.standard_normal((120, 32))).astype(np.float32)
    order = np.arange(120, dtype=np.int32)  # distances in row order, as `hubness` gives them
    profile = hub_mod.distance_profile(db, lambda rows: np.abs(order[rows][:, None] - order[None, :]))
    assert profile.shape == (121,) and profile[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(profile) <= 1e-7)
    assert profile[60] < 0.5  # the twins (cosine ~0.99) 60 ids apart do not lift it


def test_a_far_outlier_position_keeps_the_profile_small() -> None:
    """One position a thousand kilometres off a 1 cm-spaced route: distances beyond the
    profile's reach count as its last bin, so its size stays bounded by the places."""
    rng = np.random.default_rng(8)
    db = unit(rng.standard_normal((50, 16))).astype(np.float32)
    xy = [(0.01 * i, 0.0) for i in range(49)] + [(1e6, 0.0)]
    h = hubness(db, xy)
    assert h is not None and np.isfinite(h).all()
    profile = hub_mod.distance_profile(db, lambda rows: np.full((len(rows), 50), 1e8))
    assert profile.shape == (hub_mod.PROFILE_MIN_BINS + 1,)


def test_too_large_a_database_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_mod, "HUB_MAX_WORK", 100 * 100 * 8 - 1)
    assert hubness(unit(np.random.default_rng(3).standard_normal((100, 8)))) is None


def test_an_older_index_raw_hubness_still_loads(tmp_path: Path) -> None:
    """A manifest from before the distance profile (no `relative_to`) is read as it is."""
    record = hub_mod.save(tmp_path, np.array([0, 1]), np.array([0.2, 0.4]))
    assert record["relative_to"] == hub_mod.HUB_RELATIVE_TO
    del record["relative_to"]
    table = Hubness.open(tmp_path, {hub_mod.HUB_KEY: record})
    assert table is not None and np.allclose(table.of([1, 0]), [0.4, 0.2])


def test_saved_table_reads_back_by_id(tmp_path: Path) -> None:
    ids = np.array([7, 3, 11])
    record = hub_mod.save(tmp_path, ids, np.array([0.5, 0.1, 0.3]))
    table = Hubness.open(tmp_path, {hub_mod.HUB_KEY: record})
    assert table is not None
    assert np.allclose(table.of([3, 11, 7]), [0.1, 0.3, 0.5])
    assert np.allclose(table.of([4]), [0.3])  # unknown id: the average, a neutral shift
    assert Hubness.open(tmp_path, {}) is None
    (tmp_path / hub_mod.HUB_FILE).write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="rebuild the index"):
        Hubness.open(tmp_path, {hub_mod.HUB_KEY: record})


def test_an_index_build_keeps_its_hubness_and_an_edit_drops_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    db = unit(rng.standard_normal((60, 16))).astype(np.float32)
    stamp = ModelStamp("teacher@1", "a" * 64, 16)
    items = [Entry(tmp_path / f"img{i:03d}.jpg", str(i), utm=(500000.0 + 2 * i, 4e6)) for i in range(70)]
    store = IndexStore(tmp_path / "indexes")
    ref = store.build_from_descriptors("gp", db, items[:60], tmp_path, stamp)
    m = store.manifest(ref)
    assert m[hub_mod.HUB_KEY]["file"] in m["files"]
    index = store.load(ref)
    try:
        assert index.hubness is not None
        assert np.allclose(index.hubness.of(range(60)), hubness(db, [it.utm for it in items[:60]]), atol=1e-6)
    finally:
        index.close()
    edited = store.add_descriptors("gp", unit(rng.standard_normal((10, 16))), items[60:], stamp)
    assert hub_mod.HUB_KEY not in store.manifest(edited)
    index = store.load(edited)
    try:
        assert index.hubness is None  # the tracker then weighs raw scores
    finally:
        index.close()


def test_step_similarity_is_the_cosine_of_places_one_spacing_apart() -> None:
    rng = np.random.default_rng(5)
    walk = unit(np.cumsum(rng.standard_normal((80, 32)), axis=0))  # a random walk: neighbours alike
    consecutive = np.sum(walk[1:] * walk[:-1], axis=1)
    record = hub_mod.step_similarity(walk)
    assert record is not None and record["pairs"] == 79
    assert record["mean"] == pytest.approx(consecutive.mean(), abs=1e-5)
    assert record["spread"] == pytest.approx(consecutive.std(), abs=1e-5)
    # with positions: the steps of about one spacing (here 3 m); the jump between two laps is no step
    metric = hub_mod.step_similarity(walk, [(500000.0 + 3.0 * i, 4e6) for i in range(80)])
    assert metric == record
    two_laps = hub_mod.step_similarity(np.concatenate([walk, walk]), [(3.0 * i, 0.0) for i in range(80)] * 2)
    assert two_laps is not None and two_laps["pairs"] == 2 * 79 and two_laps["mean"] == pytest.approx(record["mean"])
    views = hub_mod.step_similarity(np.repeat(walk, 2, axis=0), [(3.0 * i, 0.0) for i in range(80) for _ in "ab"])
    assert views is not None and views["pairs"] == 79  # two views per spot: the step between spots counts
    assert hub_mod.step_similarity(walk[:1]) is None  # a single place has no step
    assert hub_mod.step_similarity(np.repeat(walk[:1], 5, axis=0)) is None  # all alike: no spread
    many = unit(rng.standard_normal((20_000, 8)))
    assert hub_mod.step_similarity(many)["pairs"] == hub_mod.STEP_PAIRS  # bounded work at any size


def test_an_index_records_its_step_similarity_and_keeps_it_through_edits(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    db = unit(np.cumsum(rng.standard_normal((40, 16)), axis=0)).astype(np.float32)
    stamp = ModelStamp("teacher@1", "a" * 64, 16)
    items = [Entry(tmp_path / f"img{i:03d}.jpg", str(i)) for i in range(45)]
    store = IndexStore(tmp_path / "indexes")
    ref = store.build_from_descriptors("walk", db, items[:40], tmp_path, stamp)
    record = store.manifest(ref)[hub_mod.STEP_KEY]
    assert record == hub_mod.step_similarity(db)
    index = store.load(ref)
    try:
        assert index.step == (record["mean"], record["spread"])
    finally:
        index.close()
    edited = store.add_descriptors("walk", unit(rng.standard_normal((5, 16))), items[40:], stamp)
    assert store.manifest(edited)[hub_mod.STEP_KEY] == record  # a statistic of the map: kept


def test_a_missing_or_unusable_step_record_means_no_cue(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=hub_mod.__name__)
    assert hub_mod.step_of({}, "old@1") is None  # an index built before the record existed
    assert "old@1: no step_similarity record" in caplog.text and "rebuild the index" in caplog.text
    assert hub_mod.step_of({hub_mod.STEP_KEY: {"mean": 0.5, "spread": 0.1}}) == (0.5, 0.1)
    bad_records = ({"mean": 0.5}, {"mean": 0.5, "spread": 0.0}, {"mean": "x", "spread": 0.1}, {"mean": 2, "spread": 1})
    for bad in bad_records:
        assert hub_mod.step_of({hub_mod.STEP_KEY: bad}, "idx@1") is None
    assert "idx@1: unusable step_similarity record" in caplog.text
