"""Where a network's initial weights come from.

- `load_vgg16_features`: a `torchvision.models.vgg16().features` state dict in
  safetensors (e.g. ../shared/weights), checked key by key and shape by shape.
- `load_torchvision_imagenet`: torchvision's ImageNet weights (catalogue entries
  `torchvision-*-imagenet`): converted to safetensors in `$VPR_HOME/weights`
  from the sha256-checked original, which comes from there, from torchvision's
  local cache, or is fetched when the caller allows downloads.
- `import_pytorch_netvlad`: a checkpoint of the pytorch-NetVLAD project,
  read with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save
from torch import nn

from vpr.model.catalogue import Entry, imagenet_entry
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.fetch import fetch, import_file, present, read_record, update_record
from vpr.model.fileio import atomic_write_bytes, sha256_file
from vpr.model.network import VPRNet, build_model

log = logging.getLogger(__name__)


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
    """Where torchvision itself would have put the catalogue's file (used when present)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_entry(arch).file_name


def converted_path(entry: Entry, weights_home: Path) -> Path:
    return Path(weights_home) / f"{entry.name}.safetensors"


def ensure_imagenet(arch: str, weights_home: Path, *, offline: bool, progress: bool = True) -> Path:
    """The safetensors copy of torchvision's ImageNet weights for `arch`.

    Converted earlier (and unchanged since: its sha256 is in the entry's
    record), else converted now from the original `.pth`: stored in
    `weights_home`, else copied from torchvision's local cache, else fetched
    (unless `offline`). The original is a pickle, so it is read only after its
    sha256 matched the catalogue's, and only with `torch.load(weights_only=True)`.
    """
    entry = imagenet_entry(arch)
    weights_home = Path(weights_home)
    out = converted_path(entry, weights_home)
    done = read_record(entry, weights_home).get("converted") or {}
    if out.is_file() and done.get("source_sha256") == entry.sha256:
        if sha256_file(out) == done.get("sha256"):
            return out
        log.warning("%s: does not match the sha256 recorded when it was converted; converting again", out)
    src = present(entry, weights_home)
    if src is None and torchvision_cache_file(arch).is_file():
        src = import_file(entry, torchvision_cache_file(arch), weights_home)
    if src is None:
        if not offline:
            log.info(
                "ImageNet %s weights: fetching %s (%s) from %s", arch, entry.name, entry.size_text(), entry.urls[0]
            )
        src = fetch(entry, weights_home, offline=offline, progress=progress)
    try:
        state = torch.load(src.path, map_location="cpu", weights_only=True)
    except Exception as e:  # checked bytes that are still not a tensor dict: say so, name the file
        raise WeightsError(f"{src.path}: not a weights-only torch state dict ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{src.path}: not a state dict of tensors")
    atomic_write_bytes(out, save({k: v.contiguous() for k, v in state.items()}, metadata={"entry": entry.name}))
    update_record(
        entry, weights_home, converted={"file": out.name, "sha256": sha256_file(out), "source_sha256": src.sha256}
    )
    log.info("%s: converted to %s", entry.name, out)
    return out


def load_torchvision_imagenet(net: VPRNet, weights_home: Path, *, offline: bool, progress: bool = True) -> dict:
    """Load torchvision's ImageNet weights into the backbone (see `ensure_imagenet`);
    returns what the registry records about them."""
    arch = net.config.backbone.name
    entry = imagenet_entry(arch)
    path = ensure_imagenet(arch, weights_home, offline=offline, progress=progress)
    sd = load_file(str(path))
    own = net.backbone.state_dict()
    # torchvision's keys are `features.N.*` (VGG, same as ours) or `layerN.*` (ResNet,
    # ours sit under `body.`); the classifier / fc layers we cut off are dropped.
    prefix = "" if arch == "vgg16" else "body."
    mapped = {prefix + k: v for k, v in sd.items() if prefix + k in own}
    check_state_dict(own, mapped, str(path))
    net.backbone.load_state_dict(mapped, strict=True)
    return {"weights": "torchvision-imagenet", "weights_entry": entry.name, "weights_sha256": entry.sha256}


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
