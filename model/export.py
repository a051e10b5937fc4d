"""ONNX exports of a registered model, and their int8 quantization.

`vpr model export NAME@V --format onnx` writes the whole network (backbone,
NetVLAD, PCA-whitening when the model has it) as one ONNX graph with dynamic
batch, height and width: image (B, 3, H, W) float32, already preprocessed by
`model.preprocess.to_input`, in; L2-normalised descriptor (B, D) out. The
file is a registry artifact of the version it came from (`Registry.add_artifact`:
sha256, source `name@version` and weights sha256 in its manifest), never a
loose file, and it is checked against PyTorch before it is recorded: on real
images when some are given, and always on the smallest input the
preprocessing allows (`PreprocessConfig.min_side` square) and a landscape one.

`--format onnx-int8` quantizes the convolutions of that graph statically
(ONNX Runtime, QDQ, per-channel int8 weights, uint8 activations, MinMax
ranges) calibrated on database images drawn with a seeded generator, so the
same images and seed give the same bytes; NetVLAD's assignment and
aggregation stay in float32, where int8 would blur the soft assignment.
Whether an int8 engine may be a default is decided by bench/engines.py's
accuracy guard, not here.
"""

from __future__ import annotations

import logging
import random
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpr.model.config import PreprocessConfig
from vpr.model.engines import ONNX_EXTRA, ONNX_INPUT, ONNX_OUTPUT
from vpr.model.network import VPRNet
from vpr.model.preprocess import list_images, load_image, to_input
from vpr.model.registry import ModelRef, Registry, RegistryError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8")
OPSET = 17
MIN_COSINE = 0.9999  # an fp32 export must give the same descriptors as PyTorch, to float rounding


class ExportError(ValueError):
    """An export that cannot be made or does not match PyTorch."""


class _DescriptorOnly(nn.Module):
    """The network with one output, as the graph is traced."""

    def __init__(self, net: VPRNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({e}): {ONNX_EXTRA}") from None


def export_onnx(net: VPRNet, path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Write `net` as an ONNX graph with dynamic batch, height and width; returns its details."""
    _need_onnx()
    import onnx

    cfg = net.config.preprocess
    side = max(cfg.min_side, 64)
    example = torch.zeros(1, 3, side, side * 4 // 3)
    net = net.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            _DescriptorOnly(net),
            (example,),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch", 2: "height", 3: "width"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return {
        "format": "onnx",
        "opset": opset,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 3, "height", "width"], "dtype": "float32"},
        "output": {"name": ONNX_OUTPUT, "shape": ["batch", net.descriptor_dim], "dtype": "float32"},
        "preprocess": cfg.model_dump(mode="json"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


def check_inputs(cfg: PreprocessConfig, images: Sequence[Path] = ()) -> list[torch.Tensor]:
    """Inputs an export is checked on: the given images through the model's
    preprocessing, the smallest input it allows and a small landscape one."""
    out = [to_input(load_image(p), cfg) for p in images]
    out.append(torch.rand(3, cfg.min_side, cfg.min_side) * 255 - 128)
    out.append(torch.rand(3, cfg.min_side + 16, cfg.min_side * 2 + 8) * 255 - 128)
    return out


def compare(net: VPRNet, path: Path, inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Run the graph at `path` (ONNX Runtime, CPU) and `net` (fp32 eager) on each
    input; returns the worst absolute difference and the lowest cosine."""
    _need_onnx()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, low = 0.0, 1.0
    with torch.inference_mode():
        for x in inputs:
            ref = net.eval()(x[None].float()).numpy()
            got = sess.run([ONNX_OUTPUT], {ONNX_INPUT: x[None].float().numpy()})[0]
            worst = max(worst, float(np.abs(got - ref).max()))
            cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-12))
            low = min(low, cos)
    return {"max_abs_diff": worst, "min_cosine": low, "checked_inputs": len(inputs)}


def calibration_images(folder_or_files: Path | Sequence[Path], count: int, seed: int) -> list[Path]:
    """`count` database images drawn with `seed` from a folder (its images,
    sorted) or a list; the same arguments always give the same images."""
    files = list_images(folder_or_files) if isinstance(folder_or_files, Path) else sorted(folder_or_files)
    if not files:
        raise ExportError(f"{folder_or_files}: no images to calibrate on; give a folder of database images")
    if count < 1:
        raise ExportError(f"calibration count must be positive, got {count}")
    return sorted(random.Random(seed).sample(files, min(count, len(files))))


def quantize_int8(fp32_path: Path, out_path: Path, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Static int8 quantization of the convolutions of an fp32 export, calibrated on `inputs`."""
    _need_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[torch.Tensor] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {ONNX_INPUT: x[None].float().numpy()}

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return {"format": "onnx-int8", "quantized_ops": ["Conv"], "calibration_method": "minmax", "quant_format": "QDQ"}


def export_model(
    registry: Registry,
    spec: str | ModelRef,
    fmt: str = "onnx",
    *,
    check_images: Sequence[Path] = (),
    calibration: Path | Sequence[Path] | None = None,
    calibration_count: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a registered model as artifact `fmt` of its version; returns the manifest entry.

    `onnx`: checked against PyTorch on `check_images` and on the smallest input;
    refused when any descriptor's cosine to PyTorch's is below MIN_COSINE.
    `onnx-int8`: needs `calibration` (database images); its fp32 source is the
    version's `onnx` artifact, made first when missing. Its agreement with
    PyTorch is recorded, not enforced (the accuracy guard decides)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _need_onnx()
    ref = registry.resolve(spec)
    model = registry.load(ref)
    cfg = model.net.config.preprocess
    inputs = check_inputs(cfg, check_images)
    if fmt == "onnx":

        def build(path: Path) -> dict[str, Any]:
            details = export_onnx(model.net, path)
            agreement = compare(model.net, path, inputs)
            if agreement["min_cosine"] < MIN_COSINE:
                raise ExportError(
                    f"the ONNX export of {ref} does not match PyTorch "
                    f"(cosine {agreement['min_cosine']:.6f}); not recorded"
                )
            return {**details, "check": agreement}

        entry = registry.add_artifact(ref, "onnx", build)
        log.info("exported %s to ONNX (%d bytes, sha256 %s)", ref, entry["bytes"], entry["sha256"][:12])
        return entry
    if calibration is None:
        raise ExportError("an int8 export needs calibration images: --calibration DIR (database images)")
    try:
        source, source_entry = registry.artifact(ref, "onnx")
    except RegistryError:
        export_model(registry, ref, "onnx", check_images=check_images)
        source, source_entry = registry.artifact(ref, "onnx")
    picked = calibration_images(calibration, calibration_count, seed)
    calib = [to_input(load_image(p), cfg) for p in picked]

    def build_int8(path: Path) -> dict[str, Any]:
        details = quantize_int8(source, path, calib)
        return {
            **details,
            "fp32_source_sha256": source_entry["sha256"],
            "calibration": {
                "images": len(picked),
                "seed": seed,
                "from": str(calibration) if isinstance(calibration, Path) else f"{len(calibration)} files",
                "files": [p.name for p in picked],
            },
            "check": compare(model.net, path, inputs),
        }

    entry = registry.add_artifact(ref, "onnx-int8", build_int8)
    log.info("quantized %s to int8 (%d bytes, sha256 %s)", ref, entry["bytes"], entry["sha256"][:12])
    return entry


__all__ = ["FORMATS", "ExportError", "calibration_images", "compare", "export_model", "export_onnx", "quantize_int8"]
