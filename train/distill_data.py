"""What a distillation step consumes: training images, the student split at its
first trainable layer, the frozen prefix's (cached) outputs and the teacher's
(cached) targets.

Why the split: only the student's top layers train, so the frozen prefix's
output for an (image, quality) pair never changes, and neither do the
teacher's targets for an image. Both are computed once: the targets through
THE description path (`describe.describe`, its cache holding the channel
correlations beside the descriptors), the prefix outputs in
`train.distill_cache.TensorCache` (activations, not descriptors, but the
images are named the same way, by `describe.cache.image_sha256`); each step
then runs only `StudentHead`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpr.data.spec import DatasetSpec
from vpr.describe.cache import CachedRows, DescriptorCache, device_kind, image_sha256
from vpr.describe.describe import Described, describe
from vpr.model.config import PreprocessConfig
from vpr.model.extract import autocast_for
from vpr.model.network import VPRNet
from vpr.model.preprocess import database_config, list_images, load_image, to_input
from vpr.model.registry import LoadedModel
from vpr.train import ddp
from vpr.train.distill_cache import TensorCache
from vpr.train.losses import REGION_GRID, channel_correlation, region_features

log = logging.getLogger(__name__)

HEAD_EXTRAS = ("netvlad", "pca")
CACHE_VERSION = 1
# The teacher's channel correlations, stored by the describe cache beside its
# descriptors under this name (part of the key): bump it when
# `losses.channel_correlation` changes.
GRAM = "gram-v1"
REGIONS = f"regions-{REGION_GRID[0]}x{REGION_GRID[1]}-v1"  # `losses.region_features` in the descriptor cache


# ---- training images ---------------------------------------------------------------
@dataclass(frozen=True)
class TrainImage:
    path: Path
    utm: tuple[float, float] | None = None


def spread(n: int, limit: int | None) -> np.ndarray:
    """`limit` indices evenly spread over range(n) (all when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def collect_images(cfg: Any) -> tuple[list[TrainImage], dict[str, Any]]:
    """The training images (and positions) of a DistillConfig, with what to record about them."""
    if cfg.images is not None:
        paths = list_images(cfg.images)
        images = [TrainImage(p.resolve()) for p in paths]
        source = {"images": str(Path(cfg.images).resolve())}
    else:
        ds = DatasetSpec.parse(cfg.dataset, cfg.dataset_options).open()
        images = [TrainImage(Path(i.path), i.utm) for i in ds.database]
        source = {"dataset": cfg.dataset, "dataset_name": ds.name, "dataset_part": "database"}
    keep = spread(len(images), cfg.limit)
    images = [images[i] for i in keep]
    if len(images) < 2:
        raise ValueError(f"distillation needs at least 2 training images, got {len(images)}")
    return images, {**source, "image_count": len(images)}


def mirrored(images: list[TrainImage], folder: Path) -> list[TrainImage]:
    """Each image's left-right mirror, as a PNG file in `folder` named by the
    original's content (made once, written atomically; the pixels are exact, so
    the same original always gives the same file and the caches keyed by
    content find it again). A second, label-free view of the same training
    pair: degrade(mirror(x)) must give teacher(mirror(x)). No positions: a
    mirror is not a place one could stand at."""
    import io

    from PIL import Image

    from vpr.model.fileio import atomic_write_bytes

    out = []
    for im in images:
        dst = folder / f"{image_sha256(im.path)}.png"
        if not dst.exists():
            buf = io.BytesIO()
            load_image(im.path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, format="PNG")
            atomic_write_bytes(dst, buf.getvalue())
        out.append(TrainImage(dst))
    return out


def has_positions(images: list[TrainImage]) -> bool:
    return all(i.utm is not None for i in images)


# ---- the student split -----------------------------------------------------------------
class StudentHead(nn.Module):
    """The student from the first trainable layer up: backbone rest -> NetVLAD (-> PCA).

    Holds the student's own modules (not copies), so training it trains the student."""

    def __init__(self, net: VPRNet, cut: int) -> None:
        super().__init__()
        self.rest = net.backbone.layers()[cut:]
        self.netvlad = net.netvlad
        self.pca = net.pca

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.rest(h)
        desc = self.netvlad(fmap)
        if self.pca is not None:
            desc = self.pca(desc)
        return desc, fmap


def trainable_names(net: VPRNet, requested: list[str] | None) -> list[str]:
    """Validated names of what trains: backbone blocks plus `netvlad` / `pca`."""
    blocks = list(net.backbone.blocks())
    allowed = blocks + ["netvlad"] + (["pca"] if net.pca is not None else [])
    names = list(requested) if requested is not None else [*net.backbone.default_trainable, "netvlad"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown trainable part(s) {unknown}; this student has {', '.join(allowed)}")
    if not names:
        raise ValueError("nothing to train: list at least one trainable part")
    return [n for n in allowed if n in names]


def apply_trainable(net: VPRNet, names: list[str]) -> None:
    """requires_grad on exactly the named parts."""
    for p in net.parameters():
        p.requires_grad_(False)
    net.backbone.set_trainable([n for n in names if n not in HEAD_EXTRAS])
    if "netvlad" in names:
        net.netvlad.requires_grad_(True)
    if "pca" in names and net.pca is not None:
        net.pca.requires_grad_(True)


def split_point(net: VPRNet) -> int:
    """Index of the first backbone layer with a trainable parameter (len: none)."""
    layers = list(net.backbone.layers())
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(layers)


def split_student(net: VPRNet, names: list[str]) -> tuple[nn.Sequential, StudentHead, int]:
    apply_trainable(net, names)
    cut = split_point(net)
    return net.backbone.layers()[:cut], StudentHead(net, cut), cut


# ---- cached inputs and targets ----------------------------------------------------------------
class PrefixRunner:
    """The frozen prefix's output for an image file degraded to a quality: (C, h, w) on CPU.

    Cached (when given a cache) under a key naming everything it depends on:
    the weights (sha256 of the registered model the prefix comes from), the
    cut, the preprocessing, the image's content, the quality, the degradation
    code version and the device kind. Equal to computing it every time."""

    def __init__(
        self,
        prefix: nn.Module,
        cut: int,
        weights_sha256: str,
        preprocess: PreprocessConfig,
        device: torch.device,
        cache: TensorCache | None,
    ) -> None:
        self.prefix, self.cut, self.sha = prefix, cut, weights_sha256
        self.preprocess, self.device, self.cache = preprocess, torch.device(device), cache
        self.preprocess_key = json.dumps(preprocess.model_dump(), sort_keys=True)

    def key(self, path: Path, quality: str) -> str:
        from vpr.media.degrade import DEGRADE_VERSION

        return (
            f"prefix|v{CACHE_VERSION}|{self.sha}|cut={self.cut}|{self.preprocess_key}|{image_sha256(path)}"
            f"|{quality}|degrade-v{DEGRADE_VERSION}|{device_kind(self.device)}"
        )

    def __call__(self, path: Path, quality: str) -> torch.Tensor:
        if self.cache is None:
            return self.compute(path, quality)
        return self.cache.get_or_compute(self.key(path, quality), lambda: {"x": self.compute(path, quality)})["x"]

    def compute(self, path: Path, quality: str) -> torch.Tensor:
        from vpr.media.degrade import degrade_image

        img = degrade_image(load_image(Path(path)), quality)
        x = to_input(img, self.preprocess).unsqueeze(0).to(self.device)
        with torch.no_grad(), autocast_for(self.device):
            h = self.prefix(x)
        return h[0].float().cpu()


class TeacherTargets:
    """Per training image, the teacher's descriptor and channel correlation of the
    original, and its region features when the loss has the `regions` term.

    All come from one `describe` call (the teacher at `orig`, the others as
    extras of the same forward pass). With a cache (`prefix_cache="disk"`)
    the extras stay on disk and are read per batch; without, they are held in memory."""

    def __init__(
        self,
        teacher: LoadedModel,
        paths: list[Path],
        device: torch.device,
        cache: DescriptorCache | None,
        batch_size: int = 8,
        progress: bool = True,
        regions: bool = False,
    ) -> None:
        self.teacher, self.paths, self.device, self.cache = teacher, [Path(p) for p in paths], device, cache
        self.batch_size, self.progress = batch_size, progress
        self.extras: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {GRAM: channel_correlation}
        if regions:
            self.extras[REGIONS] = region_features
        self.desc = torch.zeros(0)  # (N, D) once prepared
        self._rows: dict[str, np.ndarray | CachedRows] = {}
        self.computed = self.cached = 0

    def _describe(self, paths: list[Path], show: bool) -> Described:
        return describe(
            self.teacher,
            paths,
            "orig",
            cache=self.cache,
            batch_size=self.batch_size,
            device=self.device,
            progress="teacher" if (self.progress and show) else False,
            extras=self.extras,
            resize=database_config,  # originals at their own size (policy `database`)
        )

    def prepare(self, ctx: ddp.DistContext) -> None:
        """Describe every image (with a disk cache, processes first split the work
        and then read each other's results), keeping the descriptor table."""
        if self.cache is not None and ctx.world_size > 1:
            mine = self._describe(self.paths[ctx.rank :: ctx.world_size], ctx.is_main)
            self.computed = mine.computed
            ddp.barrier(ctx)
        out = self._describe(self.paths, ctx.is_main)
        self.computed += out.computed
        self.cached = len(self.paths) - self.computed  # by this process: read, not computed
        self.desc = torch.from_numpy(out.desc)
        self._rows = dict(out.extras)

    def rows(self, extra: str, ids: list[int] | np.ndarray) -> torch.Tensor:
        """The teacher's `extra` (GRAM, REGIONS) of images `ids`, stacked."""
        if extra not in self._rows:
            raise RuntimeError(f"teacher targets: no {extra} (call prepare() first; REGIONS needs regions=True)")
        return torch.from_numpy(np.ascontiguousarray(self._rows[extra][np.asarray(ids, dtype=np.int64)]))

    def grams(self, ids: list[int] | np.ndarray) -> torch.Tensor:
        return self.rows(GRAM, ids)

    def regions(self, ids: list[int] | np.ndarray) -> torch.Tensor:
        return self.rows(REGIONS, ids)

    def stats(self) -> dict[str, int]:
        return {"computed": self.computed, "cached": self.cached}
