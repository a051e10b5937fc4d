"""THE description path and its cache: what the key covers, corrupt shards,
resuming after a kill, extras, undecodable images, one decode for several models."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import vpr.describe.describe as dd
from tests.conftest import TINY_CONFIG, random_images
from vpr.describe.cache import Context, DescriptorCache, image_sha256
from vpr.describe.describe import describe, describe_many
from vpr.media.degrade import parse_quality
from vpr.model.config import PreprocessConfig
from vpr.model.extract import embed_inputs
from vpr.model.network import build_model
from vpr.model.preprocess import load_image, to_input
from vpr.model.registry import LoadedModel, Registry


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Two tiny models with different weights; six images."""
    base = tmp_path_factory.mktemp("describe")
    reg = Registry(base / "models")
    torch.manual_seed(0)
    net = build_model(TINY_CONFIG)
    a = reg.register("a", net, role="teacher")
    torch.manual_seed(1)
    b = reg.register("b", build_model(TINY_CONFIG), role="teacher")
    images = random_images(base / "images", 6, seed=3)
    return {"reg": reg, "a": str(a), "b": str(b), "images": images}


@pytest.fixture
def models(world) -> dict[str, LoadedModel]:
    return {k: world["reg"].load(world[k]) for k in ("a", "b")}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def direct(model: LoadedModel, paths: list[Path]) -> np.ndarray:
    """The forward pass alone, without the describe loop."""
    cfg = model.net.config.preprocess
    return embed_inputs(model.net, [to_input(load_image(p), cfg) for p in paths])[0]


def test_context_digest_covers_what_changes_a_descriptor():
    base = Context("a" * 64, PreprocessConfig(max_side=96), parse_quality("h30-jpeg20"), "cpu-fp32")
    variants = [
        Context("b" * 64, base.preprocess, base.quality, base.device_kind),
        Context(base.weights_sha256, PreprocessConfig(max_side=128), base.quality, base.device_kind),
        Context(base.weights_sha256, PreprocessConfig(max_side=96, small_policy="native"), base.quality, "cpu-fp32"),
        Context(base.weights_sha256, PreprocessConfig(max_side=96, mode="imagenet"), base.quality, "cpu-fp32"),
        Context(base.weights_sha256, base.preprocess, parse_quality("h30-jpeg21"), base.device_kind),
        Context(base.weights_sha256, base.preprocess, base.quality, "cuda-bf16"),
        Context(base.weights_sha256, base.preprocess, base.quality, base.device_kind, ("gram-v1",)),
    ]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == len(variants) + 1
    same = Context("a" * 64, PreprocessConfig(max_side=96), parse_quality("h30-jpeg20"), "cpu-fp32")
    assert same.digest() == base.digest()
    video = Context("a" * 64, base.preprocess, parse_quality("h30-h264-qp40"), "cpu-fp32").fields()
    assert "pyav" in video and video["degrade_version"] >= 1 and "pyav" not in base.fields()


def test_describe_matches_the_forward_pass_and_caches(world, models, tmp_path):
    paths, cache = world["images"], DescriptorCache(tmp_path / "cache")
    first = describe(models["a"], paths, cache=cache, batch_size=4)
    assert first.computed == 6 and first.cached == 0
    np.testing.assert_allclose(first.desc, direct(models["a"], paths), rtol=1e-4, atol=1e-6)
    again = describe(models["a"], paths, cache=cache)
    assert again.computed == 0 and again.cached == 6 and np.array_equal(again.desc, first.desc)
    # other weights (same architecture and preprocessing): other entries
    other = describe(models["b"], paths, cache=cache)
    assert other.computed == 6 and not np.allclose(other.desc, first.desc)
    # another quality, another policy: new keys
    assert describe(models["a"], paths, "h40", cache=cache).computed == 6
    assert describe(models["a"], paths, "h40", cache=cache, policy="native").computed == 6
    assert describe(models["a"], paths, "h40", cache=cache, policy="upsample").cached == 6


def test_changed_image_content_is_a_new_key(world, models, tmp_path):
    paths = random_images(tmp_path / "imgs", 3, seed=7)
    cache = DescriptorCache(tmp_path / "cache")
    before = describe(models["a"], paths, cache=cache)
    old_hash = image_sha256(paths[1])
    random_images(tmp_path / "other", 3, seed=8)[1].replace(paths[1])  # same name, new pixels
    assert image_sha256(paths[1]) != old_hash
    after = describe(models["a"], paths, cache=cache)
    assert after.computed == 1 and after.cached == 2
    assert np.array_equal(after.desc[[0, 2]], before.desc[[0, 2]]) and not np.allclose(after.desc[1], before.desc[1])
    np.testing.assert_allclose(after.desc[1], direct(models["a"], [paths[1]])[0], rtol=1e-4, atol=1e-6)
    # a copy elsewhere is the same image
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(paths[0].read_bytes())
    assert describe(models["a"], [copy], cache=cache).cached == 1


def test_a_corrupt_shard_is_logged_and_recomputed(world, models, tmp_path, caplog):
    paths, cache = world["images"], DescriptorCache(tmp_path / "cache")
    first = describe(models["a"], paths, cache=cache, batch_size=2, chunk_size=4)
    shards = sorted(cache.root.rglob("shard-*"))
    assert len(shards) == 2  # 4 + 2 images
    desc = shards[0] / "desc.npy"
    desc.write_bytes(desc.read_bytes()[:200])  # truncated
    with caplog.at_level(logging.WARNING):
        again = describe(models["a"], paths, cache=cache, batch_size=2, chunk_size=4)
    assert "unreadable descriptor cache shard" in caplog.text and str(shards[0]) in caplog.text
    assert again.computed == 4 and again.cached == 2
    np.testing.assert_allclose(again.desc, first.desc, rtol=1e-5, atol=1e-7)
    assert not shards[0].exists()
    assert describe(models["a"], paths, cache=cache).cached == 6


def test_a_killed_run_resumes_from_its_finished_chunks(world, models, tmp_path):
    paths, cache = world["images"], DescriptorCache(tmp_path / "cache")

    def dying(done: int, total: int) -> None:
        if done >= 5:
            raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        describe(models["a"], paths, cache=cache, batch_size=1, chunk_size=2, on_progress=dying)
    assert sum(len(np.load(k)) for k in cache.root.rglob("keys.npy")) == 4  # two chunks; the 5th image was lost
    seen: list[tuple[int, int]] = []
    resumed = describe(models["a"], paths, cache=cache, batch_size=1, on_progress=lambda d, t: seen.append((d, t)))
    assert resumed.cached == 4 and resumed.computed == 2
    assert seen == [(4, 6), (5, 6), (6, 6)]
    clean = describe(models["a"], paths)
    np.testing.assert_allclose(resumed.desc, clean.desc, rtol=1e-5, atol=1e-7)


def test_extras_come_from_the_same_pass_in_memory_or_cached(world, models, tmp_path):
    paths = world["images"][:4]

    def energy(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.float().pow(2).mean(dim=(2, 3))  # (1, C)

    plain = describe(models["a"], paths, extras={"energy-v1": energy})
    cache = DescriptorCache(tmp_path / "cache")
    cold = describe(models["a"], paths, cache=cache, extras={"energy-v1": energy})
    warm = describe(models["a"], paths, cache=cache, extras={"energy-v1": energy})
    assert cold.computed == 4 and warm.cached == 4
    net = models["a"].net
    with torch.inference_mode():
        fmaps = [net(to_input(load_image(p), net.config.preprocess)[None], return_features=True)[1] for p in paths]
    want = np.concatenate([energy(f).numpy() for f in fmaps])
    mem = plain.extras["energy-v1"]
    assert isinstance(mem, np.ndarray) and mem.shape == (4, want.shape[1])
    np.testing.assert_allclose(mem, want, rtol=1e-4, atol=1e-6)
    for got in (cold, warm):
        rows = got.extras["energy-v1"]
        assert len(rows) == 4
        assert np.array_equal(rows[[2, 0]], mem[[2, 0]])
    # the descriptors without extras are another context, but the same numbers
    assert np.allclose(describe(models["a"], paths, cache=cache).desc, cold.desc, atol=1e-6)


def test_undecodable_images_raise_or_become_nan_rows(world, models, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    paths = [world["images"][0], bad, world["images"][1]]
    with pytest.raises(ValueError, match=r"broken\.jpg: not a decodable image"):
        describe(models["a"], paths)
    cache = DescriptorCache(tmp_path / "cache")
    out = describe(models["a"], paths, cache=cache, skip_bad=True)
    assert out.computed == 2 and out.skipped == 1
    assert np.isnan(out.desc[1]).all() and not np.isnan(out.desc[[0, 2]]).any()
    again = describe(models["a"], paths, cache=cache, skip_bad=True)
    assert again.cached == 2 and again.skipped == 1  # a failure is never cached
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such image"):
        describe(models["a"], [tmp_path / "missing.jpg"])


def test_several_models_share_one_decode(world, models, tmp_path, monkeypatch):
    paths, cache = world["images"], DescriptorCache(tmp_path / "cache")
    describe(models["a"], paths[:2], "h30-jpeg20", cache=cache)  # a already holds two
    loads: list[Path] = []
    real = dd._load

    def counting(path, q, skip_bad):
        loads.append(path)
        return real(path, q, skip_bad)

    monkeypatch.setattr(dd, "_load", counting)
    a, b = describe_many([models["a"], models["b"]], paths, "h30-jpeg20", cache=cache)
    assert sorted(loads) == sorted(paths)  # each image decoded and degraded once, for both models
    assert (a.cached, a.computed, b.cached, b.computed) == (2, 4, 0, 6)
    assert (a.nbytes > 0).all() and np.array_equal(a.nbytes, b.nbytes)
    np.testing.assert_allclose(b.desc, describe(models["b"], paths, "h30-jpeg20").desc, rtol=1e-5, atol=1e-7)
