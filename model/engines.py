"""Inference engines: how one model's forward pass runs on one device.

The forward pass is nearly the whole cost of a query, and the fastest correct
way to run it differs per machine: bf16 with channels_last on a CPU with AMX
or AVX-512 BF16, ONNX Runtime where PyTorch is not wanted, int8 where its
accuracy holds, TensorRT on a GPU. An engine is one such way, by name
(`ENGINES`); `prepare(model, name, device)` builds it once per model object
(kept in `LoadedModel.engines`, so a hot-swapped model takes its engines with it) and
`Engine.embed` is the forward pass that `describe.describe` (through
`extract.embed_inputs`) and the server's micro-batcher both call, so there is
still one description path whichever engine runs it.

Each engine has a `cache_kind`, the part of the descriptor cache's key that
says how the numbers were computed: bf16 or int8 descriptors never mix with
fp32 ones. The reference engines keep the keys caches had before engines
existed (`cpu-fp32`, `cuda-bf16`), and an engine that runs an exported file
adds that file's sha256 (two int8 calibrations are two engines).

`select_engine` resolves a setting: `auto` is the measured default of the
device (`auto_engine`); an engine this machine cannot run (its runtime is not
installed, the model has no export, the wrong device) falls back to `auto`
with a message that says why and how to get it, unless `strict`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpr.model.extract import embed_tensors
from vpr.model.network import VPRNet
from vpr.model.registry import LoadedModel, RegistryError, verified_artifact

log = logging.getLogger(__name__)

AUTO = "auto"
ONNX_INPUT, ONNX_OUTPUT = "image", "descriptor"  # the exported graph's names (`model.export`)
ONNX_EXTRA = "pip install -e '.[onnx]' (onnx, onnxruntime)"


class EngineError(ValueError):
    """An unknown engine name, or one that cannot run here (see `EngineUnavailable`)."""


class EngineUnavailable(EngineError):
    """A known engine this machine or this model cannot run; the message says why and the fix."""


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is and needs; `build` makes it for a model on a device."""

    name: str
    summary: str
    devices: tuple[str, ...]  # device types it runs on
    build: Callable[[LoadedModel, torch.device], Engine]
    modules: tuple[str, ...] = ()  # Python modules it imports
    artifact: str | None = None  # the registry artifact it runs (`model.export`)
    provider: str | None = None  # the ONNX Runtime execution provider it needs
    compiler: bool = False  # needs a C++ compiler (torch.compile on the CPU)


class Engine:
    """A prepared forward pass: `embed(batch, return_features)` -> descriptors.

    `name` is the engine's name, `cache_kind` the descriptor cache's word for
    its arithmetic, `info()` what `/readyz` reports about it."""

    name: str
    device: torch.device
    features: bool = False  # whether `embed` can also return the conv feature maps

    @property
    def cache_kind(self) -> str:
        return f"{self.device.type}-{self.name}"

    def embed(self, batch: torch.Tensor, return_features: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.device), "cache_kind": self.cache_kind}


class EagerEngine(Engine):
    """PyTorch eager (or `torch.compile`d): optional autocast dtype and channels_last.

    `fp32_ends` keeps the two ends of the network in float32 under autocast: the
    backbone's first layer (it reads raw pixels, ~±150 after Caffe mean subtraction,
    which bf16's 8-bit mantissa rounds by up to 0.5) and the aggregation (NetVLAD's
    soft-assignment and residual sums over the whole feature map, then PCA). Both
    are a few percent of the FLOPs; on Gardens Point queries they carry most of
    bf16's error (mean 1-cosine to fp32 7.7e-4 with bf16 everywhere, 9e-6 with
    fp32 ends; docs/BENCHMARKS.md).

    channels_last and compilation work on a private copy of the network, so the
    model object other engines (and training) use is never changed."""

    features = True

    def __init__(
        self,
        name: str,
        net: VPRNet,
        device: torch.device,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fp32_ends: bool = False,
    ) -> None:
        self.name, self.device, self.dtype, self.channels_last = name, device, dtype, channels_last
        self.fp32_ends = fp32_ends and dtype is not None
        self.net = net
        self._run: Callable[..., Any] = net
        if channels_last or compile:
            self.net = copy.deepcopy(net).eval()
            if channels_last:
                self.net = self.net.to(memory_format=torch.channels_last)
            self._run = torch.compile(self.net, dynamic=False) if compile else self.net
        self.compiled = compile
        if self.fp32_ends:  # split once, not per query: the first layer, then the rest of the backbone
            layers = self.net.backbone.layers()
            self._first, self._rest = layers[0], layers[1:]
        # Exactly what `extract.embed_tensors` runs (fp32 on the CPU, bf16 autocast on CUDA): call it.
        self.reference = not (channels_last or compile or self.fp32_ends) and dtype == (
            BF16 if device.type == "cuda" else None
        )

    @property
    def cache_kind(self) -> str:
        # The keys caches used before engines existed: the reference engines keep them.
        if self.reference:
            return f"{self.device.type}-{'bf16' if self.device.type == 'cuda' else 'fp32'}"
        return super().cache_kind

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def embed(self, batch: torch.Tensor, return_features: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        if self.reference:
            if return_features:
                return embed_tensors(self.net, batch, self.device, return_features=True)
            return embed_tensors(self.net, batch, self.device), None
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fp32_ends:
            return self._embed_fp32_ends(x, return_features)
        with torch.inference_mode(), self._autocast():
            if return_features:
                d, f = self._run(x, return_features=True)
                return d.float().cpu().numpy(), f.float().contiguous().cpu()
            return self._run(x).float().cpu().numpy(), None

    def _embed_fp32_ends(self, x: torch.Tensor, return_features: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        with torch.inference_mode():
            h = self._first(x)  # float32: the first layer reads raw pixel values
            with self._autocast():
                h = self._rest(h)
            f = h.float()
            d = self.net.aggregate(f)  # float32: NetVLAD (and PCA)
            return d.cpu().numpy(), (f.contiguous().cpu() if return_features else None)


class OrtEngine(Engine):
    """An exported ONNX graph run by ONNX Runtime (CPU, CUDA or TensorRT provider).

    Feature maps are not part of the exported graph: describing with extras
    (distillation targets) needs an eager engine."""

    def __init__(self, name: str, path: Path, entry: dict[str, Any], device: torch.device, provider: str) -> None:
        import onnxruntime as ort

        self.name, self.device, self.path, self.entry = name, device, path, entry
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device.type == "cpu":
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            # Idle workers sleep rather than spin, as OMP_WAIT_POLICY=PASSIVE does for torch: on a
            # small shared machine spinning threads slow everyone else down, the server's own I/O included.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = []
        if provider == "TensorrtExecutionProvider":
            cache = path.parent / ".trt-cache"
            cache.mkdir(exist_ok=True)
            providers.append(
                (
                    provider,
                    {
                        "device_id": device.index or 0,
                        "trt_fp16_enable": True,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_profile_min_shapes": f"{ONNX_INPUT}:1x3x32x32",
                        "trt_profile_opt_shapes": f"{ONNX_INPUT}:8x3x480x640",
                        "trt_profile_max_shapes": f"{ONNX_INPUT}:64x3x1024x1024",
                    },
                )
            )
            provider = "CUDAExecutionProvider"
        if provider == "CUDAExecutionProvider":
            providers.append((provider, {"device_id": device.index or 0}))
        providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self._lock = threading.Lock()  # one run at a time: the batcher's thread, or describe's loop

    @property
    def cache_kind(self) -> str:
        return f"{self.device.type}-{self.name}-{str(self.entry['sha256'])[:16]}"

    def embed(self, batch: torch.Tensor, return_features: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        if return_features:
            raise EngineError(f"engine {self.name} returns no feature maps; use an eager engine (e.g. eager-fp32)")
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:
            out = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
        return np.asarray(out, dtype=np.float32), None

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "artifact": self.entry.get("kind"),
            "artifact_sha256": self.entry.get("sha256"),
            "providers": self.session.get_providers(),
        }


def _eager(
    name: str,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool = False,
    fp32_ends: bool = False,
) -> Callable[[LoadedModel, torch.device], Engine]:
    return lambda m, d: EagerEngine(name, m.net, d, dtype, channels_last, compile, fp32_ends)


def _ort(name: str, kind: str, provider: str) -> Callable[[LoadedModel, torch.device], Engine]:
    def build(model: LoadedModel, device: torch.device) -> Engine:
        if model.folder is None:
            raise EngineUnavailable(
                f"engine {name} runs a registered export; {model.ref} was not loaded from a registry"
            )
        try:
            path, entry = verified_artifact(model.folder, kind)
        except RegistryError as e:
            raise EngineUnavailable(str(e)) from e
        return OrtEngine(name, path, entry, device, provider)

    return build


BF16, FP16 = torch.bfloat16, torch.float16
CPU_CUDA = ("cpu", "cuda")
ENGINES: dict[str, EngineSpec] = {
    s.name: s
    for s in (
        EngineSpec("eager-fp32", "PyTorch eager, float32 (the CPU's reference)", CPU_CUDA, _eager("eager-fp32")),
        EngineSpec("eager-fp32-cl", "eager float32, channels_last", CPU_CUDA, _eager("eager-fp32-cl", None, True)),
        EngineSpec("eager-bf16", "eager under bf16 autocast (CUDA's reference)", CPU_CUDA, _eager("eager-bf16", BF16)),
        EngineSpec("eager-bf16-cl", "bf16 autocast, channels_last", CPU_CUDA, _eager("eager-bf16-cl", BF16, True)),
        EngineSpec(
            "eager-bf16-mixed",
            "bf16 autocast, channels_last; the first layer and NetVLAD/PCA in float32",
            CPU_CUDA,
            _eager("eager-bf16-mixed", BF16, True, fp32_ends=True),
        ),
        EngineSpec("eager-fp16", "fp16 autocast, channels_last", ("cuda",), _eager("eager-fp16", FP16, True)),
        EngineSpec(
            "compile-bf16-cl",
            "torch.compile (inductor) of bf16 channels_last; one compilation per input shape",
            CPU_CUDA,
            _eager("compile-bf16-cl", BF16, True, compile=True),
            compiler=True,
        ),
        EngineSpec(
            "onnx-fp32",
            "the ONNX export under ONNX Runtime (CPU provider, CUDA provider on a GPU)",
            CPU_CUDA,
            lambda m, d: _ort(
                "onnx-fp32", "onnx", "CUDAExecutionProvider" if d.type == "cuda" else "CPUExecutionProvider"
            )(m, d),
            modules=("onnxruntime",),
            artifact="onnx",
        ),
        EngineSpec(
            "onnx-int8",
            "the int8 export (static quantization calibrated on database images) under ONNX Runtime",
            ("cpu",),
            _ort("onnx-int8", "onnx-int8", "CPUExecutionProvider"),
            modules=("onnxruntime",),
            artifact="onnx-int8",
        ),
        EngineSpec(
            "onnx-trt",
            "the ONNX export under ONNX Runtime's TensorRT provider (fp16)",
            ("cuda",),
            _ort("onnx-trt", "onnx", "TensorrtExecutionProvider"),
            modules=("onnxruntime",),
            artifact="onnx",
            provider="TensorrtExecutionProvider",
        ),
    )
}
REFERENCE = {"cpu": "eager-fp32", "cuda": "eager-bf16"}  # what descriptions default to (index builds, evaluation)


def check_engine_name(name: str) -> str:
    """`name` when it is `auto` or a known engine; else EngineError listing them."""
    if name != AUTO and name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose auto or one of {', '.join(ENGINES)}")
    return name


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Whether `auto` runs bf16 (channels_last, float32 ends: `eager-bf16-mixed`) on a CPU with native
# bf16. bench/engines.py, one run on a quiet 2-core AMX machine: 2.7x eager fp32's queries/s through
# the server with 1 client and 3.3x with 4; the accuracy guard on all 400 Gardens Point queries x 5
# qualities: mean cosine 0.99999 to fp32, no cell loses recall@1; the top-1 answer changed for 8 of
# 2,000 queries, each a near-tie under fp32 (its two best scores within 2.4e-4), 4 of them from wrong
# to right and none from right to wrong (docs/BENCHMARKS.md, "eager-bf16-mixed"). Without native
# bf16 (emulated: slow) fp32 stays the default.
CPU_BF16_DEFAULT = True
CPU_BF16_ENGINE = "eager-bf16-mixed"


def auto_engine(device: torch.device | str) -> str:
    """The documented default of a device, chosen by bench/engines.py (speed and
    the accuracy guard): on a CPU with native bf16 (AVX-512 BF16 or AMX)
    `eager-bf16-mixed`, on other CPUs eager fp32; bf16 autocast on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "eager-bf16"
    return CPU_BF16_ENGINE if CPU_BF16_DEFAULT and cpu_has_bf16() else "eager-fp32"


def reference_engine(device: torch.device | str) -> str:
    """The engine descriptions use unless told otherwise (what caches were keyed by before engines)."""
    return REFERENCE.get(torch.device(device).type, "eager-fp32")


def unavailable(name: str, device: torch.device | str, model: LoadedModel | None = None) -> str | None:
    """Why engine `name` cannot run on `device` (for `model`: its export), or None when it can."""
    spec = ENGINES[check_engine_name(name)] if name != AUTO else None
    if spec is None:
        return None
    dev = torch.device(device)
    if dev.type not in spec.devices:
        return f"engine {name} runs on {' or '.join(spec.devices)}, not {dev.type}"
    for module in spec.modules:
        if importlib.util.find_spec(module) is None:
            return f"engine {name} needs {module}, which is not installed: {ONNX_EXTRA}"
    if spec.provider is not None:
        import onnxruntime as ort

        if spec.provider not in ort.get_available_providers():
            return (
                f"engine {name} needs ONNX Runtime's {spec.provider}, not in this build "
                f"(has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu with TensorRT"
            )
    if spec.compiler and dev.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return f"engine {name} compiles C++ kernels and no C++ compiler (g++) is on PATH"
    if spec.artifact is not None and model is not None:
        if model.folder is None:
            return f"engine {name} runs a registered export; {model.ref} was not loaded from a registry"
        try:
            verified_artifact(model.folder, spec.artifact)
        except RegistryError as e:
            return f"engine {name}: {e}"
    return None


_prepared_lock = threading.Lock()


def prepare(model: LoadedModel, name: str, device: torch.device | str | None = None) -> Engine:
    """Engine `name` (`auto` resolved) for `model` on `device` (None: where its
    weights are), built once per model object and reused. Raises
    EngineUnavailable (why, and the fix) when it cannot run here."""
    dev = torch.device(device) if device is not None else next(model.net.parameters()).device
    name = auto_engine(dev) if check_engine_name(name) == AUTO else name
    why = unavailable(name, dev, model)
    if why is not None:
        raise EngineUnavailable(why)
    artifact = ENGINES[name].artifact
    stamp = ""
    if artifact is not None and model.folder is not None:
        stamp = str(((_manifest_artifacts(model.folder)).get(artifact) or {}).get("sha256", ""))
    key = (name, str(dev), stamp)  # a new export of the same kind is a new engine
    with _prepared_lock:
        engine = model.engines.get(key)
        if engine is None:
            engine = ENGINES[name].build(model, dev)
            model.engines[key] = engine
            log.info("engine %s prepared for %s on %s", name, model.ref, dev)
    return engine


def _manifest_artifacts(folder: Path) -> dict[str, Any]:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    artifacts = m.get("artifacts") if isinstance(m, dict) else None
    return artifacts if isinstance(artifacts, dict) else {}


def select_engine(
    name: str, model: LoadedModel, device: torch.device | str, strict: bool = False
) -> tuple[Engine, str | None]:
    """The engine a setting names, and a note when another one runs instead.

    `auto` is `auto_engine(device)`. An engine that cannot run here falls back
    to `auto` (then to the device's reference) with a note saying why and how
    to get it; with `strict` it raises EngineUnavailable instead (benchmarks
    must never measure a fallback by accident)."""
    dev = torch.device(device)
    check_engine_name(name)
    try:
        return prepare(model, name, dev), None
    except EngineUnavailable as e:
        if strict or name == AUTO:
            raise
        note = f"{e}; using {auto_engine(dev)} instead"
    log.warning("%s", note)
    try:
        return prepare(model, AUTO, dev), note
    except EngineUnavailable:
        return prepare(model, reference_engine(dev), dev), note


def engine_table(device: torch.device | str, model: LoadedModel | None = None) -> list[dict[str, Any]]:
    """Every engine with whether it can run here and why not (for `vpr model engines`-style listings)."""
    dev = torch.device(device)
    return [
        {
            "name": s.name,
            "summary": s.summary,
            "devices": list(s.devices),
            "unavailable": unavailable(s.name, dev, model),
        }
        for s in ENGINES.values()
    ]


__all__ = [
    "AUTO",
    "ENGINES",
    "Engine",
    "EngineError",
    "EngineSpec",
    "EngineUnavailable",
    "auto_engine",
    "check_engine_name",
    "prepare",
    "reference_engine",
    "select_engine",
    "unavailable",
]
