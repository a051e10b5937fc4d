"""The one description path gives the descriptors the code before it gave.

`tests/fixtures/describe_reference.safetensors` was written by the description
code before `describe/` existed (`train.evaluate.describe_images` at main
@3631e4d, the script is in its metadata's `source`): a VGG16+NetVLAD teacher
on the shared caffe weights (max side 320, NetVLAD from seeded centroids,
saved in the file) describing eight Gardens Point images at three qualities.
Here the same teacher is rebuilt, registered (so it has a weights hash) and
run through `describe`; every descriptor must match its reference to float
tolerance (np.allclose, rtol 1e-4, atol 1e-5, per element), and a second
call must be served from the cache with identical values.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vpr.describe.cache import DescriptorCache
from vpr.describe.describe import describe
from vpr.model.config import ModelConfig
from vpr.model.network import build_model
from vpr.model.registry import Registry
from vpr.model.weights import load_vgg16_features

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "describe_reference.safetensors"
QUALITIES = ("orig", "h180-jpeg20", "h240-h264-qp38")


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(REFERENCE), "pt") as f:
        meta = dict(f.metadata())
    return meta, load_file(str(REFERENCE))


@pytest.mark.slow
def test_describe_gives_the_reference_descriptors(shared_dir: Path, reference, tmp_path: Path, one_torch_thread):
    meta, tensors = reference
    torch.manual_seed(0)
    net = build_model(ModelConfig.model_validate_json(meta["config"]))
    load_vgg16_features(net, shared_dir / "weights" / "vgg16_imagenet_caffe_features.safetensors")
    net.netvlad.load_state_dict({k.removeprefix("netvlad."): v for k, v in tensors.items() if k.startswith("netvlad.")})
    registry = Registry(tmp_path / "models")
    model = registry.load(registry.register("teacher", net.eval(), role="teacher"), device="cpu")
    cache = DescriptorCache(tmp_path / "cache")
    gardens = shared_dir / "datasets" / "gardens_point_walking"
    sets: dict[str, list[int]] = ast.literal_eval(meta["sets"])
    checked = 0
    for part, ids in sets.items():
        paths = [gardens / part / f"Image{i:03d}.jpg" for i in ids]
        for q in QUALITIES:
            want = tensors[f"{part}/{q}"].numpy()
            got = describe(model, paths, q, cache=cache)
            assert got.computed == len(paths) and got.cached == 0
            assert got.desc.dtype == np.float32 and got.desc.shape == want.shape
            np.testing.assert_allclose(got.desc, want, rtol=1e-4, atol=1e-5, err_msg=f"{part} at {q}")
            again = describe(model, paths, q, cache=cache)
            assert again.computed == 0 and again.cached == len(paths), f"{part} at {q}: not served from the cache"
            assert np.array_equal(again.desc, got.desc)
            assert np.array_equal(again.nbytes, got.nbytes) and np.array_equal(again.kbps, got.kbps, equal_nan=True)
            checked += len(paths)
    assert checked == 24
