"""What a distillation step consumes: training images, the student split at its
first trainable layer, the frozen prefix's (cached) outputs and the teacher's
(cached) targets.

Why the split: only the student's top layers train, so the frozen prefix's
output for an (image, quality) pair never changes, and neither do the
teacher's targets for an image. Both are computed once (see
`train.distill_cache`); each step then runs only `StudentHead`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vpr.model.config import PreprocessConfig
from vpr.model.extract import autocast_for, extract
from vpr.model.network import VPRNet
from vpr.model.preprocess import list_images, load_image, to_input
from vpr.model.registry import LoadedModel
from vpr.train import ddp
from vpr.train.distill_cache import FileIdentity, TensorCache
from vpr.train.losses import channel_correlation

log = logging.getLogger(__name__)

HEAD_EXTRAS = ("netvlad", "pca")
CACHE_VERSION = 1


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
        from vpr.data.datasets import open_dataset, parse_dataset_arg

        kind, path = parse_dataset_arg(cfg.dataset)
        ds = open_dataset(kind, path, **cfg.dataset_options)
        images = [TrainImage(Path(i.path), i.utm) for i in ds.database]
        source = {"dataset": cfg.dataset, "dataset_name": ds.name, "dataset_part": "database"}
    keep = spread(len(images), cfg.limit)
    images = [images[i] for i in keep]
    if len(images) < 2:
        raise ValueError(f"distillation needs at least 2 training images, got {len(images)}")
    return images, {**source, "image_count": len(images)}


def has_positions(images: list[TrainImage]) -> bool:
    return all(i.utm is not None for i in images)


def validation_split(images: list[TrainImage], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images, chosen at random (seeded) -> (train ids, val ids)."""
    n = len(images)
    n_val = int(round(n * fraction))
    if n_val == 0:
        return np.arange(n), np.zeros(0, np.int64)
    if n - n_val < 2:
        raise ValueError(f"val_fraction {fraction} leaves {n - n_val} of {n} images to train on")
    val = np.sort(np.random.default_rng([seed, 17]).choice(n, n_val, replace=False))
    return np.setdiff1d(np.arange(n), val), val


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
def device_tag(device: torch.device) -> str:
    """Part of cache keys: CUDA runs under bf16 autocast, so its tensors differ from CPU's."""
    return "cuda-bf16" if torch.device(device).type == "cuda" else "cpu-fp32"


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
        identity: FileIdentity | None = None,
    ) -> None:
        self.prefix, self.cut, self.sha = prefix, cut, weights_sha256
        self.preprocess, self.device, self.cache = preprocess, torch.device(device), cache
        self.identity = identity or FileIdentity()
        self.preprocess_key = json.dumps(preprocess.model_dump(), sort_keys=True)

    def key(self, path: Path, quality: str) -> str:
        from vpr.media.degrade import DEGRADE_VERSION

        return (
            f"prefix|v{CACHE_VERSION}|{self.sha}|cut={self.cut}|{self.preprocess_key}|{self.identity(path)}"
            f"|{quality}|degrade-v{DEGRADE_VERSION}|{device_tag(self.device)}"
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
    """Per training image, the teacher's descriptor and channel correlation of the original."""

    def __init__(
        self,
        teacher: LoadedModel,
        paths: list[Path],
        device: torch.device,
        cache: TensorCache,
        identity: FileIdentity | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        self.teacher, self.paths, self.device, self.cache = teacher, [Path(p) for p in paths], device, cache
        self.identity = identity or FileIdentity()
        self.batch_size, self.progress = batch_size, progress
        self.desc = torch.zeros(0)  # (N, D) once prepared

    def key(self, i: int) -> str:
        return (
            f"teacher-targets|v{CACHE_VERSION}|{self.teacher.sha256}|{self.identity(self.paths[i])}"
            f"|{device_tag(self.device)}"
        )

    def prepare(self, ctx: ddp.DistContext) -> None:
        """Compute what is missing (processes split the work when the cache is on
        disk and read each other's results), then build the descriptor table."""
        ids = np.arange(len(self.paths))
        self._fill(ids[ctx.rank :: ctx.world_size] if self.cache.folder else ids, ctx.is_main)
        ddp.barrier(ctx)
        self.desc = torch.stack([self.get(i)["desc"] for i in range(len(self.paths))])

    def _fill(self, ids: np.ndarray, show: bool) -> None:
        missing = [int(i) for i in ids if self.cache.get(self.key(int(i))) is None]
        log.info("teacher targets: %d of %d images to compute", len(missing), len(ids))
        bar = tqdm(total=len(missing), desc="teacher", unit="img", disable=not (self.progress and show))
        for start in range(0, len(missing), 32):
            part = missing[start : start + 32]
            descs, feats = extract(
                self.teacher.net,
                [self.paths[i] for i in part],
                batch_size=self.batch_size,
                device=self.device,
                return_features=True,
            )
            for i, d, f in zip(part, descs, feats):
                self.cache.put(self.key(i), {"desc": torch.from_numpy(d), "gram": channel_correlation(f[None])[0]})
            bar.update(len(part))
        bar.close()

    def get(self, i: int) -> dict[str, torch.Tensor]:
        return self.cache.get_or_compute(self.key(i), lambda: self._compute(i))

    def _compute(self, i: int) -> dict[str, torch.Tensor]:
        descs, feats = extract(self.teacher.net, [self.paths[i]], device=self.device, return_features=True)
        return {"desc": torch.from_numpy(descs[0]), "gram": channel_correlation(feats[0][None])[0]}

    def grams(self, ids: list[int]) -> torch.Tensor:
        return torch.stack([self.get(i)["gram"] for i in ids])
