"""CNN backbones that map an image tensor to a dense local-feature map.

Each backbone is a `Backbone`: an nn.Module with `out_channels`, a list of
named blocks (so that "which layers train" is a list of names) and a default
set of trainable blocks. Built by name from a `BackboneConfig`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
import torchvision
from torch import nn

from vpr.model.config import BACKBONES, BackboneConfig

# torchvision.models.vgg16().features indices of the 13 convolutions.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Blocks of VGG16 up to conv5_3 (index 28), without its ReLU and pool5:
# names of the paper's figures, index ranges into `features`.
_VGG_BLOCKS = OrderedDict(conv1=(0, 5), conv2=(5, 10), conv3=(10, 17), conv4=(17, 24), conv5=(24, 29))


class Backbone(nn.Module):
    """Base interface: forward(x) -> feature map (B, out_channels, H', W')."""

    out_channels: int
    default_trainable: tuple[str, ...]

    def blocks(self) -> OrderedDict[str, nn.Module]:
        raise NotImplementedError

    def layers(self) -> nn.Sequential:
        """The backbone as one nn.Sequential whose composition is forward().
        Distillation splits it into a frozen prefix, whose output it caches,
        and a trainable rest."""
        raise NotImplementedError

    def set_trainable(self, names: list[str] | tuple[str, ...] | None) -> None:
        """Freeze every block but `names` (None: the backbone's default)."""
        names = self.default_trainable if names is None else tuple(names)
        blocks = self.blocks()
        unknown = set(names) - set(blocks)
        if unknown:
            raise ValueError(f"unknown blocks {sorted(unknown)}; this backbone has {list(blocks)}")
        for name, block in blocks.items():
            for p in block.parameters():
                p.requires_grad_(name in names)


class VGG16Backbone(Backbone):
    """torchvision VGG16 `features` cut after conv5_3, before its ReLU and pool5.

    Keeping the keys of `features` (0.weight ... 28.bias) lets a
    `torchvision.models.vgg16().features` state dict load unchanged.
    """

    out_channels = 512
    default_trainable = ("conv5",)

    def __init__(self) -> None:
        super().__init__()
        full = torchvision.models.vgg16(weights=None).features
        self.features = nn.Sequential(*list(full.children())[:29])

    def blocks(self) -> OrderedDict[str, nn.Module]:
        layers = list(self.features.children())
        return OrderedDict((n, nn.Sequential(*layers[a:b])) for n, (a, b) in _VGG_BLOCKS.items())

    def layers(self) -> nn.Sequential:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNetBackbone(Backbone):
    """torchvision ResNet cut after layer3 (1/16) or layer4 (1/32), no pooling."""

    def __init__(self, arch: str, cut: str) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
        if cut == "layer4":
            names.append("layer4")
        self.body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        last = getattr(net, cut)[-1]
        self.out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        self.default_trainable = (cut,)

    def blocks(self) -> OrderedDict[str, nn.Module]:
        stem = [cast(nn.Module, self.body.conv1), cast(nn.Module, self.body.bn1)]
        b: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.ModuleList(stem))
        for n, m in self.body.named_children():
            if n.startswith("layer"):
                b[n] = m
        return b

    def layers(self) -> nn.Sequential:
        return self.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.name == "vgg16":
        bb: Backbone = VGG16Backbone()
    elif cfg.name in ("resnet18", "resnet50"):
        bb = ResNetBackbone(cfg.name, cfg.cut)
    else:  # the config validator already rejects this; keep the message anyway
        raise ValueError(f"unknown backbone {cfg.name!r}; choose one of {', '.join(BACKBONES)}")
    bb.set_trainable(cfg.trainable)
    return bb
