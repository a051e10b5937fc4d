"""The Milvus backend (Milvus Lite, a local file) answers like FAISS Flat.

Without pymilvus and milvus-lite (the optional extra 'milvus'), or where
Milvus Lite cannot start, these tests skip with the reason; in CI (CI=true)
they fail instead, so that CI cannot go green without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import skip_or_fail
from vpr.index import faiss_backend as fb
from vpr.index.meta import Entry
from vpr.index.store import IndexStore, ModelStamp
from vpr.index.synthetic import clustered_descriptors
from vpr.settings import IndexSettings

try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
except ImportError as e:
    skip_or_fail(f"Milvus tests need pymilvus and milvus-lite (optional extra 'milvus'): {e}", module=True)

STAMP = ModelStamp("teacher@1", "a" * 64, 48)


def items(n: int, root: Path, start: int = 0) -> list[Entry]:
    return [Entry(root / f"img{i}.jpg", f"p{i // 2}") for i in range(start, start + n)]


@pytest.fixture(scope="module")
def data():
    db, q, _ = clustered_descriptors(700, 48, n_queries=40, seed=7)
    return db, q


@pytest.fixture
def stores(tmp_path: Path):
    milvus = IndexStore(tmp_path / "m", IndexSettings(backend="milvus", milvus_uri=str(tmp_path / "lite.db")))
    try:
        milvus._backend().client()
    except Exception as e:  # Milvus Lite needs a supported OS/arch and a writable local port
        skip_or_fail(f"Milvus Lite cannot start here: {e}")
    yield IndexStore(tmp_path / "f"), milvus
    from vpr.index.milvus_backend import close_clients

    close_clients()


def test_milvus_returns_the_same_top_k_as_faiss_flat(stores, data, tmp_path):
    faiss_store, milvus_store = stores
    db, q = data
    for s in stores:
        s.build_from_descriptors("gp", db, items(len(db), tmp_path), tmp_path, STAMP)
    f, m = faiss_store.load("gp"), milvus_store.load("gp")
    assert m.manifest["backend"] == "milvus" and m.manifest["milvus_collection"].startswith("vpr_gp_")
    fs, fi = f.search_ids(q, 10)
    ms, mi = m.search_ids(q, 10)
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, atol=1e-5)
    fh, mh = f.search(q[:3], 4), m.search(q[:3], 4)
    assert [[(h.id, h.meta) for h in row] for row in mh] == [[(h.id, h.meta) for h in row] for row in fh]


def test_milvus_edits_are_copy_on_write(stores, data, tmp_path):
    _, store = stores
    db, q = data
    store.build_from_descriptors("gp", db[:500], items(500, tmp_path), tmp_path, STAMP)
    v1 = store.load("gp")
    before = v1.search_ids(q, 5)[1]
    top = sorted(set(before[:, 0].tolist()))[:5]
    store.remove("gp", ids=top)
    store.add_descriptors("gp", db[500:520], items(20, tmp_path, start=500), STAMP)
    v3 = store.load("gp")
    assert v3.count == 515 and v3.ref.version == 3
    ids = v3.search_ids(q, 5)[1]
    assert not set(ids.ravel().tolist()) & set(top)
    assert [h[0].id for h in v3.search(db[500:505], 1)] == list(range(500, 505))
    np.testing.assert_array_equal(v1.search_ids(q, 5)[1], before)  # the old version is undisturbed
    np.testing.assert_array_equal(store.load("gp@1").search_ids(q, 5)[1], before)


def test_milvus_refuses_what_it_cannot_do(stores, data, tmp_path):
    _, store = stores
    db, q = data
    with pytest.raises(fb.FactoryError, match="Milvus has no PCA"):
        store.build_from_descriptors("gp", db, items(len(db), tmp_path), tmp_path, STAMP, factory="PCA16,Flat")
    store.build_from_descriptors("gp", db, items(len(db), tmp_path), tmp_path, STAMP, factory="IVF8,Flat")
    index = store.load("gp")
    assert index.param_names == ("nprobe",)
    assert len(index.search(q[:2], 3, {"nprobe": 8})[0]) == 3
    with pytest.raises(ValueError, match="efSearch"):
        index.search(q[:2], 3, {"efSearch": 8})


def test_unreachable_milvus_is_a_clear_error(data, tmp_path):
    from vpr.index.milvus_backend import MilvusUnavailable

    store = IndexStore(tmp_path / "m", IndexSettings(backend="milvus", milvus_uri="http://127.0.0.1:9"))
    db, _ = data
    with pytest.raises(MilvusUnavailable, match="cannot connect to Milvus at http://127.0.0.1:9"):
        store.build_from_descriptors("gp", db[:50], items(50, tmp_path), tmp_path, STAMP)
    assert store.versions("gp") == [] and not list((store.root / "gp").glob(".tmp-*"))
    with pytest.raises(ValueError, match="expected http"):
        IndexSettings(backend="milvus", milvus_uri="milvus.example:19530")
