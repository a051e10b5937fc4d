"""Registry round trip through the `vpr` CLI, tamper detection, concurrent activation."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from vpr.cli.main import main
from vpr.model.extract import embed_inputs
from vpr.model.fileio import read_pointer
from vpr.model.preprocess import load_image, to_input
from vpr.model.registry import Registry, RegistryError


def vpr(home, *args) -> int:
    return main(["--home", str(home), *args])


@pytest.fixture
def teacher(home, image_folder, capsys):
    rc = vpr(
        home,
        "model",
        "init",
        "--name",
        "tiny",
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--preprocess",
        "imagenet",
        "--max-side",
        "96",
        "--cluster-images",
        str(image_folder),
        "--clusters",
        "8",
        "--samples",
        "400",
    )
    assert rc == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    assert ref == "tiny@1"
    return ref


def test_round_trip_init_list_activate_load_embed(home, image_folder, teacher, capsys, tmp_path):
    reg = Registry(home / "models")
    m = reg.manifest(teacher)
    assert m["role"] == "teacher" and m["descriptor_dim"] == 8 * 256
    assert m["details"]["cluster_samples"] >= 8 and m["details"]["cluster_seed"] == 0
    assert str(reg.active("tiny")) == "tiny@1"

    # a second version, then list / activate / show
    assert (
        vpr(
            home,
            "model",
            "init",
            "--name",
            "tiny",
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--preprocess",
            "imagenet",
            "--max-side",
            "96",
            "--cluster-images",
            str(image_folder),
            "--clusters",
            "8",
            "--samples",
            "400",
            "--seed",
            "1",
            "--no-activate",
        )
        == 0
    )
    capsys.readouterr()
    assert vpr(home, "model", "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["ref"], r["active"]) for r in rows] == [("tiny@1", True), ("tiny@2", False)]
    assert vpr(home, "model", "activate", "tiny@2") == 0
    assert str(reg.active("tiny")) == "tiny@2"
    capsys.readouterr()
    assert vpr(home, "model", "show", "tiny@2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["details"]["cluster_seed"] == 1

    images = sorted(image_folder.iterdir())
    out = tmp_path / "d.npy"
    assert vpr(home, "model", "embed", "tiny@1", *map(str, images[:3]), "--out", str(out)) == 0
    descs = np.load(out)
    assert descs.shape == (3, 2048)
    loaded = reg.load("tiny@1")
    direct, _ = embed_inputs(loaded.net, [to_input(load_image(p), loaded.net.config.preprocess) for p in images[:3]])
    assert np.allclose(descs, direct, atol=1e-5)
    assert vpr(home, "model", "verify", "tiny@1") == 0


def test_tampered_weights_are_refused(home, teacher, capsys):
    reg = Registry(home / "models")
    weights = reg.dir(reg.resolve(teacher)) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"sha256 mismatch: manifest says [0-9a-f]{64}, file has [0-9a-f]{64}"):
        reg.load(teacher)
    capsys.readouterr()
    assert vpr(home, "model", "verify", teacher) == 2
    assert "weights.safetensors" in capsys.readouterr().err


def test_unknown_model_and_bad_spec(home, teacher, capsys):
    assert vpr(home, "model", "show", "tiny@9") == 2
    assert "tiny@9 not found" in capsys.readouterr().err
    assert (
        vpr(
            home,
            "model",
            "init",
            "--name",
            "x",
            "--weights",
            "/nonexistent.safetensors",
            "--cluster-images",
            "/nonexistent",
        )
        == 2
    )
    assert "/nonexistent" in capsys.readouterr().err


def test_concurrent_activate_leaves_a_valid_pointer(home, teacher, image_folder):
    reg = Registry(home / "models")
    from tests.conftest import TINY_CONFIG
    from vpr.model.network import build_model

    for _ in range(3):
        reg.register("tiny", build_model(TINY_CONFIG), role="teacher")
    errors = []

    def flip(v):
        try:
            for _ in range(30):
                reg.activate(f"tiny@{v}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=flip, args=(v,)) for v in (2, 3, 4, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert read_pointer(home / "models" / "tiny" / "active") in {"2", "3", "4"}
    assert reg.load("tiny").ref.version in {2, 3, 4}
    assert not list((home / "models" / "tiny").glob(".*tmp*"))


@pytest.mark.slow
def test_import_netvlad_command_registers_a_teacher(home, tmp_path, capsys):
    import torch

    from vpr.model.backbones import VGG16Backbone

    sd = {f"encoder.{k}": v for k, v in VGG16Backbone().features.state_dict().items()}
    sd["pool.conv.weight"] = torch.randn(8, 512, 1, 1)
    sd["pool.centroids"] = torch.rand(8, 512)
    ckpt = tmp_path / "pittsburgh.pth.tar"
    torch.save({"epoch": 2, "state_dict": sd}, ckpt)
    assert vpr(home, "model", "import-netvlad", str(ckpt), "--name", "pitts") == 0
    assert capsys.readouterr().out.strip() == "pitts@1"
    m = Registry(home / "models").manifest("pitts@1")
    assert m["details"]["source"] == "pytorch-NetVLAD" and m["descriptor_dim"] == 8 * 512
    assert m["config"]["preprocess"]["mode"] == "imagenet"
    assert vpr(home, "model", "verify", "pitts") == 0
