"""The weights catalogue: every published file this project knows how to fetch and use.

An entry names one file: what it is (a backbone's initial weights, or a whole
VPR model), the preprocessing it was trained with, its license, the URLs it is
served from (mirrors, tried in order), its size and its sha256. `vpr weights
fetch` downloads it into `$VPR_HOME/weights/<file_name>` and checks the hash
before anything reads it; `vpr weights import` checks a file brought by hand
against the same hash (air-gapped machines).

Where the hashes come from (`checksum_source`): neither PyTorch nor hloc publish
full sha256 sums. torchvision names each file after the first 8 hex digits of
its sha256 and checks only those; the full sums and sizes below were recorded
independently by several public projects that pin these files, and each agrees
with torchvision's 8-digit prefix (a test checks the prefix). For the MATLAB
NetVLAD releases, one public project pins Pitts30K's sum; TokyoTM's is not
published anywhere we found, so it has none: fetching it needs the sum from the
user (`--sha256`) or an explicit `--trust-on-first-use`, which pins the sum seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["backbone", "vpr-model"]
FileFormat = Literal["torch-pickle", "matlab-struct"]

MB = 1_000_000


class CatalogueError(ValueError):
    """An unknown catalogue entry, with the names there are."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind
    arch: str  # the backbone the file fits (vgg16, resnet18, resnet50)
    description: str
    preprocessing: str  # the input normalisation the weights expect
    license: str
    urls: tuple[str, ...]  # mirrors, tried in order
    file_name: str  # name under $VPR_HOME/weights
    file_format: FileFormat
    sha256: str | None  # None: not published; the user supplies it or trusts the first download
    size: int | None  # bytes; None: unknown (taken from the server's Content-Length)
    checksum_source: str  # where sha256 and size come from

    def size_text(self) -> str:
        return f"{self.size / MB:.0f} MB" if self.size else "size unknown"

    def import_hint(self) -> str:
        """How to bring the file by hand (what offline errors tell the user)."""
        return f"download {self.urls[0]} elsewhere and run `vpr weights import {self.name} FILE`"


_TORCHVISION_LICENSE = (
    "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms allow non-commercial research use"
)
_TORCHVISION_HASHES = (
    "full sha256 and size as pinned by several public projects; its first 8 hex digits are the "
    "ones torchvision puts in the file name and checks"
)
_NETVLAD_LICENSE = (
    "NetVLAD (Arandjelovic et al., CVPR 2016; relja/netvlad, MIT-licensed code); trained on Google "
    "Street View images (Pittsburgh / Tokyo Time Machine): research use, see "
    "https://www.di.ens.fr/willow/research/netvlad/"
)
_NETVLAD_LAYOUT = (
    "MATLAB (matconvnet) net converted to plain structs (uzh-rpg/netvlad_tf_open net_class2struct.m), "
    "as hloc serves it: VGG16 conv1_1..conv5_3 (no ReLU after conv5_3), L2, NetVLAD K=64 (no assignment "
    "bias), intra-normalisation, L2, PCA-whitening to 4096-d, L2"
)
_MATLAB_PREPROCESSING = "RGB in 0..255 minus the file's averageImage (caffe-style mean subtraction, no scaling)"

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="torchvision-vgg16-imagenet",
        kind="backbone",
        arch="vgg16",
        description="torchvision VGG16 ImageNet classifier (IMAGENET1K_V1); its conv layers seed a teacher",
        preprocessing="imagenet: RGB/255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225)",
        license=_TORCHVISION_LICENSE,
        urls=("https://download.pytorch.org/models/vgg16-397923af.pth",),
        file_name="vgg16-397923af.pth",
        file_format="torch-pickle",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        size=553_433_881,
        checksum_source=_TORCHVISION_HASHES,
    ),
    Entry(
        name="torchvision-resnet18-imagenet",
        kind="backbone",
        arch="resnet18",
        description="torchvision ResNet18 ImageNet classifier (IMAGENET1K_V1)",
        preprocessing="imagenet: RGB/255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225)",
        license=_TORCHVISION_LICENSE,
        urls=("https://download.pytorch.org/models/resnet18-f37072fd.pth",),
        file_name="resnet18-f37072fd.pth",
        file_format="torch-pickle",
        sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        size=46_830_571,
        checksum_source=_TORCHVISION_HASHES,
    ),
    Entry(
        name="torchvision-resnet50-imagenet",
        kind="backbone",
        arch="resnet50",
        description="torchvision ResNet50 ImageNet classifier (IMAGENET1K_V2)",
        preprocessing="imagenet: RGB/255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225)",
        license=_TORCHVISION_LICENSE,
        urls=("https://download.pytorch.org/models/resnet50-11ad3fa6.pth",),
        file_name="resnet50-11ad3fa6.pth",
        file_format="torch-pickle",
        sha256="11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
        size=102_540_417,
        checksum_source=_TORCHVISION_HASHES,
    ),
    Entry(
        name="netvlad-pitts30k",
        kind="vpr-model",
        arch="vgg16",
        description="NetVLAD VGG16 + NetVLAD + whitening, 4096-d, trained on Pittsburgh 30k. " + _NETVLAD_LAYOUT,
        preprocessing=_MATLAB_PREPROCESSING,
        license=_NETVLAD_LICENSE,
        urls=("https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat",),
        file_name="Pitts30K_struct.mat",
        file_format="matlab-struct",
        sha256="a67d9d897d3b7942f206478e3a22a4c4c9653172ae2447041d35f6cb278fdc67",
        size=None,
        checksum_source=(
            "sha256 as pinned by one public project (Intel SceneScape's NetVLAD loader); not published by "
            "hloc or the NetVLAD authors; size not published (about 530 MB)"
        ),
    ),
    Entry(
        name="netvlad-tokyotm",
        kind="vpr-model",
        arch="vgg16",
        description="NetVLAD VGG16 + NetVLAD + whitening, 4096-d, trained on Tokyo Time Machine. " + _NETVLAD_LAYOUT,
        preprocessing=_MATLAB_PREPROCESSING,
        license=_NETVLAD_LICENSE,
        urls=("https://cvg-data.inf.ethz.ch/hloc/netvlad/TokyoTM_struct.mat",),
        file_name="TokyoTM_struct.mat",
        file_format="matlab-struct",
        sha256=None,
        size=None,
        checksum_source=(
            "no published sha256 or size: give the sum with --sha256, or pin the first download's with "
            "--trust-on-first-use"
        ),
    ),
)

CATALOGUE: dict[str, Entry] = {e.name: e for e in ENTRIES}

# Which entry `--weights imagenet` means for each backbone.
IMAGENET_ENTRY = {
    "vgg16": "torchvision-vgg16-imagenet",
    "resnet18": "torchvision-resnet18-imagenet",
    "resnet50": "torchvision-resnet50-imagenet",
}


def get_entry(name: str) -> Entry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise CatalogueError(f"no catalogue entry {name!r}; entries: {', '.join(CATALOGUE)}") from None


def imagenet_entry(arch: str) -> Entry:
    if arch not in IMAGENET_ENTRY:
        raise CatalogueError(f"no ImageNet weights in the catalogue for backbone {arch!r}")
    return get_entry(IMAGENET_ENTRY[arch])
