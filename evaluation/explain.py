"""Where a descriptor draws from: per-location heatmaps, teacher vs student.

Method: an exact linear decomposition of the NetVLAD descriptor over image
locations (not a gradient method; NetVLAD's final L2 normalisation makes the
gradient of the descriptor along itself zero, so saliency of "the descriptor"
needs a reference anyway). With x^_n the L2-normalised local feature at
location n, a_kn its soft assignment to cluster k, c_k the centroids,

    V_k = sum_n a_kn (x^_n - c_k)             (residual sum of cluster k)
    d_k = V_k / (||V_k|| * Z)                 (intra- then global normalisation;
                                               Z = ||[V_1/||V_1||, ..., V_K/||V_K||]||)

so the descriptor is a sum over locations, d = sum_n g_n with
g_n = [a_kn (x^_n - c_k) / (||V_k|| Z)]_k, and

    share(n) = <d, g_n>,    sum_n share(n) = ||d||^2 = 1.

share(n) is the part of the descriptor location n is responsible for: it
combines the assignment mass of the location with how well its residual
agrees with the cluster's aggregate (a location that is assigned strongly but
points elsewhere than the rest of its cluster gets little or negative share).
For models with PCA-whitening the decomposition is of the NetVLAD descriptor
before the projection. The overlay shows max(share, 0) * N (1 = the
uniform share), on one colour scale for all panels of an image.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vpr.model.extract import default_device
from vpr.model.fileio import atomic_write_bytes, atomic_write_json
from vpr.model.network import VPRNet
from vpr.model.preprocess import load_image, target_size, to_input
from vpr.model.registry import LoadedModel, Registry

log = logging.getLogger(__name__)
EPS = 1e-12


def descriptor_shares(net: VPRNet, fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) conv maps -> (B, h, w) share of each location in the NetVLAD descriptor."""
    layer = net.netvlad
    b, c, h, w = fmap.shape
    x = F.normalize(fmap.float(), p=2, dim=1)
    soft = F.softmax(layer.conv(x).view(b, layer.clusters, -1), dim=1)  # (B, K, N)
    flat = x.view(b, c, -1)  # (B, C, N)
    cent = layer.centroids.float()
    vlad = torch.bmm(soft, flat.transpose(1, 2)) - soft.sum(dim=2, keepdim=True) * cent.unsqueeze(0)  # (B, K, C)
    norms = vlad.norm(dim=2, keepdim=True).clamp_min(EPS)  # ||V_k||
    intra = vlad / norms
    z = intra.flatten(1).norm(dim=1).clamp_min(EPS).view(b, 1, 1)
    d = intra / z  # (B, K, C) = the descriptor
    scale = soft / (norms * z)  # (B, K, N): a_kn / (||V_k|| Z)
    dx = torch.bmm(d, flat)  # <d_k, x^_n>  (B, K, N)
    dc = (d * cent.unsqueeze(0)).sum(dim=2, keepdim=True)  # <d_k, c_k>  (B, K, 1)
    return (scale * (dx - dc)).sum(dim=1).view(b, h, w)


@dataclass
class Panel:
    title: str
    image: Image.Image  # what the network saw (input size)
    heat: np.ndarray  # (h, w) shares
    stats: dict[str, float]


def heat_stats(shares: np.ndarray) -> dict[str, float]:
    """Summaries that let two models be compared in numbers, not only pictures."""
    s = shares.ravel()
    pos = np.clip(s, 0, None)
    k = max(1, int(round(0.1 * s.size)))
    p = pos / pos.sum() if pos.sum() > 0 else np.full_like(pos, 1 / pos.size)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(s.size)) if s.size > 1 else 0.0
    return {
        "top10pct_share": float(np.sort(s)[::-1][:k].sum()),
        "negative_share": float(-s[s < 0].sum()),
        "normalised_entropy": entropy,
        "locations": int(s.size),
    }


def explain_one(model: LoadedModel, img: Image.Image, device: torch.device, title: str) -> Panel:
    net = model.net
    x = to_input(img, net.config.preprocess).unsqueeze(0).to(device)
    with torch.inference_mode():
        shares = descriptor_shares(net, net.backbone(x))[0].cpu().numpy()
    shown = img.resize(target_size(*img.size, net.config.preprocess), Image.Resampling.BICUBIC)
    return Panel(title, shown, shares, heat_stats(shares))


def relative_heat(panel: Panel) -> np.ndarray:
    """Shares in multiples of the uniform share 1/N (1 = average location), negatives as 0."""
    return np.clip(panel.heat, 0, None) * panel.heat.size


def overlay(panel: Panel, ax, vmax: float, alpha: float = 0.55) -> None:
    import matplotlib

    heat = np.clip(relative_heat(panel) / vmax, 0, 1)
    grey = Image.fromarray((heat * 255).astype(np.uint8))
    up = np.asarray(grey.resize(panel.image.size, Image.Resampling.BILINEAR), np.float32) / 255
    colours = matplotlib.colormaps["jet"](up)[..., :3]
    base = np.asarray(panel.image, np.float32) / 255
    ax.imshow(np.clip((1 - alpha) * base + alpha * colours, 0, 1))
    ax.set_title(f"{panel.title}\ntop 10% of locations: {panel.stats['top10pct_share']:.0%} of descriptor", fontsize=8)
    ax.axis("off")


def render(panels: list[Panel], source: str) -> bytes:
    """The input, then one overlay per model on ONE colour scale (so panels compare):
    0 .. vmax times the uniform share, vmax = the 99th percentile over all panels (at least 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = max(2.0, max(float(np.percentile(relative_heat(p), 99)) for p in panels))
    w, h = panels[0].image.size
    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6 * h / w + 0.8), squeeze=False)
    axes[0, 0].imshow(panels[0].image)
    axes[0, 0].set_title(f"{source}\ncolour: 0 .. {vmax:.1f} x uniform share", fontsize=8)
    axes[0, 0].axis("off")
    for ax, panel in zip(axes[0, 1:], panels):
        overlay(panel, ax, vmax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def output_names(images: list[Path], quality: str | None) -> list[str]:
    """`<stem>[-<quality>].png`, numbered when two inputs share a stem."""
    stems = [p.stem for p in images]
    suffix = f"-{quality}" if quality else ""
    return [f"{s}{suffix}.png" if stems.count(s) == 1 else f"{k:03d}-{s}{suffix}.png" for k, s in enumerate(stems)]


def explain_images(
    registry: Registry,
    models: list[str],
    images: list[Path],
    out: Path,
    quality: str | None = None,
    device: torch.device | str | None = None,
) -> list[Path]:
    """One PNG per image in `out`: the image as the model(s) saw it, then one
    heatmap overlay per model side by side; plus `explain.json` with numbers."""
    from vpr.media.degrade import degrade_image, parse_quality

    if not models:
        raise ValueError("explain needs at least one --model")
    if not images:
        raise ValueError("explain needs at least one image")
    q = str(parse_quality(quality)) if quality else None
    device = torch.device(device) if device is not None else default_device()
    loaded = [registry.load(m, device=device) for m in models]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, summary = [], []
    for path, name in zip(images, output_names([Path(p) for p in images], q)):
        img = load_image(Path(path))
        if q:
            img = degrade_image(img, q)
        panels = [explain_one(m, img, device, f"{m.ref} ({m.manifest.get('role')})") for m in loaded]
        target = out / name
        atomic_write_bytes(target, render(panels, f"{Path(path).name} @ {q or 'orig'}"))
        written.append(target)
        summary.append(
            {
                "image": str(path),
                "png": name,
                "quality": q or "orig",
                "models": {p.title.split(" ")[0]: p.stats for p in panels},
            }
        )
        log.info("%s: heatmaps of %d model(s)", target, len(panels))
    atomic_write_json(
        out / "explain.json", {"method": "NetVLAD descriptor share per location (train/explain.py)", "images": summary}
    )
    return written
