"""The one extraction loop: images in, float32 descriptors out."""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vpr.model.network import VPRNet
from vpr.model.preprocess import load_image, to_input

log = logging.getLogger(__name__)

ImageLike = Image.Image | Path | str | torch.Tensor


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


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (where it is slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(item: ImageLike, net: VPRNet) -> torch.Tensor:
    """Anything image-like -> the network's input tensor (3, H, W)."""
    if isinstance(item, torch.Tensor):
        return item
    img = item if isinstance(item, Image.Image) else load_image(Path(item))
    return to_input(img, net.config.preprocess)


def _batches(tensors: Iterable[torch.Tensor], batch_size: int):
    """Group consecutive same-sized inputs into batches (sizes may differ)."""
    batch: list[torch.Tensor] = []
    for t in tensors:
        if batch and (len(batch) == batch_size or t.shape != batch[0].shape):
            yield batch
            batch = []
        batch.append(t)
    if batch:
        yield batch


def embed_tensors(net: VPRNet, batch: torch.Tensor, device: torch.device, return_features: bool = False):
    """One forward pass of a ready batch (B, 3, H, W) under inference mode."""
    with torch.inference_mode(), autocast_for(device):
        out = net(batch.to(device, non_blocking=True), return_features=return_features)
    if return_features:
        d, f = out
        return d.float().cpu().numpy(), f.float().cpu()
    return out.float().cpu().numpy()


def extract(
    net: VPRNet,
    images: Sequence[ImageLike],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    return_features: bool = False,
    progress: bool | str = False,
) -> np.ndarray | tuple[np.ndarray, list[torch.Tensor]]:
    """Describe `images` (PIL images, paths or prepared tensors) -> (N, D) float32.

    With `return_features` also returns each image's conv feature map (C, h, w),
    which training and the heatmaps need.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval()
    descs: list[np.ndarray] = []
    feats: list[torch.Tensor] = []
    bar = tqdm(
        total=len(images), desc=progress if isinstance(progress, str) else "extract", unit="img", disable=not progress
    )
    for batch in _batches((prepare(i, net) for i in images), batch_size):
        out = embed_tensors(net, torch.stack(batch), device, return_features)
        if return_features:
            descs.append(out[0])
            feats.extend(out[1].unbind(0))
        else:
            descs.append(out)
        bar.update(len(batch))
    bar.close()
    result = np.concatenate(descs) if descs else np.zeros((0, net.descriptor_dim), np.float32)
    return (result, feats) if return_features else result
