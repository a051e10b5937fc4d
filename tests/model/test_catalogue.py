"""The catalogue's entries agree with what their publishers use: torchvision's own
URLs, the sha256 prefix torchvision checks, the sizes torchvision states."""

from __future__ import annotations

import re

import pytest
import torchvision

from vpr.model.catalogue import CATALOGUE, ENTRIES, IMAGENET_ENTRY, CatalogueError, get_entry, imagenet_entry

TORCHVISION = {
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
}


@pytest.mark.parametrize("arch", sorted(TORCHVISION))
def test_torchvision_entries_are_torchvisions_files(arch):
    e, tv = imagenet_entry(arch), TORCHVISION[arch]
    assert e.urls[0] == tv.url and e.file_name == tv.url.rsplit("/", 1)[1]
    prefix = re.search(r"-([0-9a-f]{8})\.pth$", e.file_name)
    assert prefix and e.sha256 and e.sha256.startswith(prefix.group(1))  # what torchvision checks
    assert e.size and abs(e.size / 2**20 - tv.meta["_file_size"]) < 0.01  # torchvision states MiB
    assert e.kind == "backbone" and e.arch == arch and e.file_format == "torch-pickle"


def test_every_entry_is_complete():
    assert len(CATALOGUE) == len(ENTRIES)
    for e in ENTRIES:
        assert e.urls and all(u.startswith("https://") for u in e.urls)
        assert e.license and e.preprocessing and e.checksum_source
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        if e.sha256 is None:  # an entry without a published sum says what to do instead
            assert "--sha256" in e.checksum_source and "--trust-on-first-use" in e.checksum_source
    assert {e.name for e in ENTRIES if e.kind == "vpr-model"} == {"netvlad-pitts30k", "netvlad-tokyotm"}
    assert set(IMAGENET_ENTRY) == set(TORCHVISION)


def test_unknown_names_list_the_entries():
    with pytest.raises(CatalogueError, match="netvlad-pitts30k"):
        get_entry("netvlad")
    with pytest.raises(CatalogueError, match="no ImageNet weights"):
        imagenet_entry("vit")
