"""Heatmaps: the per-location decomposition of the NetVLAD descriptor, and `vpr explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import TINY_CONFIG, random_images
from vpr.cli.main import main as vpr
from vpr.evaluation.explain import descriptor_shares, output_names
from vpr.model.network import build_model
from vpr.model.registry import Registry
from vpr.settings import HomeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_net(seed: int = 0, alpha: float = 10.0):
    torch.manual_seed(seed)
    net = build_model(TINY_CONFIG).eval()
    net.netvlad.init_from_centroids(F.normalize(torch.randn(8, net.backbone.out_channels), dim=1).numpy(), alpha=alpha)
    return net


def test_shares_sum_to_one_and_rebuild_the_descriptor():
    net = tiny_net()
    fmap = torch.randn(3, net.backbone.out_channels, 5, 7)
    with torch.no_grad():
        shares = descriptor_shares(net, fmap)
        desc = net.netvlad(fmap)
    assert shares.shape == (3, 5, 7)
    # sum_n <d, g_n> = <d, d> = 1 only if sum_n g_n really is the layer's descriptor
    assert torch.allclose(shares.sum(dim=(1, 2)), torch.ones(3), atol=1e-4)
    assert torch.allclose(desc.norm(dim=1), torch.ones(3), atol=1e-5)


def test_identical_locations_share_equally_and_a_distinct_location_stands_out():
    net = tiny_net(alpha=50.0)
    c = net.backbone.out_channels
    base = torch.randn(c)
    fmap = base.view(1, c, 1, 1).repeat(1, 1, 4, 4)
    with torch.no_grad():
        uniform = descriptor_shares(net, fmap)[0]
    assert torch.allclose(uniform, torch.full((4, 4), 1 / 16), atol=1e-5)
    # One location with a feature of its own: it alone makes the residuals of the clusters it is
    # assigned to, which intra-normalisation gives a full block each, so it carries far more than
    # its 1/16; a location that sits exactly on a centroid has no residual and carries nothing.
    torch.manual_seed(5)
    odd = fmap.clone()
    odd[0, :, 2, 1] = torch.randn(c)
    on_centroid = fmap.clone()
    on_centroid[0, :, 2, 1] = net.netvlad.centroids[3].detach() * 5
    with torch.no_grad():
        shares = descriptor_shares(net, odd)[0]
        nothing = descriptor_shares(net, on_centroid)[0]
    others = torch.arange(16) != 9
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert shares[2, 1].item() > max(2 / 16, 3 * shares.flatten()[others].max().item())
    assert abs(nothing[2, 1].item()) < 1e-6
    assert torch.allclose(nothing.flatten()[others], torch.full((15,), 1 / 15), atol=1e-4)


def test_output_names_are_unique():
    names = output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("c/y.png")], "h180-jpeg20")
    assert names == ["000-x-h180-jpeg20.png", "001-x-h180-jpeg20.png", "y-h180-jpeg20.png"]
    assert output_names([Path("z.jpg")], None) == ["z.png"]


def test_cli_explain_two_models_side_by_side(tmp_path, capsys):
    home = tmp_path / "home"
    reg = Registry(HomeSettings(home=home).models_dir)
    a = reg.register("teach", tiny_net(0), role="teacher")
    b = reg.register("stud", tiny_net(1), role="student", parent=str(a))
    imgs = random_images(tmp_path / "imgs", 2, size=(96, 64))
    out = tmp_path / "out"
    rc = vpr(
        [
            "--home",
            str(home),
            "explain",
            "--model",
            str(a),
            "--model",
            str(b),
            *map(str, imgs),
            "--out",
            str(out),
            "--quality",
            "h48-jpeg30",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "img000-h48-jpeg30.png"), str(out / "img001-h48-jpeg30.png")]
    for p in printed:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 2 * im.height  # three panels side by side
    summary = json.loads((out / "explain.json").read_text())
    assert [i["quality"] for i in summary["images"]] == ["h48-jpeg30"] * 2
    stats = summary["images"][0]["models"]
    assert set(stats) == {"teach@1", "stud@1"}
    assert all(0 < s["top10pct_share"] <= 1 for s in stats.values())


def test_cli_explain_errors(tmp_path, capsys):
    home = tmp_path / "home"
    img = random_images(tmp_path / "imgs", 1)[0]
    assert vpr(["--home", str(home), "explain", "--model", "ghost@1", str(img), "--out", str(tmp_path / "o")]) == 2
    assert "ghost@1 not found" in capsys.readouterr().err
    reg = Registry(HomeSettings(home=home).models_dir)
    ref = reg.register("teach", tiny_net(), role="teacher")
    assert (
        vpr(
            [
                "--home",
                str(home),
                "explain",
                "--model",
                str(ref),
                str(img),
                "--out",
                str(tmp_path / "o"),
                "--quality",
                "h12x",
            ]
        )
        == 2
    )
    assert "bad quality spec" in capsys.readouterr().err
    assert (
        vpr(
            [
                "--home",
                str(home),
                "explain",
                "--model",
                str(ref),
                str(tmp_path / "missing.jpg"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "missing.jpg" in capsys.readouterr().err
