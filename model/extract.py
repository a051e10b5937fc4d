"""The forward pass: prepared input tensors in, float32 descriptors out.

This module knows nothing of image files, qualities or caches: the one loop
that describes a list of images (decode, degrade, cache) is
`vpr.describe.describe`. It runs its batches through `embed_inputs`, and so
do the few callers inside `model/` that cannot import `describe/` (PCA
fitting in `model.clusters`); the server's micro-batcher calls
`embed_tensors` on batches it has already stacked.

How the pass runs (fp32, bf16, channels_last, compiled, ONNX Runtime, int8)
is an engine's business (`vpr.model.engines`): `embed_inputs` takes an
engine's `embed` as its `forward`; without one it runs the reference, eager
`embed_tensors` (fp32 on the CPU, bf16 autocast on CUDA).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch

from vpr.model.network import VPRNet

# One forward pass of a stacked batch: (descriptors (B, D) float32, conv maps (B, C, h, w) on the CPU or None).
Forward = Callable[[torch.Tensor, bool], tuple[np.ndarray, torch.Tensor | None]]


def cpu_name() -> str:
    """The processor's model name, for benchmark and training reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(spec: str | None) -> torch.device:
    """The device `spec` names (None: `default_device()`), refused at once when it
    names a GPU this machine lacks, so that a server fails before it starts."""
    device = torch.device(spec) if spec else default_device()
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device} requested but CUDA (or that GPU) is not available; use --device cpu")
    return device


def autocast_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (where it is slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(net: VPRNet) -> torch.device:
    """Where the network's weights are (the device to run it on when none is named)."""
    return next(net.parameters()).device


@overload
def embed_tensors(
    net: VPRNet, batch: torch.Tensor, device: torch.device, return_features: Literal[False] = ...
) -> np.ndarray: ...
@overload
def embed_tensors(
    net: VPRNet, batch: torch.Tensor, device: torch.device, return_features: Literal[True]
) -> tuple[np.ndarray, torch.Tensor]: ...
def embed_tensors(
    net: VPRNet, batch: torch.Tensor, device: torch.device, return_features: bool = False
) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
    """One forward pass of a ready batch (B, 3, H, W) under inference mode.

    With `return_features` also the conv feature maps (B, C, h, w), as float32 on the CPU."""
    with torch.inference_mode(), autocast_for(device):
        out = net(batch.to(device, non_blocking=True), return_features=return_features)
    if return_features:
        d, f = out
        return d.float().cpu().numpy(), f.float().cpu()
    return out.float().cpu().numpy()


def same_shape_batches(inputs: Iterable[torch.Tensor], batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive inputs of one shape, at most `batch_size` at a time (sizes may differ
    between images, e.g. small queries under the `native` policy, and cannot be stacked)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch: list[torch.Tensor] = []
    for t in inputs:
        if batch and (len(batch) == batch_size or t.shape != batch[0].shape):
            yield batch
            batch = []
        batch.append(t)
    if batch:
        yield batch


def embed_inputs(
    net: VPRNet,
    inputs: Iterable[torch.Tensor],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    return_features: bool = False,
    forward: Forward | None = None,
) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Descriptors (N, D) float32 of prepared inputs (each (3, H, W), see
    `preprocess.to_input`), batched; `inputs` may be a generator (streamed).

    `forward`: an engine's `embed` (None: the reference `embed_tensors` on `device`).
    Returns the descriptors and, with `return_features`, each input's conv
    feature map (C, h, w) on the CPU (an empty list otherwise)."""
    if forward is None:
        dev = torch.device(device) if device is not None else model_device(net)

        def forward(x: torch.Tensor, features: bool) -> tuple[np.ndarray, torch.Tensor | None]:
            if features:
                return embed_tensors(net, x, dev, return_features=True)
            return embed_tensors(net, x, dev), None

    net.eval()
    descs: list[np.ndarray] = []
    feats: list[torch.Tensor] = []
    for batch in same_shape_batches(inputs, batch_size):
        d, f = forward(torch.stack(batch), return_features)
        if return_features:
            if f is None:
                raise ValueError("this forward pass returns no feature maps; describe with an eager engine")
            feats.extend(f.unbind(0))
        descs.append(d)
    out = np.concatenate(descs) if descs else np.zeros((0, net.descriptor_dim), np.float32)
    return out, feats
