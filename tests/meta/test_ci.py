"""The suite's CI rules (tests/conftest.py): a missing optional dependency
(Chromium, Milvus Lite) skips a test on a developer's machine but fails it under
CI=true, and the terminal summary counts the browser tests, so that a CI log
shows how many ran. Checked on a probe suite run by a child pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PROBE = """
import pytest

from tests.conftest import skip_or_fail


@pytest.fixture
def browser():
    skip_or_fail("no browser on this machine")


def test_drives_the_page(browser):
    pass


def test_needs_no_browser():
    pass
"""


def run_probe(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*command, "--rootdir", str(tmp_path), str(probe)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_missing_browser_skips_outside_ci(tmp_path):
    out = run_probe(tmp_path, ci=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIPPED [1] " in out.stdout and "no browser on this machine" in out.stdout
    assert "browser tests (headless Chromium): 1 collected, 0 passed, 0 failed, 1 skipped" in out.stdout


@pytest.mark.slow
def test_a_missing_browser_fails_in_ci(tmp_path):
    out = run_probe(tmp_path, ci=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "CI=true, so this is a failure, not a skip: no browser on this machine" in out.stdout
    assert "browser tests (headless Chromium): 1 collected, 0 passed, 1 failed, 0 skipped" in out.stdout
    assert "1 passed" in out.stdout  # the test without the browser still ran
