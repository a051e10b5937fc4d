"""The database-relative input size (small_policy `database`, issue 12)."""

from __future__ import annotations

import pytest
from PIL import Image

from vpr.model.config import ModelConfig, PreprocessConfig
from vpr.model.preprocess import database_config, image_side, input_side, query_config, target_size, to_input


def test_new_models_default_to_the_database_rule_and_old_policies_are_unchanged():
    assert PreprocessConfig().small_policy == "database"
    assert ModelConfig().preprocess.small_policy == "database"
    up = PreprocessConfig(max_side=640, small_policy="upsample")
    native = PreprocessConfig(max_side=640, small_policy="native")
    for cfg in (up, native):  # the rule leaves explicit policies alone
        assert database_config(cfg) is cfg and query_config(cfg, 160) is cfg
    assert target_size(160, 120, up) == (640, 480) and target_size(160, 120, native) == (160, 120)


def test_database_images_are_never_upsampled_and_large_ones_are_capped():
    db = database_config(PreprocessConfig(max_side=640))
    assert db.small_policy == "native"
    assert target_size(160, 120, db) == (160, 120)
    assert target_size(960, 540, db) == (640, 360)
    assert input_side(160, db) == 160 and input_side(1920, db) == 640


@pytest.mark.parametrize(
    ("query", "want"),
    [((90, 68), (160, 121)), ((160, 120), (160, 120)), ((960, 720), (160, 120)), ((120, 160), (120, 160))],
)
def test_queries_are_resized_to_the_database_side_up_or_down(query, want):
    q = query_config(PreprocessConfig(max_side=640), 160)
    assert (q.max_side, q.small_policy) == (160, "upsample")
    assert target_size(*query, q) == want
    x = to_input(Image.new("RGB", query, (40, 90, 200)), q)
    assert tuple(x.shape) == (3, want[1], want[0])


def test_without_a_recorded_side_queries_keep_the_old_default():
    cfg = PreprocessConfig(max_side=640)
    old = PreprocessConfig(max_side=640, small_policy="upsample")
    assert target_size(90, 68, query_config(cfg, None)) == target_size(90, 68, old) == (640, 484)
    assert target_size(90, 68, cfg) == (640, 484)  # an unresolved rule behaves as upsample


def test_recorded_side_is_kept_within_min_and_max_side():
    cfg = PreprocessConfig(max_side=640)
    assert query_config(cfg, 8).max_side == cfg.min_side
    assert query_config(cfg, 4000).max_side == 640


def test_image_side_reads_the_header(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (37, 81)).save(p)
    assert image_side(p) == 81
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    assert image_side(bad) is None
