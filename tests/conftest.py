"""Shared fixtures: tiny model configs, temporary homes, the optional ../shared;
`skip_or_fail` for optional test dependencies, and the browser tests' count in
the terminal summary (so that a CI log shows how many ran)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))

IN_CI = os.environ.get("CI") == "true"  # what CI services set; the Makefile's `test` checks the same
BROWSER = "browser"  # the marker of the tests that drive Chromium (those using the `browser` fixture)

TINY_CONFIG = {
    "backbone": {"name": "resnet18", "cut": "layer3"},
    "netvlad": {"clusters": 8},
    "preprocess": {"mode": "imagenet", "max_side": 96},
}


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in a test may download weights (VPR_OFFLINE=1); a test of the
    download path sets VPR_OFFLINE=0 itself and serves files on loopback."""
    monkeypatch.setenv("VPR_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reference_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers in tests run eager fp32 (VPR_ENGINE), whatever this CPU's `auto` default is,
    so that answers equal the descriptions the tests compute; the engine tests
    (tests/model/test_engines.py, tests/server/test_engine.py) choose engines themselves."""
    monkeypatch.setenv("VPR_ENGINE", "eager-fp32")


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


def skip_or_fail(reason: str, *, module: bool = False) -> NoReturn:
    """Skip a test whose optional dependency (Chromium, Milvus Lite) is missing,
    except in CI (CI=true), where that must fail the run with the reason
    instead of going green without the test. `module`: called at import time."""
    __tracebackhide__ = True  # the skip's reported location is the caller's
    if IN_CI:
        pytest.fail(f"CI=true, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BROWSER}: drives headless Chromium (set on every test using `browser`)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROWSER in getattr(item, "fixturenames", ()):
            item.add_marker(BROWSER)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line with what happened to the browser tests, when any were collected."""
    outcomes: dict[str, str] = {}  # nodeid -> the outcome of its worst phase
    for reports in terminalreporter.stats.values():
        for r in reports:
            if not isinstance(r, pytest.TestReport) or BROWSER not in r.keywords:
                continue
            if r.when == "call" or r.outcome != "passed":
                outcomes[r.nodeid] = "failed" if r.outcome == "failed" else outcomes.get(r.nodeid, r.outcome)
    if outcomes:
        counts = {o: list(outcomes.values()).count(o) for o in ("passed", "failed", "skipped")}
        terminalreporter.write_line(
            f"browser tests (headless Chromium): {len(outcomes)} collected, {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped"
        )
