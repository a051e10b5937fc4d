"""Where a network's initial weights come from.

- `load_vgg16_features`: a `torchvision.models.vgg16().features` state dict in
  safetensors (e.g. ../shared/weights), checked key by key and shape by shape.
- `load_torchvision_imagenet`: torchvision's ImageNet weights, only from the
  local torch hub cache (never downloaded here).
- `import_pytorch_netvlad`: a checkpoint of the pytorch-NetVLAD project,
  read with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.network import VPRNet, build_model


class WeightsError(ValueError):
    """A weights file that cannot be used, with the file and the reason."""


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with a message a user can act on."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    if bad:
        problems.append("wrong shapes: " + "; ".join(bad[:6]))
    if problems:
        raise WeightsError(f"{source}: " + ", ".join(problems))


def load_vgg16_features(net: VPRNet, path: Path) -> None:
    if net.config.backbone.name != "vgg16":
        raise WeightsError(f"{path}: VGG16 features weights need the vgg16 backbone, not {net.config.backbone.name}")
    path = Path(path)
    try:
        sd = load_file(str(path))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    feats = cast(nn.Module, net.backbone.features)
    check_state_dict(feats.state_dict(), sd, str(path))
    feats.load_state_dict(sd, strict=True)


def torchvision_cache_file(arch: str) -> Path:
    weights = {
        "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    }[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_torchvision_imagenet(net: VPRNet) -> None:
    """Load torchvision's ImageNet weights from the local cache (no download)."""
    arch = net.config.backbone.name
    path = torchvision_cache_file(arch)
    if not path.exists():
        raise WeightsError(
            f"{path}: torchvision's ImageNet {arch} weights are not in the local cache; "
            "copy the file there, or pass --weights FILE.safetensors"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    own = net.backbone.state_dict()
    # torchvision's keys are `features.N.*` (VGG, same as ours) or `layerN.*` (ResNet,
    # ours sit under `body.`); the classifier / fc layers we cut off are dropped.
    prefix = "" if arch == "vgg16" else "body."
    mapped = {prefix + k: v for k, v in sd.items() if prefix + k in own}
    check_state_dict(own, mapped, str(path))
    net.backbone.load_state_dict(mapped, strict=True)


def import_pytorch_netvlad(path: Path) -> tuple[VPRNet, dict]:
    """Convert a pytorch-NetVLAD VGG16 checkpoint (encoder.<i>, pool.conv,
    pool.centroids, optional WPCA) into a VPRNet. That project normalised
    inputs the torchvision way, so the preprocessing is `imagenet`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as e:
        raise WeightsError(f"{path}: not a readable weights-only torch checkpoint ({e})") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "pool.centroids" not in sd:
        raise WeightsError(
            f"{path}: no pytorch-NetVLAD state_dict (expected keys encoder.*, pool.conv.weight, pool.centroids)"
        )
    centroids = sd["pool.centroids"]
    k, d = centroids.shape
    wpca = sd.get("WPCA.0.weight")
    cfg = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=k),
        preprocess=PreprocessConfig(mode="imagenet"),
        pca_dim=int(wpca.shape[0]) if wpca is not None else None,
    )
    net = build_model(cfg)
    own = net.state_dict()
    new = {f"backbone.features.{key[len('encoder.') :]}": v for key, v in sd.items() if key.startswith("encoder.")}
    new["netvlad.centroids"] = centroids
    new["netvlad.conv.weight"] = sd["pool.conv.weight"]
    new["netvlad.conv.bias"] = sd.get("pool.conv.bias", torch.zeros(k))  # vladv2=False has no bias
    if wpca is not None:
        new["pca.proj.weight"] = wpca.reshape(wpca.shape[0], -1)
        new["pca.proj.bias"] = sd.get("WPCA.0.bias", torch.zeros(wpca.shape[0]))
    check_state_dict(own, new, str(path))
    net.load_state_dict(new, strict=True)
    details = {
        "source": "pytorch-NetVLAD",
        "file": str(path),
        "clusters": k,
        "dim": d,
        "epoch": int(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), int) else None,
    }
    return net, details
