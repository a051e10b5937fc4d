"""Shared fixtures: tiny model configs, temporary homes, the optional ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))

TINY_CONFIG = {
    "backbone": {"name": "resnet18", "cut": "layer3"},
    "netvlad": {"clusters": 8},
    "preprocess": {"mode": "imagenet", "max_side": 96},
}


@pytest.fixture
def shared_dir() -> Path:
    """../shared when present; the test is skipped otherwise."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present")
    return SHARED


@pytest.fixture
def tiny_config() -> dict:
    return {k: dict(v) for k, v in TINY_CONFIG.items()}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def random_images(folder: Path, n: int, size=(96, 72), seed: int = 0) -> list[Path]:
    """Write `n` textured random JPEGs to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        p = folder / f"img{i:03d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    random_images(folder, 6)
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
