"""The place-recognition network: backbone -> NetVLAD -> optional PCA-whitening."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vpr.model.backbones import Backbone, build_backbone
from vpr.model.config import ModelConfig
from vpr.model.netvlad import MATCONVNET_FINAL_EPS, NetVLAD, l2_normalize


class PCAWhitening(nn.Module):
    """y = L2norm(W x + b): a PCA projection with whitening, fit on descriptors."""

    def __init__(self, in_dim: int, out_dim: int, norm_eps: float | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm_eps = norm_eps  # see l2_normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(x), 1, self.norm_eps)

    def fit(self, descriptors: np.ndarray, eps: float = 1e-9) -> None:
        """Fit on (N, D) descriptors. Uses the N x N Gram matrix, since N << D
        for NetVLAD (32768-d); needs N > out_dim."""
        x = np.asarray(descriptors, dtype=np.float64)
        n, d = x.shape
        k = self.proj.out_features
        if n <= k:
            raise ValueError(f"PCA to {k} dims needs more than {k} descriptors, got {n}")
        mean = x.mean(axis=0)
        xc = x - mean
        eigval, eigvec = np.linalg.eigh(xc @ xc.T / n)  # ascending
        order = np.argsort(eigval)[::-1][:k]
        lam, u = np.maximum(eigval[order], eps), eigvec[:, order]
        comps = (xc.T @ u) / np.sqrt(lam * n)  # (D, k) unit principal directions
        w = (comps / np.sqrt(lam)).T  # whitening
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(w).float())
            self.proj.bias.copy_(torch.from_numpy(-(w @ mean)).float())


class VPRNet(nn.Module):
    """forward(x) -> L2-normalised global descriptors (B, descriptor_dim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone: Backbone = build_backbone(config.backbone)
        nv = config.netvlad
        self.netvlad = NetVLAD(nv.clusters, self.backbone.out_channels, nv.alpha, nv.norm_eps)
        final_eps = None if nv.norm_eps is None else MATCONVNET_FINAL_EPS
        self.pca = PCAWhitening(self.netvlad.out_dim, config.pca_dim, final_eps) if config.pca_dim else None

    @property
    def descriptor_dim(self) -> int:
        return self.config.pca_dim or self.netvlad.out_dim

    def aggregate(self, features: torch.Tensor) -> torch.Tensor:
        d = self.netvlad(features)
        return self.pca(d) if self.pca is not None else d

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.backbone(x)
        desc = self.aggregate(feats)
        return (desc, feats) if return_features else desc


def build_model(config: ModelConfig | dict) -> VPRNet:
    """Build a network by name from a config dict (hloc style)."""
    if isinstance(config, dict):
        config = ModelConfig.model_validate(config)
    return VPRNet(config)
