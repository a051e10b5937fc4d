"""IndexStore on synthetic descriptors: exact answers, factory specs, search
parameters, copy-on-write edits, compatibility checks, publication safety."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from vpr.index import faiss_backend as fb
from vpr.index.knn import exact_knn
from vpr.index.meta import Entry
from vpr.index.store import (
    Hit,
    IndexMismatch,
    IndexRef,
    IndexStore,
    IndexStoreError,
    LoadedIndex,
    ModelStamp,
    check_compatible,
)
from vpr.index.synthetic import clustered_descriptors

DIM = 32
TEACHER = ModelStamp("teacher@1", "a" * 64, DIM)


def entries(n: int, root: Path, start: int = 0) -> list[Entry]:
    return [
        Entry(
            root / f"db/img{i:05d}.jpg",
            f"place{i // 3}",
            utm=(500000.0 + i, 4000000.0 + 2 * i),
            utm_zone="56H",
            latlon=(-27.0 - i * 1e-5, 153.0),
            extra={"frame": i},
        )
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data():
    db, q, src = clustered_descriptors(1200, DIM, n_queries=60, seed=3)
    return db, q


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "indexes")


def build(store: IndexStore, db: np.ndarray, root: Path, factory: str = "Flat", name: str = "gp", **kw) -> IndexRef:
    return store.build_from_descriptors(name, db, entries(len(db), root), root, TEACHER, factory=factory, **kw)


def test_flat_returns_the_true_neighbours_with_metadata(store, data, tmp_path):
    db, q = data
    ref = build(store, db, tmp_path)
    assert str(ref) == "gp@1" and store.active("gp") == ref
    index = store.load("gp")
    assert isinstance(index, LoadedIndex) and (index.dim, index.count) == (DIM, len(db))
    hits = index.search(q, 5)
    scores, ids = exact_knn(db, q, 5)
    assert [[h.id for h in row] for row in hits] == ids.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, rtol=1e-5)
    h: Hit = hits[0][0]
    i = h.id
    assert h.meta == {
        "path": f"db/img{i:05d}.jpg",
        "label": f"place{i // 3}",
        "utm_e": 500000.0 + i,
        "utm_n": 4000000.0 + 2 * i,
        "utm_zone": "56H",
        "lat": pytest.approx(-27.0 - i * 1e-5),
        "lon": 153.0,
        "extra": {"frame": i},
    }
    assert index.image_path(h) == tmp_path.resolve() / h.meta["path"]
    # Unnormalised queries give the same answer (the store normalises), 1-D too.
    again = index.search(q[0] * 7.5, 5)[0]
    assert [h.id for h in again] == [h.id for h in hits[0]]
    assert [h.score for h in again] == pytest.approx([h.score for h in hits[0]], rel=1e-5)


def test_search_validates_its_input(store, data, tmp_path):
    db, q = data
    build(store, db[:50], tmp_path)
    index = store.load("gp")
    with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
        index.search(q[:, :16], 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(q, 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match=r"\['nprobe'\] do not apply to a IndexFlatIP"):
        index.search(q, 3, params={"nprobe": 4})
    assert [len(r) for r in index.search(q[:2], 80)] == [50, 50]  # k > count: no -1 placeholders


# Small PQ codebooks (x4: 16 centroids) keep training fast on 2 cores.
# (spec, params, min recall@1, min rate of the true neighbour in the top 10)
SPECS = [
    ("Flat", None, 1.0, 1.0),
    ("HNSW16", {"efSearch": 64}, 0.95, 1.0),
    ("IVF16,Flat", {"nprobe": 16}, 1.0, 1.0),
    ("IVF16,PQ8x4", {"nprobe": 4}, 0.3, 0.9),
    ("PCA16,Flat", None, 0.4, 0.9),
    ("PCA16,L2norm,HNSW8", {"efSearch": 32}, 0.7, 0.95),
    ("PCA16,IVF8,PQ8x4", {"nprobe": 8}, 0.1, 0.6),
    ("IVF16,SQ8", {"nprobe": 16}, 0.95, 1.0),
]


@pytest.mark.parametrize("spec,params,min_r1,min_r10", SPECS, ids=[s[0] for s in SPECS])
def test_each_factory_spec_builds_and_searches(store, data, tmp_path, spec, params, min_r1, min_r10):
    db, q = data
    build(store, db, tmp_path, factory=spec)
    index = store.load("gp")
    assert index.manifest["factory"] == spec
    assert set(index.param_names) >= set(params or {})
    _, gt = exact_knn(db, q, 1)
    _, ids = index.search_ids(q, 10, params)
    r1 = float((ids[:, 0] == gt[:, 0]).mean())
    r10 = float((ids == gt).any(axis=1).mean())
    assert r1 >= min_r1 and r10 >= min_r10, f"{spec}: recall@1 {r1}, true neighbour in top 10 {r10}"
    assert (ids >= 0).all() and (ids < len(db)).all()


def test_search_parameters_apply_per_call(store, data, tmp_path):
    """nprobe changes results for that call only; concurrent callers with
    different settings each get their own (nothing shared is mutated)."""
    db, q = data
    build(store, db, tmp_path, factory="IVF64,Flat")
    index = store.load("gp")
    _, gt = exact_knn(db, q, 5)
    low = index.search_ids(q, 5, {"nprobe": 1})[1]
    full = index.search_ids(q, 5, {"nprobe": 64})[1]
    assert (full == gt).all()
    assert (low != gt).any(), "nprobe=1 over 64 lists should miss some neighbours"
    default = index.search_ids(q, 5)[1]
    errors: list[BaseException] = []

    def worker(nprobe: int, expect: np.ndarray) -> None:
        try:
            for _ in range(20):
                assert (index.search_ids(q, 5, {"nprobe": nprobe})[1] == expect).all()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=a) for a in [(1, low), (64, full)] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (index.search_ids(q, 5)[1] == default).all()
    with pytest.raises(ValueError, match="positive integer"):
        index.search(q, 5, {"nprobe": 0})
    with pytest.raises(ValueError, match=r"accepts \['nprobe', 'max_codes'\]"):
        index.search(q, 5, {"efSearch": 8})


def test_hnsw_ef_search_matters(store, data, tmp_path):
    db, q = data
    build(store, db, tmp_path, factory="HNSW4")
    index = store.load("gp")
    _, gt = exact_knn(db, q, 10)
    r_low = (index.search_ids(q, 10, {"efSearch": 10})[1] == gt).mean()
    r_high = (index.search_ids(q, 10, {"efSearch": 400})[1] == gt).mean()
    assert r_high > r_low and r_high > 0.95


def test_too_few_vectors_to_train_is_a_clear_error(store, data, tmp_path):
    db, _ = data
    with pytest.raises(
        fb.FactoryError, match=r"'IVF1024,Flat' needs at least 1024 vectors to train, the database has 100"
    ):
        build(store, db[:100], tmp_path, factory="IVF1024,Flat")
    with pytest.raises(fb.FactoryError, match="needs at least 256 vectors"):
        build(store, db[:100], tmp_path, factory="IVF4,PQ8")
    assert store.versions("gp") == [] and not list((store.root / "gp").glob(".tmp-*"))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("Nope12", "bad factory spec 'Nope12'"),
        ("IVF16,PQ5", "bad factory spec"),
        ("IDMap2,Flat", "leave out IDMap"),
        ("", "empty factory spec"),
    ],
)
def test_bad_factory_spec_names_the_problem(store, data, tmp_path, spec, match):
    with pytest.raises(fb.FactoryError, match=match):
        build(store, data[0][:300], tmp_path, factory=spec)


EDIT_SPECS = ["Flat", "IVF16,Flat", "HNSW16", "PCA16,HNSW8", "PCA16,IVF8,Flat", "IVF16,PQ8x4"]


@pytest.mark.parametrize("spec", EDIT_SPECS)
def test_add_and_remove_make_new_versions_with_stable_ids(store, data, tmp_path, spec):
    db, q = data
    n = 900
    build(store, db[:n], tmp_path, factory=spec)
    v1 = store.load("gp")
    before = v1.search_ids(q, 5, {"nprobe": 16} if "IVF" in spec else None)
    exact = "PQ" not in spec and "PCA" not in spec
    # remove: the removed ids never come back; the rest keep their ids and metadata
    _, gt = exact_knn(db[:n], q, 1)
    gone = sorted(set(gt[:, 0].tolist()))[:10]
    ref2 = store.remove("gp", ids=gone)
    assert ref2 == IndexRef("gp", 2) and store.active("gp") == ref2
    v2 = store.load("gp")
    assert v2.count == n - len(gone) and v2.manifest["derived_from"] == "gp@1"
    params = {"nprobe": 16} if "IVF" in spec else ({"efSearch": 128} if "HNSW" in spec else None)
    _, ids2 = v2.search_ids(q, 10, params)
    assert not set(ids2.ravel().tolist()) & set(gone)
    if exact:
        keep = np.setdiff1d(np.arange(n), gone)
        _, gt2 = exact_knn(db[keep], q, 1)
        assert (ids2[:, 0] == keep[gt2[:, 0]]).mean() >= 0.95
    assert (
        v2.meta([gone[0]]) == {}
        and v2.meta([int(ids2[0, 0])])[int(ids2[0, 0])]["path"] == f"db/img{int(ids2[0, 0]):05d}.jpg"
    )
    # add: new items get fresh ids after the largest ever used
    new = db[n : n + 40]
    ref3 = store.add_descriptors("gp", new, entries(40, tmp_path, start=n), TEACHER)
    v3 = store.load("gp")
    assert ref3.version == 3 and v3.count == n - len(gone) + 40
    hits = v3.search(new[:10], 1, params)
    found = [h[0].id for h in hits]
    assert found == list(range(n, n + 10)) or ("PQ" in spec and sum(f >= n for f in found) >= 7)
    assert hits[0][0].meta["path"] == f"db/img{n:05d}.jpg"
    # the old versions are untouched (copy-on-write)
    assert (v1.search_ids(q, 5, {"nprobe": 16} if "IVF" in spec else None)[1] == before[1]).all()
    assert store.load("gp@1").count == n
    assert [i["operation"] for i in store.info("gp")] == ["build 900", "remove 10", "add 40"]


def test_remove_by_path_and_label_and_refusals(store, data, tmp_path):
    db, _ = data
    build(store, db[:30], tmp_path)
    ref = store.remove("gp", paths=[tmp_path / "db/img00000.jpg", "db/img00001.jpg"], labels=["place5"])
    index = store.load(ref)
    assert index.count == 30 - 2 - 3
    assert index.meta(range(30)).keys() == set(range(30)) - {0, 1, 15, 16, 17}
    with pytest.raises(IndexStoreError, match=r"has no ids \[999\]"):
        store.remove("gp", ids=[999])
    with pytest.raises(IndexStoreError, match="has no images"):
        store.remove("gp", paths=["db/nothing.jpg"])
    with pytest.raises(IndexStoreError, match="has no place labels"):
        store.remove("gp", labels=["nowhere"])
    with pytest.raises(ValueError, match="nothing to remove"):
        store.remove("gp")
    with pytest.raises(IndexStoreError, match="would leave index gp@2 empty"):
        store.remove("gp", ids=index.meta(range(30)).keys())
    with pytest.raises(IndexStoreError, match="already has 1 of these images"):
        store.add_descriptors("gp", db[:1], entries(1, tmp_path, start=3), TEACHER)
    other = ModelStamp("student@1", "b" * 64, DIM)
    with pytest.raises(IndexMismatch, match="cannot add descriptors from student@1"):
        store.add_descriptors("gp", db[:1], entries(1, tmp_path, start=100), other)
    assert store.versions("gp") == [1, 2]


def test_paths_outside_the_root_are_refused(store, data, tmp_path):
    with pytest.raises(ValueError, match="not under the index root"):
        store.build_from_descriptors(
            "gp", data[0][:2], [Entry(Path("/elsewhere/a.jpg")), Entry(Path("b.jpg"))], tmp_path / "root", TEACHER
        )


def test_manifest_records_what_loading_checks(store, data, tmp_path):
    db, _ = data
    ref = build(store, db[:100], tmp_path, factory="HNSW8")
    m = json.loads((store.dir(ref) / "manifest.json").read_text())
    assert {k: m[k] for k in ("name", "version", "model", "model_sha256", "dim", "count", "factory", "root")} == {
        "name": "gp",
        "version": 1,
        "model": "teacher@1",
        "model_sha256": "a" * 64,
        "dim": DIM,
        "count": 100,
        "factory": "HNSW8",
        "root": str(tmp_path.resolve()),
    }
    assert m["created"] and set(m["files"]) == {"index.faiss", "meta.sqlite", "hubness.npz"}
    assert store.verify("gp")["version"] == 1
    path = store.dir(ref) / "index.faiss"
    data_ = bytearray(path.read_bytes())
    data_[-1] ^= 0xFF
    path.write_bytes(bytes(data_))
    with pytest.raises(IndexStoreError, match="sha256"):
        store.verify("gp")
    path.write_bytes(bytes(data_[:-10]))
    with pytest.raises(IndexStoreError, match="bytes, manifest says"):
        store.load("gp")


def test_model_index_mismatch_is_refused(store, data, tmp_path):
    db, _ = data
    build(store, db[:50], tmp_path)
    m = store.manifest("gp")
    teacher = {"name": "teacher", "version": 1, "sha256": "a" * 64, "descriptor_dim": DIM, "parent": None}
    check_compatible(m, teacher)
    check_compatible(
        m, {"name": "student", "version": 3, "sha256": "c" * 64, "descriptor_dim": DIM, "parent": "teacher@1"}
    )
    with pytest.raises(
        IndexMismatch, match=r"teacher@1 weights sha256 aaaaaaaaaaaa\.\.\., but the model teacher@1 now has"
    ):
        check_compatible(m, {**teacher, "sha256": "d" * 64})
    with pytest.raises(IndexMismatch, match="neither that model nor a student of it .its parent is teacher@2"):
        check_compatible(
            m, {"name": "student", "version": 1, "sha256": "c" * 64, "descriptor_dim": DIM, "parent": "teacher@2"}
        )
    with pytest.raises(IndexMismatch, match="holds 32-d descriptors but model student@1 produces 64-d"):
        check_compatible(
            m, {"name": "student", "version": 1, "sha256": "c" * 64, "descriptor_dim": 64, "parent": "teacher@1"}
        )
    with pytest.raises(IndexMismatch):
        store.load("gp", model={**teacher, "version": 2})
    assert store.load("gp", model=teacher).count == 50


def test_unknown_names_and_versions(store, data, tmp_path):
    with pytest.raises(IndexStoreError, match="no index named 'gp'"):
        store.load("gp")
    with pytest.raises(IndexStoreError, match="bad index name"):
        store.load("../x")
    build(store, data[0][:20], tmp_path, activate=False)
    with pytest.raises(IndexStoreError, match="has no active version; activate one of gp@1"):
        store.load("gp")
    with pytest.raises(IndexStoreError, match=r"index gp@7 not found .*versions: gp@1"):
        store.activate("gp@7")
    assert store.activate("gp@1") == IndexRef("gp", 1) and store.load("gp").count == 20
    assert store.names() == ["gp"]


def test_half_built_folders_are_never_loaded_and_cleaned_by_the_next_build(store, data, tmp_path):
    db, q = data
    build(store, db[:100], tmp_path)
    junk = store.root / "gp" / ".tmp-deadbeef"
    junk.mkdir()
    (junk / "index.faiss").write_bytes(b"half")
    (store.root / "gp" / "7").mkdir()  # a bare number without manifest is not a version either
    assert store.versions("gp") == [1]
    assert store.load("gp").ref.version == 1
    build(store, db[:120], tmp_path)
    assert not junk.exists() and store.versions("gp") == [1, 8]  # the stray "7" is skipped, not reused


def test_crash_between_publication_and_activation_keeps_the_old_active(store, data, tmp_path, monkeypatch):
    db, q = data
    build(store, db[:100], tmp_path)
    expected = store.load("gp").search_ids(q, 3)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the pointer switch")

    monkeypatch.setattr(IndexStore, "activate", crash)
    with pytest.raises(KeyboardInterrupt):
        build(store, db[:200], tmp_path)
    monkeypatch.undo()
    assert store.active("gp").version == 1 and store.versions("gp") == [1, 2]
    assert (store.load("gp").search_ids(q, 3)[1] == expected[1]).all()
    assert store.load("gp@2").count == 200  # complete, loadable, just not active


def test_concurrent_searches_during_activate_all_succeed(store, data, tmp_path):
    """Readers search whatever version is current while a writer builds and
    activates new ones; the server pattern is 'swap the reference'."""
    db, q = data
    build(store, db[:600], tmp_path)
    current = {"index": store.load("gp")}
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                index = current["index"]
                hits = index.search(q[:8], 3)
                assert len(hits) == 8 and all(len(h) == 3 for h in hits)
                assert all(h.meta["path"].startswith("db/img") for row in hits for h in row)
                done[0] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i, spec in enumerate(["HNSW8", "IVF8,Flat", "Flat"]):
            old = current["index"]
            ref = build(store, db[: 700 + 100 * i], tmp_path, factory=spec)
            current["index"] = store.load(ref)
            store.activate("gp@1")  # flip the pointer back and forth under the readers
            store.activate(ref)
            assert old.search(q[:1], 1)[0]  # the previous object stays valid after the swap
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert done[0] > 10 and store.active("gp").version == 4


def test_concurrent_writers_both_land(store, data, tmp_path):
    db, _ = data
    build(store, db[:100], tmp_path)
    errors: list[BaseException] = []

    def add(start: int) -> None:
        try:
            store.add_descriptors("gp", db[start : start + 10], entries(10, tmp_path, start=start), TEACHER)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=(s,)) for s in (200, 300, 400)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.versions("gp") == [1, 2, 3, 4] and store.load("gp").count == 130


def test_prune_keeps_the_active_version(store, data, tmp_path):
    db, _ = data
    for i in range(4):
        build(store, db[: 50 + i], tmp_path)
    store.activate("gp@1")
    removed = store.prune("gp", keep=2)
    assert removed == [IndexRef("gp", 2)] and store.versions("gp") == [1, 3, 4]
