"""Fetching catalogue files: mirrors in order, resumed partial downloads, the
sha256 checked before a file takes its real name, the offline switch, files
brought by hand. A loopback HTTP server started here serves files made here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.model.loopback import blob_entry, serving
from vpr.model import catalogue
from vpr.model.catalogue import Entry
from vpr.model.fetch import (
    FetchError,
    HashMismatch,
    OfflineError,
    fetch,
    import_file,
    read_record,
    stored_path,
    verify,
)

DATA = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with serving() as state:
        yield state


def entry(urls: list[str], sha256: str | None = SHA, size: int | None = len(DATA)) -> Entry:
    return blob_entry(DATA, urls, sha256, size)


def test_mirrors_are_tried_in_order_until_one_serves_the_file(server, tmp_path):
    dead = "http://127.0.0.1:9/nothing"  # port 9 (discard): connection refused
    urls = [server.serve("/a", DATA, "404"), server.serve("/b", DATA, "500"), dead, server.serve("/c", DATA)]
    got = fetch(entry(urls), tmp_path, offline=False, progress=False)
    assert got.source == urls[-1] and got.downloaded == len(DATA) and got.resumed_from == 0
    assert [p for p, _ in server.requests] == ["/a", "/b", "/c"]
    assert got.path.read_bytes() == DATA and not list(tmp_path.glob("*.part"))
    rec = json.loads((tmp_path / "test-blob.json").read_text())
    assert rec["sha256"] == SHA and rec["source"] == urls[-1] and rec["checked_against"] == "catalogue"
    # a second fetch finds the checked file and asks nobody
    assert fetch(entry(urls), tmp_path, offline=False, progress=False).source == "present"
    assert len(server.requests) == 3


def test_a_truncated_download_is_resumed_from_the_next_mirror(server, tmp_path):
    cut = 123_457
    urls = [server.serve("/short", DATA, "truncate", cut=cut), server.serve("/full", DATA)]
    got = fetch(entry(urls), tmp_path, offline=False, progress=False)
    assert server.requests == [("/short", None), ("/full", f"bytes={cut}-")]
    assert got.source == urls[1] and got.resumed_from == cut and got.downloaded == len(DATA) - cut
    assert got.path.read_bytes() == DATA


def test_a_partial_download_survives_a_failed_run_and_is_resumed_later(server, tmp_path):
    cut = 200_000
    short = server.serve("/short", DATA, "truncate", cut=cut)
    with pytest.raises(FetchError, match="truncated download: 200000 of 300000 bytes") as e:
        fetch(entry([short]), tmp_path, offline=False, progress=False)
    assert "vpr weights import test-blob FILE" in str(e.value)
    part = tmp_path / "blob.bin.part"
    assert part.stat().st_size == cut and not stored_path(entry([]), tmp_path).exists()
    got = fetch(entry([server.serve("/full", DATA)]), tmp_path, offline=False, progress=False)
    assert server.requests[-1] == ("/full", f"bytes={cut}-") and got.resumed_from == cut
    assert got.path.read_bytes() == DATA and not part.exists()


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)  # garbage that a resume would keep
    got = fetch(entry([server.serve("/f", DATA, "ignore-range")]), tmp_path, offline=False, progress=False)
    assert server.requests == [("/f", "bytes=1000-")] and got.resumed_from == 0
    assert got.path.read_bytes() == DATA


def test_a_wrong_hash_is_never_stored_and_the_next_mirror_is_tried(server, tmp_path):
    evil = bytes(reversed(DATA))  # same size, other bytes
    urls = [server.serve("/evil", evil), server.serve("/good", DATA)]
    got = fetch(entry(urls), tmp_path, offline=False, progress=False)
    assert got.source == urls[1] and got.resumed_from == 0  # the bad bytes were dropped, not resumed
    assert got.path.read_bytes() == DATA
    with pytest.raises(FetchError, match="does not match") as e:
        fetch(entry([urls[0]]), tmp_path / "other", offline=False, progress=False)
    assert not (tmp_path / "other" / "blob.bin").exists() and not (tmp_path / "other" / "blob.bin.part").exists()
    assert hashlib.sha256(evil).hexdigest() in str(e.value)


def test_a_size_other_than_the_catalogue_is_refused_before_reading(server, tmp_path):
    url = server.serve("/big", DATA + b"extra")
    with pytest.raises(FetchError, match="the catalogue says 300000"):
        fetch(entry([url]), tmp_path, offline=False, progress=False)
    assert not stored_path(entry([]), tmp_path).exists()


def test_offline_forbids_the_download_and_names_the_entry_and_import(server, tmp_path):
    url = server.serve("/f", DATA)
    with pytest.raises(OfflineError) as e:
        fetch(entry([url]), tmp_path, offline=True, progress=False)
    assert server.requests == []
    msg = str(e.value)
    assert "test-blob" in msg and "vpr weights import test-blob FILE" in msg and url in msg
    # a file already here is used offline
    import_file(entry([url]), _write(tmp_path / "brought.bin", DATA), tmp_path / "w")
    assert fetch(entry([url]), tmp_path / "w", offline=True).source == "present"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_import_checks_the_hash_of_a_file_brought_by_hand(tmp_path):
    e = entry(["http://127.0.0.1:9/unused"])
    wrong = _write(tmp_path / "wrong.bin", DATA[:-1] + b"\0")
    with pytest.raises(HashMismatch, match="is not test-blob's"):
        import_file(e, wrong, tmp_path / "w")
    assert not stored_path(e, tmp_path / "w").exists()
    got = import_file(e, _write(tmp_path / "right.bin", DATA), tmp_path / "w")
    assert got.path.read_bytes() == DATA and read_record(e, tmp_path / "w")["source"].startswith("import:")
    assert verify(e, tmp_path / "w").sha256 == SHA
    got.path.write_bytes(DATA[:1000])  # damaged later
    with pytest.raises(HashMismatch, match="does not match"):
        verify(e, tmp_path / "w")


def test_without_a_published_hash_the_user_decides(server, tmp_path):
    url = server.serve("/f", DATA)
    e = entry([url], sha256=None, size=None)
    with pytest.raises(FetchError, match="no sha256 is published"):
        fetch(e, tmp_path, offline=False, progress=False)
    assert server.requests == []  # refused before asking anyone
    with pytest.raises(FetchError, match="does not match"):
        fetch(e, tmp_path, offline=False, progress=False, sha256="0" * 64)
    got = fetch(e, tmp_path, offline=False, progress=False, trust_first_use=True)
    assert got.sha256 == SHA and read_record(e, tmp_path)["checked_against"].startswith("pinned at first use")
    assert verify(e, tmp_path).sha256 == SHA  # checked against the pinned sum from now on
    got.path.write_bytes(DATA[::-1])
    with pytest.raises(HashMismatch, match="pinned at first use"):
        verify(e, tmp_path)


# ---- torchvision's pickles: checked, then read weights-only, converted to safetensors --------
def _tv_entry(monkeypatch, arch: str, data: bytes, urls: list[str]) -> Entry:
    name = catalogue.IMAGENET_ENTRY[arch]
    patched = replace(
        catalogue.CATALOGUE[name], urls=tuple(urls), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    monkeypatch.setitem(catalogue.CATALOGUE, name, patched)
    return patched


def test_imagenet_weights_are_fetched_checked_converted_and_loaded(server, tmp_path, monkeypatch):
    import io

    import torchvision
    from safetensors.torch import load_file

    from vpr.model.network import build_model
    from vpr.model.weights import converted_path, load_torchvision_imagenet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torchvision cache to fall back on
    torch.manual_seed(3)
    full = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(full.state_dict(), buf)
    data = buf.getvalue()
    e = _tv_entry(monkeypatch, "resnet18", data, [server.serve("/resnet18.pth", data)])
    net = build_model({"backbone": {"name": "resnet18"}, "netvlad": {"clusters": 4}})
    with pytest.raises(OfflineError, match="vpr weights import torchvision-resnet18-imagenet FILE"):
        load_torchvision_imagenet(net, tmp_path / "w", offline=True, progress=False)
    details = load_torchvision_imagenet(net, tmp_path / "w", offline=False, progress=False)
    assert details == {"weights": "torchvision-imagenet", "weights_entry": e.name, "weights_sha256": e.sha256}
    assert torch.equal(net.backbone.body.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    out = converted_path(e, tmp_path / "w")
    assert set(load_file(str(out))) == set(full.state_dict())
    assert read_record(e, tmp_path / "w")["converted"]["source_sha256"] == e.sha256
    # later loads use the converted file, offline, without asking the server again
    n = len(server.requests)
    load_torchvision_imagenet(net, tmp_path / "w", offline=True, progress=False)
    assert len(server.requests) == n


def test_torchvisions_own_cache_is_used_when_its_hash_matches(tmp_path, monkeypatch):
    import torchvision

    from vpr.model.network import build_model
    from vpr.model.weights import load_torchvision_imagenet, torchvision_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(4)
    full = torchvision.models.resnet18(weights=None)
    cache = torchvision_cache_file("resnet18")
    cache.parent.mkdir(parents=True)
    torch.save(full.state_dict(), cache)
    net = build_model({"backbone": {"name": "resnet18"}, "netvlad": {"clusters": 4}})
    with pytest.raises(HashMismatch, match="is not torchvision-resnet18-imagenet's"):  # not the published file
        load_torchvision_imagenet(net, tmp_path / "w", offline=True, progress=False)
    _tv_entry(monkeypatch, "resnet18", cache.read_bytes(), ["http://127.0.0.1:9/unused"])
    load_torchvision_imagenet(net, tmp_path / "w", offline=True, progress=False)
    assert torch.equal(net.backbone.body.conv1.weight, full.conv1.weight)
