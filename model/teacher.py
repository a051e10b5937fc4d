"""Build, initialise and register a teacher: the `vpr model init` workflow."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vpr.model.clusters import fit_pca, init_clusters
from vpr.model.config import ModelConfig
from vpr.model.fileio import sha256_file
from vpr.model.network import VPRNet, build_model
from vpr.model.preprocess import list_images
from vpr.model.registry import ModelRef, Registry
from vpr.model.weights import WeightsError, load_torchvision_imagenet, load_vgg16_features

log = logging.getLogger(__name__)


def load_backbone_weights(
    net: VPRNet, weights: str, weights_home: Path | None = None, offline: bool = True, progress: bool = True
) -> dict:
    """`none`, `imagenet` (the catalogue's torchvision file in `weights_home`, fetched
    unless `offline`) or a safetensors file; returns what to record."""
    if weights == "none":
        log.warning("backbone weights: none (random init); descriptors will be poor")
        return {"weights": "none"}
    if weights == "imagenet":
        if weights_home is None:
            raise WeightsError("--weights imagenet needs the weights folder ($VPR_HOME/weights)")
        return load_torchvision_imagenet(net, weights_home, offline=offline, progress=progress)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file (use a .safetensors file, 'imagenet' or 'none')")
    load_vgg16_features(net, path)
    return {"weights": str(path.resolve()), "weights_sha256": sha256_file(path)}


def init_teacher(
    registry: Registry,
    name: str,
    config: ModelConfig,
    weights: str,
    cluster_images: Path,
    samples: int = 50_000,
    seed: int = 0,
    pca_images: Path | None = None,
    activate: bool = True,
    device: torch.device | str = "cpu",
    offline: bool = True,
) -> ModelRef:
    """`offline` False lets `weights="imagenet"` fetch the catalogue file into
    `$VPR_HOME/weights` (the registry's sibling folder) when it is not there."""
    torch.manual_seed(seed)
    net = build_model(config).to(device)
    weights_home = registry.root.parent / "weights"
    details = {"source": "init", **load_backbone_weights(net, weights, weights_home, offline=offline)}
    images = list_images(cluster_images)
    details |= init_clusters(net, images, samples=samples, seed=seed, device=device)
    details["cluster_folder"] = str(Path(cluster_images).resolve())
    if config.pca_dim:
        pca_list = list_images(pca_images) if pca_images else images
        details |= fit_pca(net, pca_list, device=device)
    ref = registry.register(name, net.cpu(), role="teacher", details=details)
    if activate:
        registry.activate(ref)
    return ref
