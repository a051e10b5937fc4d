"""ONNX export as a registry artifact: round trip against PyTorch at several input
sizes (down to the smallest the preprocessing allows), NetVLAD and PCA included;
int8 calibration reproducible from a seed; tampering refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CONFIG, skip_or_fail
from vpr.cli.main import main
from vpr.describe.describe import describe
from vpr.model.engines import prepare, select_engine
from vpr.model.export import calibration_images, export_model
from vpr.model.fileio import sha256_file
from vpr.model.network import build_model
from vpr.model.registry import Registry, RegistryError

try:
    import onnxruntime as ort
except ImportError:  # the optional `onnx` extra
    skip_or_fail("onnxruntime is not installed (pip install -e '.[onnx]')", module=True)


@pytest.fixture
def reg(home, image_folder) -> Registry:
    """A tiny model with PCA-whitening fitted on real descriptors (so the whole network is exported)."""
    torch.manual_seed(0)
    net = build_model({**TINY_CONFIG, "pca_dim": 4}).eval()
    assert net.pca is not None
    net.pca.fit(np.random.default_rng(0).standard_normal((8, net.netvlad.out_dim)).astype(np.float32))
    r = Registry(home / "models")
    r.register("tiny", net, role="teacher")
    return r


def test_export_round_trip_at_several_sizes(reg, home, image_folder, capsys, one_torch_thread):
    assert main(["--home", str(home), "model", "export", "tiny@1", "--check-images", str(image_folder)]) == 0
    printed = json.loads(capsys.readouterr().out)
    path, entry = reg.artifact("tiny@1", "onnx")
    manifest = reg.manifest("tiny@1")
    assert printed["sha256"] == entry["sha256"] == sha256_file(path) == manifest["artifacts"]["onnx"]["sha256"]
    assert entry["source"] == "tiny@1" and entry["source_sha256"] == manifest["sha256"]
    assert entry["check"]["min_cosine"] > 0.9999 and entry["check"]["checked_inputs"] == 4 + 2
    model = reg.load("tiny@1")
    cfg = model.net.config.preprocess
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    m = cfg.min_side  # the smallest input `to_input` makes
    for n, h, w in ((1, m, m), (1, m, 3 * m), (2, 72, 96), (3, 96, 72), (1, 41, 67)):
        x = torch.rand(n, 3, h, w, generator=g) * 200 - 100
        with torch.inference_mode():
            ref = model.net(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == (n, 4)
        np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=f"{n}x{h}x{w}")
    # the engine runs it on THE description path, with its own cache key
    paths = sorted(image_folder.glob("*.jpg"))
    onnx = describe(model, paths, engine="onnx-fp32")
    np.testing.assert_allclose(onnx.desc, describe(model, paths).desc, atol=2e-5)
    assert prepare(model, "onnx-fp32", "cpu").cache_kind == f"cpu-onnx-fp32-{entry['sha256'][:16]}"
    with pytest.raises(ValueError, match="no conv feature maps"):
        describe(model, paths, engine="onnx-fp32", extras={"mean-v1": lambda f: f.mean((2, 3))})


def test_int8_is_reproducible_from_its_seed(reg, image_folder, one_torch_thread):
    images = sorted(image_folder.glob("*.jpg"))
    assert calibration_images(image_folder, 4, seed=3) == calibration_images(images, 4, seed=3)
    assert calibration_images(image_folder, 4, seed=3) != calibration_images(image_folder, 4, seed=4)
    first = export_model(reg, "tiny@1", "onnx-int8", calibration=image_folder, calibration_count=4, seed=3)
    again = export_model(reg, "tiny@1", "onnx-int8", calibration=image_folder, calibration_count=4, seed=3)
    assert first["sha256"] == again["sha256"] and first["calibration"]["files"] == again["calibration"]["files"]
    assert first["calibration"]["seed"] == 3 and len(first["calibration"]["files"]) == 4
    assert first["fp32_source_sha256"] == reg.artifact("tiny@1", "onnx")[1]["sha256"]  # made on the way
    other = export_model(reg, "tiny@1", "onnx-int8", calibration=image_folder, calibration_count=4, seed=4)
    assert other["calibration"]["files"] != first["calibration"]["files"]
    model = reg.load("tiny@1")
    eng = prepare(model, "onnx-int8", "cpu")
    assert eng.cache_kind == f"cpu-onnx-int8-{other['sha256'][:16]}"  # the export now recorded
    d8 = describe(model, images, engine="onnx-int8").desc
    d32 = describe(model, images).desc
    assert np.isfinite(d8).all() and np.allclose(np.linalg.norm(d8, axis=1), 1, atol=1e-4)
    assert ((d8 * d32).sum(1)).mean() > 0.9  # a 4-d random-weight toy; the real guard is bench/engines.py


def test_tampered_export_is_refused(reg):
    export_model(reg, "tiny@1", "onnx")
    path, _ = reg.artifact("tiny@1", "onnx")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256 mismatch"):
        reg.verify("tiny@1")
    model = reg.load("tiny@1")  # the weights themselves are fine
    eng, note = select_engine("onnx-fp32", model, "cpu")
    assert eng.name != "onnx-fp32" and note is not None and "sha256 mismatch" in note
