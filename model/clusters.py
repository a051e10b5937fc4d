"""Initialise NetVLAD centroids (and PCA) from a folder of images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpr.model.extract import embed_inputs
from vpr.model.netvlad import kmeans_centroids
from vpr.model.network import VPRNet
from vpr.model.preprocess import database_config, load_image, to_input

log = logging.getLogger(__name__)


def sample_local_features(
    net: VPRNet, images: list[Path], per_image: int, seed: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Conv features at `per_image` random locations of each image -> (N, C)."""
    rng = np.random.default_rng(seed)
    out = []
    net.eval().to(device)
    for path in tqdm(images, desc="local features", unit="img"):
        # the database side of the size rule: database images at their own size (policy `database`)
        x = to_input(load_image(path), database_config(net.config.preprocess)).unsqueeze(0).to(device)
        with torch.inference_mode():
            f = net.backbone(x)[0].flatten(1).T.float().cpu().numpy()  # (h*w, C)
        take = rng.choice(len(f), size=min(per_image, len(f)), replace=False)
        out.append(f[take])
    return np.concatenate(out)


def init_clusters(
    net: VPRNet, images: list[Path], samples: int = 50_000, seed: int = 0, device: torch.device | str = "cpu"
) -> dict:
    """k-means centroids from about `samples` local features; returns what to record."""
    if not images:
        raise ValueError("cluster initialisation needs at least one image")
    per_image = max(1, int(np.ceil(samples / len(images))))
    feats = sample_local_features(net, images, per_image, seed, device)
    k = net.netvlad.clusters
    if len(feats) < k:
        raise ValueError(
            f"only {len(feats)} local features from {len(images)} images; need at least {k} clusters' worth"
        )
    log.info("k-means: %d clusters on %d local features (seed %d)", k, len(feats), seed)
    net.netvlad.init_from_centroids(kmeans_centroids(feats, k, seed=seed))
    return {"cluster_images": len(images), "cluster_samples": int(len(feats)), "cluster_seed": seed}


def fit_pca(net: VPRNet, images: list[Path], device: torch.device | str = "cpu") -> dict:
    """Fit the PCA-whitening layer on NetVLAD descriptors of `images`."""
    if net.pca is None:
        raise ValueError("the model has no PCA layer (set pca_dim)")
    saved, net.pca = net.pca, None  # describe with raw NetVLAD
    try:
        # model/ cannot use the describe loop (nor needs its cache: the weights are
        # not registered yet); the forward pass is the same, streamed image by image
        cfg = database_config(net.config.preprocess)
        inputs = (to_input(load_image(p), cfg) for p in tqdm(images, desc="pca descriptors"))
        descs, _ = embed_inputs(net, inputs, device=device)
    finally:
        net.pca = saved
    net.pca.fit(descs)
    return {"pca_images": len(images), "pca_dim": net.pca.proj.out_features}
