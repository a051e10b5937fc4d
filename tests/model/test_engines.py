"""Engines: selection by name, `auto`, fallback with a reason, agreement with the
reference forward pass, and the descriptor cache keeping engines apart."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CONFIG
from vpr.describe.cache import DescriptorCache
from vpr.describe.describe import describe
from vpr.model import engines
from vpr.model.engines import (
    ENGINES,
    EngineError,
    EngineUnavailable,
    auto_engine,
    check_engine_name,
    prepare,
    reference_engine,
    select_engine,
    unavailable,
)
from vpr.model.extract import embed_inputs, embed_tensors
from vpr.model.network import build_model
from vpr.model.preprocess import load_image, to_input
from vpr.model.registry import LoadedModel, Registry
from vpr.model.store import Ref


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(Ref("tiny", 1), build_model(TINY_CONFIG).eval(), {"sha256": "0" * 64})


@pytest.fixture
def registered(home) -> LoadedModel:
    torch.manual_seed(0)
    reg = Registry(home / "models")
    ref = reg.register("tiny", build_model(TINY_CONFIG), role="teacher")
    return reg.load(ref)


def batch(seed: int = 0, n: int = 2, h: int = 72, w: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_names_auto_and_reference(monkeypatch):
    assert check_engine_name("auto") == "auto" and check_engine_name("eager-bf16-cl") == "eager-bf16-cl"
    with pytest.raises(EngineError, match="unknown engine 'fast'.*eager-fp32"):
        check_engine_name("fast")
    assert auto_engine("cuda") == "eager-bf16" and reference_engine("cuda") == "eager-bf16"
    assert reference_engine("cpu") == "eager-fp32"
    bf16_default = engines.CPU_BF16_DEFAULT and engines.cpu_has_bf16()
    assert auto_engine("cpu") == ("eager-bf16-mixed" if bf16_default else "eager-fp32")
    monkeypatch.setattr(engines, "CPU_BF16_DEFAULT", True)
    monkeypatch.setattr(engines, "cpu_has_bf16", lambda: False)
    assert auto_engine("cpu") == "eager-fp32"  # emulated bf16 is slow: never the default there
    monkeypatch.setattr(engines, "cpu_has_bf16", lambda: True)
    assert auto_engine("cpu") == "eager-bf16-mixed"
    monkeypatch.setattr(engines, "CPU_BF16_DEFAULT", False)
    assert auto_engine("cpu") == "eager-fp32"
    for spec in ENGINES.values():  # every engine says where it runs
        assert set(spec.devices) <= {"cpu", "cuda"} and spec.summary


def test_eager_engines_agree_with_the_reference(tiny, one_torch_thread):
    x = batch()
    ref = embed_tensors(tiny.net, x, torch.device("cpu"))
    first_param = next(tiny.net.parameters())
    for name in ("eager-fp32", "eager-fp32-cl", "eager-bf16", "eager-bf16-cl", "eager-bf16-mixed"):
        eng = prepare(tiny, name, "cpu")
        assert eng.name == name and prepare(tiny, name, "cpu") is eng  # prepared once per model
        d, f = eng.embed(x, return_features=True)
        assert d.shape == ref.shape and d.dtype == np.float32 and f is not None and f.shape[0] == 2
        if "fp32" in name:
            np.testing.assert_allclose(d, ref, atol=1e-5)
        assert cosine(d, ref).min() > 0.99, name
    assert np.array_equal(prepare(tiny, "eager-fp32", "cpu").embed(x)[0], ref)  # exactly the reference
    # channels_last engines work on a copy: the shared network is unchanged
    assert first_param is next(tiny.net.parameters()) and first_param.is_contiguous()
    assert tiny.net.backbone is not prepare(tiny, "eager-bf16-cl", "cpu").net.backbone  # type: ignore[attr-defined]


def test_mixed_engine_keeps_both_ends_in_float32(tiny, one_torch_thread):
    """eager-bf16-mixed: the first layer (raw pixels) and NetVLAD run in float32,
    the layers between in bf16; its descriptors are closer to fp32's than bf16-cl's."""
    x = batch(3) * 120  # pixel-like magnitudes, where bf16's rounding of the input shows
    eng = prepare(tiny, "eager-bf16-mixed", "cpu")
    layers = eng.net.backbone.layers()  # type: ignore[attr-defined]
    seen: dict[str, torch.dtype] = {}

    def record(key: str, t: torch.Tensor) -> None:  # a hook that returns None changes nothing
        seen.setdefault(key, t.dtype)

    hooks = [
        layers[0].register_forward_hook(lambda m, i, o: record("first", o)),
        layers[-1].register_forward_hook(lambda m, i, o: record("last", o)),
        eng.net.netvlad.register_forward_pre_hook(lambda m, i: record("netvlad", i[0])),  # type: ignore[attr-defined]
    ]
    try:
        d, f = eng.embed(x, return_features=True)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"first": torch.float32, "last": torch.bfloat16, "netvlad": torch.float32}
    assert d.dtype == np.float32 and f is not None and f.dtype == torch.float32
    ref = embed_tensors(tiny.net, x, torch.device("cpu"))
    err_mixed = float(np.linalg.norm(d - ref))
    err_cl = float(np.linalg.norm(prepare(tiny, "eager-bf16-cl", "cpu").embed(x)[0] - ref))
    assert err_mixed < err_cl, (err_mixed, err_cl)  # on the real model: 85x closer (docs/BENCHMARKS.md)
    assert prepare(tiny, "eager-bf16-mixed", "cpu").cache_kind == "cpu-eager-bf16-mixed"


def test_cache_kinds_keep_engines_apart(tiny):
    kinds = {name: prepare(tiny, name, "cpu").cache_kind for name in ("eager-fp32", "eager-bf16", "eager-bf16-cl")}
    assert kinds["eager-fp32"] == "cpu-fp32"  # the key caches had before engines: old entries stay valid
    assert len(set(kinds.values())) == 3


def test_unavailable_engines_fall_back_with_the_reason(tiny, monkeypatch):
    assert unavailable("eager-fp16", "cpu") == "engine eager-fp16 runs on cuda, not cpu"
    assert unavailable("onnx-trt", "cpu") is not None
    real = importlib.util.find_spec
    monkeypatch.setattr(
        engines.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    why = unavailable("onnx-fp32", "cpu")
    assert why is not None and "onnxruntime" in why and "pip install" in why
    eng, note = select_engine("onnx-fp32", tiny, "cpu")
    assert eng.name == auto_engine("cpu") and note is not None
    assert "onnxruntime, which is not installed" in note and f"using {auto_engine('cpu')} instead" in note
    with pytest.raises(EngineUnavailable, match="onnxruntime"):
        select_engine("onnx-fp32", tiny, "cpu", strict=True)
    eng, note = select_engine("eager-fp16", tiny, "cpu")  # a GPU engine asked for on a CPU
    assert eng.name == auto_engine("cpu") and "runs on cuda" in (note or "")
    assert select_engine("auto", tiny, "cpu") == (prepare(tiny, auto_engine("cpu"), "cpu"), None)


def test_missing_export_names_the_command(registered):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    eng, note = select_engine("onnx-int8", registered, "cpu")
    assert eng.name == auto_engine("cpu")
    assert note is not None and "vpr model export tiny@1 --format onnx-int8" in note


def test_describe_keys_the_cache_by_engine(registered, image_folder, tmp_path, one_torch_thread):
    paths = sorted(image_folder.glob("*.jpg"))
    cache = DescriptorCache(tmp_path / "cache")
    fp32 = describe(registered, paths, cache=cache)
    bf16 = describe(registered, paths, cache=cache, engine="eager-bf16-cl")
    assert fp32.computed == len(paths) and bf16.computed == len(paths)  # never read from fp32's entries
    assert describe(registered, paths, cache=cache, engine="eager-bf16-cl").cached == len(paths)
    assert describe(registered, paths, cache=cache, engine="eager-fp32").cached == len(paths)  # the reference
    assert cosine(bf16.desc, fp32.desc).min() > 0.99
    direct, _ = embed_inputs(registered.net, [to_input(load_image(p), registered.net.config.preprocess) for p in paths])
    np.testing.assert_allclose(fp32.desc, direct, atol=1e-5)
    devices = sorted(json.loads(p.read_text())["device"] for p in cache.root.glob("*/*/context.json"))
    assert devices == ["cpu-eager-bf16-cl", "cpu-fp32"]
