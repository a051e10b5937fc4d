"""The NetVLAD aggregation layer (Arandjelovic et al., CVPR 2016).

Local features are L2-normalised per location, softly assigned to K clusters
by a 1x1 convolution, their residuals to the centroids summed per cluster,
each cluster's vector L2-normalised (intra-normalisation) and the whole
flattened K*D vector L2-normalised. Output dimension K*D (64*512 = 32768 for
VGG16). `l2_normalize` is every L2 step's one home: PyTorch's clamped norm, or
matconvnet's x / sqrt(|x|^2 + eps) for the imported MATLAB releases.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MATCONVNET_FINAL_EPS = 1e-12  # the MATLAB release's postL2 / finalL2 layers


def l2_normalize(x: torch.Tensor, dim: int, eps: float | None = None) -> torch.Tensor:
    """None: x / max(|x|, 1e-12) (F.normalize); eps: x / sqrt(|x|^2 + eps) (matconvnet)."""
    if eps is None:
        return F.normalize(x, p=2, dim=dim)
    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True) + eps)


class NetVLAD(nn.Module):
    def __init__(self, clusters: int = 64, dim: int = 512, alpha: float = 100.0, norm_eps: float | None = None) -> None:
        super().__init__()
        self.clusters, self.dim, self.alpha, self.norm_eps = clusters, dim, alpha, norm_eps
        self.conv = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))

    @property
    def out_dim(self) -> int:
        return self.clusters * self.dim

    def init_from_centroids(self, centroids: np.ndarray | torch.Tensor, alpha: float | None = None) -> None:
        """Set centroids and the assignment conv so that, on unit-norm inputs,
        softmax(conv(x)) approximates a sharp nearest-centroid assignment:
        w_k = 2*alpha*c_k, b_k = -alpha*|c_k|^2 (the original paper's init)."""
        c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        if c.shape != (self.clusters, self.dim):
            raise ValueError(f"centroids have shape {tuple(c.shape)}, expected {(self.clusters, self.dim)}")
        alpha = self.alpha if alpha is None else alpha
        with torch.no_grad():
            self.centroids.copy_(c)
            self.conv.weight.copy_((2.0 * alpha * c).view(self.clusters, self.dim, 1, 1))
            assert self.conv.bias is not None  # built with a bias
            self.conv.bias.copy_(-alpha * (c * c).sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[:2]
        eps = self.norm_eps
        x = l2_normalize(x, 1, eps)
        soft = F.softmax(self.conv(x).view(b, self.clusters, -1), dim=1)  # (B, K, N)
        flat = x.view(b, d, -1)  # (B, D, N)
        # sum_n a_kn (x_n - c_k) = (A X^T)_k - (sum_n a_kn) c_k
        vlad = torch.bmm(soft, flat.transpose(1, 2)) - soft.sum(dim=2).unsqueeze(2) * self.centroids.unsqueeze(0)
        vlad = l2_normalize(vlad, 2, eps)
        return l2_normalize(vlad.reshape(b, -1), 1, None if eps is None else MATCONVNET_FINAL_EPS)


def kmeans_centroids(local_features: np.ndarray, clusters: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """k-means (faiss) on L2-normalised local features -> (K, D) float32 centroids."""
    import faiss

    x = np.ascontiguousarray(local_features, dtype=np.float32)
    if x.ndim != 2 or len(x) < clusters:
        raise ValueError(f"k-means needs at least {clusters} local features of shape (N, D), got {x.shape}")
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    km = faiss.Kmeans(x.shape[1], clusters, niter=niter, seed=seed, verbose=False, spherical=False)
    km.train(x)
    assert km.centroids is not None  # set by train()
    return km.centroids.astype(np.float32)
