"""Distillation losses: definitions, hand-computed values, parsing, and where gradients go."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vpr.model.network import build_model
from vpr.train.distill_data import split_student, trainable_names
from vpr.train.losses import (
    LOSS_NAMES,
    channel_correlation,
    ickd_loss,
    mse_loss,
    parse_loss,
    parse_loss_weights,
    region_features,
    region_loss,
    triplet_loss,
)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


# ---- zero when the student equals the teacher ---------------------------------------
def test_mse_and_ickd_are_zero_for_identical_outputs():
    torch.manual_seed(0)
    d = unit(torch.randn(3, 64))
    fmap = torch.randn(3, 16, 5, 7)
    assert mse_loss(d, d.clone()).item() == 0.0
    assert ickd_loss(fmap, fmap.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert ickd_loss(fmap, channel_correlation(fmap)).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_is_squared_distance_per_descriptor():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # ||(0.4, -0.8)||^2 = 0.16 + 0.64 = 0.8 for the first pair, 0 for the second; mean 0.4
    assert mse_loss(s, t).item() == pytest.approx(0.4)
    assert mse_loss(s, t).item() == pytest.approx(float((2 - 2 * (s * t).sum(1)).mean()))


# ---- ickd ----------------------------------------------------------------------------
def test_ickd_ignores_spatial_size_when_channel_statistics_agree():
    torch.manual_seed(1)
    student = torch.randn(2, 8, 4, 5)
    teacher = torch.randn(2, 8, 6, 3)
    base = ickd_loss(student, teacher).item()
    assert base > 1e-3
    tiled = student.repeat(1, 1, 2, 3)  # 8 x 15: same local features, 6x as many
    upsampled = F.interpolate(student, scale_factor=3, mode="nearest")  # 12 x 15
    for bigger in (tiled, upsampled):
        assert bigger.shape[-2:] != student.shape[-2:]
        assert ickd_loss(bigger, teacher).item() == pytest.approx(base, rel=1e-5)
        assert ickd_loss(bigger, student).item() == pytest.approx(0.0, abs=1e-6)


def test_ickd_hand_computed_value():
    # C = 2 channels, N = 2 locations; columns are locations.
    # Student locations (1, 0) and (3, 4) -> normalised (1, 0), (0.6, 0.8).
    #   G = F^ F^T / 2 = [[1 + 0.36, 0.48], [0.48, 0.64]] / 2
    #   rows normalised: (1.36, 0.48) / sqrt(2.08),  (0.48, 0.64) / 0.8 = (0.6, 0.8)
    # Teacher locations (2, 0) and (0, 0.5) -> (1, 0), (0, 1): G^ = identity rows.
    #   row 1: ||(1.36, 0.48)/sqrt(2.08) - (1, 0)||^2 = 1 - 2 * 1.36 / sqrt(2.08) + 1
    #   row 2: ||(0.6, 0.8) - (0, 1)||^2 = 0.36 + 0.04 = 0.4
    # ickd = (row 1 + row 2) / C
    student = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.5]]).view(1, 2, 2, 1)
    expected = ((2 - 2 * 1.36 / math.sqrt(2.08)) + 0.4) / 2
    assert ickd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.25701, abs=1e-5)


def test_ickd_averages_over_the_batch_and_checks_channels():
    torch.manual_seed(2)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 2, 2)
    per = [ickd_loss(a[i : i + 1], b[i : i + 1]).item() for i in range(2)]
    assert ickd_loss(a, b).item() == pytest.approx(sum(per) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        ickd_loss(a, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="B, C, h, w"):
        ickd_loss(torch.randn(4, 3, 3), b)


# ---- triplet -------------------------------------------------------------------------
def test_triplet_hand_computed_and_masked():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])  # ||a - p||^2 = 0.04 + 0.36 = 0.4
    n = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])  # 0.8 and 0.0
    # margin 0.5: max(0, 0.5 + 0.4 - 0.8) = 0.1 and max(0, 0.5 + 0.4 - 0) = 0.9 -> mean 0.5
    assert triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(0.5)
    # only the first negative is real
    assert triplet_loss(a, p, n, 0.5, torch.tensor([[True, False]])).item() == pytest.approx(0.1)
    # margin 0.1 and only the far negative: satisfied
    assert triplet_loss(a, p, n[:, :1], margin=0.1).item() == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        triplet_loss(a, p, n[0])


# ---- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,canonical",
    [
        ("mse", "mse"),
        ("ickd", "ickd"),
        ("triplet", "triplet"),
        ("mse+ickd", "mse+ickd"),
        ("ickd+mse", "mse+ickd"),
        ("mse+triplet", "mse+triplet"),
        ("triplet+ickd", "ickd+triplet"),
        (" MSE + ickd + triplet ", "mse+ickd+triplet"),
    ],
)
def test_parse_loss_sets(spec, canonical):
    losses = parse_loss(spec)
    assert str(losses) == canonical
    assert set(losses.terms) <= set(LOSS_NAMES)
    assert all(losses.weight(t) == 1.0 for t in losses.terms)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "expected terms"),
        ("mse+", "expected terms"),
        ("mse+foo", "unknown loss term"),
        ("mse+mse", "repeats"),
        ("l2", "unknown"),
    ],
)
def test_parse_loss_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_loss(spec)


def test_loss_weights():
    assert parse_loss("mse+ickd", "mse=2,ickd=0.5").weights == {"mse": 2.0, "ickd": 0.5}
    assert parse_loss("mse+ickd", "3,4").weights == {"mse": 3.0, "ickd": 4.0}
    assert parse_loss("mse+ickd", "ickd=10").weights == {"mse": 1.0, "ickd": 10.0}
    assert parse_loss_weights(None, ("mse",)) == {"mse": 1.0}
    losses = parse_loss("mse+ickd", "mse=2,ickd=0.5")
    total = losses.combine({"mse": torch.tensor(1.0), "ickd": torch.tensor(4.0)})
    assert total.item() == pytest.approx(4.0)
    for bad, match in [
        ("1,2,3", "3 numbers for 2 terms"),
        ("triplet=1", "not in the loss"),
        ("mse=-1", ">= 0"),
        ("mse=x", "not a number"),
        ("mse=0,ickd=0", "all zero"),
        ("mse=1,2", "not both"),
        ("mse=inf", "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_loss("mse+ickd", bad)


# ---- gradients reach only the trainable layers ---------------------------------------------
@pytest.mark.parametrize(
    "config,trainable,expect_prefixes",
    [
        (
            {
                "backbone": {"name": "resnet18", "cut": "layer3"},
                "netvlad": {"clusters": 4},
                "preprocess": {"mode": "imagenet", "max_side": 64},
            },
            None,
            ("backbone.body.layer3.", "netvlad."),
        ),
        (
            {
                "backbone": {"name": "resnet18", "cut": "layer3"},
                "netvlad": {"clusters": 4},
                "preprocess": {"mode": "imagenet", "max_side": 64},
            },
            ["netvlad"],
            ("netvlad.",),
        ),
        (
            {"backbone": {"name": "vgg16"}, "netvlad": {"clusters": 4}, "preprocess": {"max_side": 32}},
            None,
            tuple(f"backbone.features.{i}." for i in (24, 26, 28)) + ("netvlad.",),
        ),
    ],
)
def test_gradients_flow_only_into_trainable_layers(config, trainable, expect_prefixes):
    torch.manual_seed(3)
    teacher = build_model(config).eval()
    student = copy.deepcopy(teacher)
    prefix, head, _ = split_student(student, trainable_names(student, trainable))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        t_desc, t_map = teacher(x, return_features=True)
    desc, fmap = head(prefix(x + 0.5 * torch.randn_like(x)))
    (mse_loss(desc, t_desc) + ickd_loss(fmap, t_map)).backward()
    got = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable_params = {n for n, p in student.named_parameters() if p.requires_grad}
    assert got, "no gradient at all"
    assert got == trainable_params
    assert all(n.startswith(expect_prefixes) for n in got)
    assert {p for p in expect_prefixes} == {next(e for e in expect_prefixes if n.startswith(e)) for n in got}


def test_regions_compare_where_features_are_not_only_which():
    torch.manual_seed(0)
    fmap = torch.relu(torch.randn(2, 16, 8, 12))
    r = region_features(fmap)
    assert r.shape == (2, 16, 16) and torch.allclose(r.norm(dim=2), torch.ones(2, 16))
    # by hand: region (0, 0) is the mean of the top-left 2x3 cells, normalised
    assert torch.allclose(r[:, 0], F.normalize(fmap[:, :, :2, :3].mean(dim=(2, 3)), dim=1), atol=1e-6)
    assert region_loss(fmap, fmap.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert region_loss(fmap, r).item() == pytest.approx(0.0, abs=1e-7)  # precomputed targets, as training caches
    # a 2x nearest-upsampled copy (an upsampled query's map) has the same regions
    up = F.interpolate(fmap, scale_factor=2, mode="nearest")
    assert region_loss(up, fmap).item() == pytest.approx(0.0, abs=1e-6)
    # the same features in other places: the channel correlations cannot tell, the regions can
    flipped = fmap.flip(-1)
    assert ickd_loss(flipped, fmap).item() == pytest.approx(0.0, abs=1e-6)
    assert region_loss(flipped, fmap).item() > 0.01
    assert 0 <= region_loss(torch.relu(torch.randn(2, 16, 8, 12)), fmap).item() <= 4
    with pytest.raises(ValueError, match="must match"):
        region_loss(fmap, region_features(fmap[:, :8]))
    assert parse_loss("regions+mse").terms == ("mse", "regions") and parse_loss("mse+ickd").needs_maps
    assert parse_loss("mse+regions").needs_maps and not parse_loss("mse").needs_maps
