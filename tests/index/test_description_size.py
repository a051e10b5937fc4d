"""The index records the size its images were described at, and the server
prepares queries at that size (small_policy `database`, issue 12)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_CONFIG, random_images
from vpr.index.meta import DESCRIPTION_KEY, description_record, merge_records, query_side, side_record
from vpr.index.store import IndexStore
from vpr.model.network import build_model
from vpr.model.registry import Registry
from vpr.server.metrics import Metrics
from vpr.server.service import QueryService
from vpr.server.serving import Serving
from vpr.settings import ServerSettings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("size")
    reg = Registry(base / "models")
    torch.manual_seed(0)
    reg.register("teacher", build_model(TINY_CONFIG), role="teacher")  # max_side 96, policy `database` (default)
    old = {**TINY_CONFIG, "preprocess": {**TINY_CONFIG["preprocess"], "small_policy": "upsample"}}
    reg.register("old", build_model(old), role="teacher")
    db = base / "db"
    small = random_images(db / "small", 5, size=(48, 36), seed=1)
    large = random_images(db / "large", 3, size=(200, 150), seed=2)
    extra = random_images(db / "extra", 4, size=(80, 60), seed=3)
    return reg, db, small + large, extra


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def service() -> QueryService:
    return QueryService(ServerSettings(), None, None, None, Metrics())  # type: ignore[arg-type]


def test_side_record_takes_the_lower_median():
    assert side_record({}) is None
    rec = side_record({96: 3, 48: 5})
    assert rec == {"side": 48, "sides": {"48": 5, "96": 3}, "count": 8, "min": 48, "max": 96}
    assert side_record({48: 4, 96: 4})["side"] == 48 and side_record({48: 3, 96: 4})["side"] == 96
    assert merge_records(rec, side_record({80: 4}))["sides"] == {"48": 5, "80": 4, "96": 3}
    assert query_side({}) is None and query_side({DESCRIPTION_KEY: rec}) == 48


def test_index_records_its_description_size_and_the_server_applies_it(world, tmp_path):
    reg, db, paths, extra = world
    teacher = reg.load("teacher@1")
    store = IndexStore(tmp_path / "indexes")
    ref = store.build("place", teacher, paths, db, batch_size=4)
    index = store.load(ref, model=teacher)
    # database images at their own size, capped at max_side 96, never upsampled
    assert index.manifest[DESCRIPTION_KEY] == {
        "side": 48,
        "sides": {"48": 5, "96": 3},
        "count": 8,
        "min": 48,
        "max": 96,
    }
    serving = Serving(teacher, index, torch.device("cpu"))
    assert (serving.preprocess.max_side, serving.preprocess.small_policy) == (48, "upsample")
    svc = service()
    assert tuple(svc.decode(serving, jpeg((200, 150)), "big").tensor.shape) == (3, 36, 48)  # capped
    assert tuple(svc.decode(serving, jpeg((24, 18)), "tiny").tensor.shape) == (3, 36, 48)  # upsampled
    # adding images merges their sizes into the record
    added = store.add(ref, teacher, extra, db)
    assert store.manifest(added)[DESCRIPTION_KEY]["sides"] == {"48": 5, "80": 4, "96": 3}


def test_indexes_without_the_record_and_explicit_policies_keep_todays_behaviour(world, tmp_path):
    reg, db, paths, _ = world
    teacher, old = reg.load("teacher@1"), reg.load("old@1")
    store = IndexStore(tmp_path / "indexes")
    desc = np.random.default_rng(0).standard_normal((len(paths), teacher.net.descriptor_dim)).astype(np.float32)
    before = store.load(store.build_from_descriptors("before", desc, paths, db, teacher), model=teacher)
    assert DESCRIPTION_KEY not in before.manifest
    serving = Serving(teacher, before, torch.device("cpu"))
    assert tuple(service().decode(serving, jpeg((24, 18)), "tiny").tensor.shape) == (3, 72, 96)  # upsample to 96
    # a model registered with `upsample` ignores the record: its own rule, as before
    rec = store.load(store.build("up", old, paths, db, batch_size=4), model=old)
    assert rec.manifest[DESCRIPTION_KEY]["side"] == 96  # its database images were upsampled to 96
    assert Serving(old, rec, torch.device("cpu")).preprocess == old.net.config.preprocess


def test_description_record_skips_unreadable_files(tmp_path: Path):
    good = random_images(tmp_path, 2, size=(64, 48))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    from vpr.model.config import PreprocessConfig

    rec = description_record([*good, bad], PreprocessConfig(max_side=96, small_policy="native"))
    assert rec is not None and rec["count"] == 2 and rec["side"] == 64
