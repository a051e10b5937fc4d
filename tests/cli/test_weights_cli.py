"""`vpr weights ...`, `vpr model import-netvlad-mat`, `--weights imagenet` and the
demo bootstrap of `vpr serve --demo` (`make serve`) with the offline switch, under
a socket layer that refuses every connection that is not to loopback."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.model.loopback import blob_entry as catalogue_entry
from tests.model.loopback import serving
from tests.model.test_matlab import make_release, write_release
from vpr.cli.main import main
from vpr.model import catalogue
from vpr.model.registry import Registry

DATA = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def server():
    with serving() as state:
        yield state


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection or name lookup that is not loopback fails (and is recorded)."""
    refused: list[object] = []
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def allowed(address: object) -> bool:
        if not isinstance(address, tuple):  # AF_UNIX paths
            return True
        host = str(address[0])
        return host in LOOPBACK or host.startswith("127.")

    def connect(self, address):
        if not allowed(address):
            refused.append(address)
            raise OSError(f"test: no connection to {address} (loopback only)")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not allowed(address):
            refused.append(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not allowed((host,)):
            refused.append(host)
            raise socket.gaierror(f"test: no name lookup of {host} (loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return refused


def blob_entry(monkeypatch, urls):
    e = catalogue_entry(DATA, urls)
    monkeypatch.setitem(catalogue.CATALOGUE, e.name, e)
    return e


def test_fetch_verify_and_list(server, home, monkeypatch, capsys, loopback_only):
    monkeypatch.setenv("VPR_OFFLINE", "0")
    e = blob_entry(monkeypatch, [server.serve("/a", DATA, "404")])
    good = server.serve("/b", DATA)
    assert main(["--home", str(home), "weights", "fetch", e.name, "--url", good, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"served by {good}" in out and e.sha256 in out
    assert [p for p, _ in server.requests] == ["/b"]  # --url comes before the catalogue's mirrors
    assert main(["--home", str(home), "weights", "verify"]) == 0
    assert f"{e.name}: ok" in capsys.readouterr().out
    (home / "weights" / "blob.bin").write_bytes(DATA[::-1])
    assert main(["--home", str(home), "weights", "verify", e.name]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "verification failed for test-blob" in captured.err
    assert main(["--home", str(home), "weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["test-blob"]["status"].startswith("here") and rows["netvlad-pitts30k"]["status"] == "absent"
    assert loopback_only == []


def test_offline_fetch_and_import(server, home, tmp_path, monkeypatch, capsys, loopback_only):
    monkeypatch.setenv("VPR_OFFLINE", "1")
    e = blob_entry(monkeypatch, [server.serve("/b", DATA)])
    assert main(["--home", str(home), "weights", "fetch", e.name]) == 2
    err = capsys.readouterr().err
    assert "downloads are off" in err and "vpr weights import test-blob FILE" in err
    assert server.requests == []
    brought = tmp_path / "brought.bin"
    brought.write_bytes(DATA[:-1])
    assert main(["--home", str(home), "weights", "import", e.name, str(brought)]) == 2
    assert "is not test-blob's" in capsys.readouterr().err
    brought.write_bytes(DATA)
    assert main(["--home", str(home), "weights", "import", e.name, str(brought)]) == 0
    assert (home / "weights" / "blob.bin").read_bytes() == DATA
    assert main(["--home", str(home), "weights", "fetch", e.name]) == 0  # offline, and already here
    assert "already here" in capsys.readouterr().out


def test_ci_forbids_downloads_unless_told_otherwise(server, home, monkeypatch, capsys):
    e = blob_entry(monkeypatch, [server.serve("/b", DATA)])
    monkeypatch.delenv("VPR_OFFLINE", raising=False)
    monkeypatch.setenv("CI", "true")
    assert main(["--home", str(home), "weights", "fetch", e.name, "--no-progress"]) == 2
    assert "CI=true" in capsys.readouterr().err and server.requests == []
    monkeypatch.setenv("VPR_OFFLINE", "0")
    assert main(["--home", str(home), "weights", "fetch", e.name, "--no-progress"]) == 0


def test_weights_imagenet_offline_names_the_entry_and_the_import(home, image_folder, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VPR_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--home", str(home), "model", "init", "--name", "t", "--backbone", "resnet18"]
    argv += ["--weights", "imagenet", "--cluster-images", str(image_folder), "--clusters", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "torchvision-resnet18-imagenet" in err and "vpr weights import torchvision-resnet18-imagenet FILE" in err
    assert Registry(home / "models").names() == []


@pytest.mark.slow
def test_import_netvlad_mat_registers_a_teacher_with_the_source_hash(home, tmp_path, capsys):
    layers, avg = make_release(seed=2)
    path = write_release(tmp_path / "Pitts30K_struct.mat", layers, avg)
    assert main(["--home", str(home), "model", "import-netvlad-mat", str(path), "--name", "netvlad"]) == 0
    assert capsys.readouterr().out.strip() == "netvlad@1"
    reg = Registry(home / "models")
    m = reg.manifest("netvlad@1")
    assert m["role"] == "teacher" and m["descriptor_dim"] == 96
    assert m["details"]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["config"]["netvlad"]["norm_eps"] == pytest.approx(1e-12)
    loaded = reg.load("netvlad@1")  # verified by its own hash, rebuilt from the manifest
    x = torch.randn(1, 3, 48, 64)
    from vpr.model.matlab import import_netvlad_mat

    direct, _ = import_netvlad_mat(path)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), direct(x), atol=1e-6)
    # a catalogue entry that is not here, offline (the suite's default): the error says how to bring it
    assert main(["--home", str(home), "model", "import-netvlad-mat", "netvlad-tokyotm", "--name", "x"]) == 2
    assert "vpr weights import netvlad-tokyotm FILE" in capsys.readouterr().err


# ---- the `make serve` bootstrap ----------------------------------------------------------------
def _small_demo(monkeypatch):
    from vpr.cli import demo as demo_module

    # This machine may have ../shared's caffe VGG16 file, which the demo would take first.
    monkeypatch.setattr(demo_module, "VGG_FILE", "absent-in-this-test.safetensors")
    monkeypatch.setenv("VPR_DEMO_WEIGHTS", "/nonexistent/weights.safetensors")
    monkeypatch.setattr(
        demo_module, "ensure_demo", functools.partial(demo_module.ensure_demo, places=8, epochs=1, max_side=64)
    )


@pytest.mark.slow
def test_make_serve_bootstrap_offline_downloads_nothing(home, tmp_path, monkeypatch, caplog, loopback_only):
    """`vpr serve --demo` with VPR_OFFLINE=1 on a machine without weights: the whole
    bootstrap runs, tries no connection, and says plainly what it lacks and how to bring it."""
    from vpr.cli.server_cmd import with_demo
    from vpr.settings import ServerSettings

    monkeypatch.setenv("VPR_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _small_demo(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vpr.cli.demo"):
        served = with_demo(ServerSettings(home=home))
    assert served.model == "demo-student" and served.index == "demo"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "RANDOMLY INITIALISED" in warning and "vpr weights import torchvision-vgg16-imagenet FILE" in warning
    teacher = Registry(home / "models").manifest("demo-teacher@1")
    assert teacher["details"]["weights"] == "none"
    assert loopback_only == []  # not even a name lookup


@pytest.mark.slow
def test_make_serve_bootstrap_fetches_imagenet_vgg16_when_allowed(
    server, home, tmp_path, image_folder, monkeypatch, caplog, loopback_only
):
    """With downloads allowed, the demo's weights step fetches the catalogue's VGG16
    (here: a file served on loopback after a mirror the socket layer refuses), checks
    it, converts it, and the teacher is initialised from it."""
    import torchvision

    from vpr.cli import demo as demo_module
    from vpr.model.teacher import init_teacher
    from vpr.settings import HomeSettings

    monkeypatch.setenv("VPR_OFFLINE", "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _small_demo(monkeypatch)
    torch.manual_seed(0)
    feats = torchvision.models.vgg16(weights=None).features
    buf = io.BytesIO()
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, buf)  # torchvision's keys
    data = buf.getvalue()
    name = catalogue.IMAGENET_ENTRY["vgg16"]
    real = catalogue.CATALOGUE[name]
    patched = replace(
        real,
        urls=(real.urls[0], server.serve("/vgg16.pth", data)),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(catalogue.CATALOGUE, name, patched)
    settings = HomeSettings(home=home)
    with caplog.at_level(logging.INFO):
        weights, mode = demo_module.find_weights(settings)
    assert (weights, mode) == ("imagenet", "imagenet")
    assert "download.pytorch.org" in loopback_only  # the real mirror was tried first, and refused here
    assert [p for p, _ in server.requests] == ["/vgg16.pth"]
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "fetching torchvision-vgg16-imagenet" in log and "served by http://127.0.0.1" in log
    from vpr.model.config import ModelConfig

    config = ModelConfig.model_validate(
        {"backbone": {"name": "vgg16"}, "netvlad": {"clusters": 4}, "preprocess": {"mode": mode, "max_side": 64}}
    )
    ref = init_teacher(Registry(settings.models_dir), "t", config, weights, image_folder, samples=200)
    m = Registry(settings.models_dir).manifest(ref)
    assert m["details"]["weights_entry"] == name and m["details"]["weights_sha256"] == patched.sha256
    net = Registry(settings.models_dir).load(ref).net
    assert torch.equal(net.backbone.features[28].weight, feats[28].weight)


def test_the_real_netvlad_gardens_row_skips_with_the_reason_when_the_weights_are_absent(tmp_path):
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_netvlad_gardens", REPO / "bench" / "netvlad_gardens.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "row.json"
    weights = tmp_path / "weights"
    assert bench.main(["--weights-home", str(weights), "--out-json", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"].endswith("is absent (vpr weights fetch netvlad-pitts30k)")
    weights.mkdir()
    (weights / "Pitts30K_struct.mat").write_bytes(b"not the release")
    assert bench.main(["--weights-home", str(weights), "--out-json", str(out)]) == 0
    assert "does not match" in json.loads(out.read_text())["skipped"]
