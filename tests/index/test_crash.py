"""A build killed with SIGKILL halfway leaves the previous version active,
unchanged and loadable, and the next build succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vpr.index.meta import Entry
from vpr.index.store import IndexStore, ModelStamp
from vpr.index.synthetic import clustered_descriptors

REPO = Path(__file__).resolve().parents[2]
STAMP = ModelStamp("teacher@1", "a" * 64, 32)

BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vpr.index.meta import Entry
    from vpr.index.store import IndexStore, ModelStamp
    from vpr.index.synthetic import clustered_descriptors

    root = Path(sys.argv[1])
    db, _, _ = clustered_descriptors(int(sys.argv[2]), 32, seed=5)

    def progress(done, total):
        print(f"progress {done} {total}", flush=True)
        time.sleep(0.2)

    IndexStore(root / "indexes").build_from_descriptors(
        "gp", db, [Entry(root / f"img{i}.jpg") for i in range(len(db))], root,
        ModelStamp("teacher@1", "a" * 64, 32), factory="HNSW8", progress=progress)
    print("published", flush=True)
""")


@pytest.mark.slow
def test_sigkill_halfway_through_a_build_leaves_the_active_version_intact(tmp_path: Path):
    store = IndexStore(tmp_path / "indexes")
    db, q, _ = clustered_descriptors(500, 32, n_queries=20, seed=1)
    store.build_from_descriptors("gp", db, [Entry(tmp_path / f"img{i}.jpg") for i in range(len(db))], tmp_path, STAMP)
    manifest_bytes = (store.root / "gp" / "1" / "manifest.json").read_bytes()
    files_before = {p.name: p.read_bytes() for p in (store.root / "gp" / "1").iterdir()}
    expected = store.load("gp").search_ids(q, 5)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp_path), "6000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    try:
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("progress"):
                lines.append(line)
        assert len(lines) == 3, (
            f"builder never reported progress: {proc.stderr.read() if proc.poll() is not None else ''}"
        )
        # Halfway: a hidden folder is being written, nothing is published yet.
        assert list((store.root / "gp").glob(".tmp-*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rest = proc.stdout.read()
    assert "published" not in rest

    # The previous version: still active, byte for byte unchanged, loadable, same answers.
    assert store.active("gp").version == 1 and store.versions("gp") == [1]
    assert (store.root / "gp" / "1" / "manifest.json").read_bytes() == manifest_bytes
    assert {p.name: p.read_bytes() for p in (store.root / "gp" / "1").iterdir()} == files_before
    again = store.load("gp").search_ids(q, 5)
    assert (again[1] == expected[1]).all()
    assert list((store.root / "gp").glob(".tmp-*")), "the killed build left its half-built folder"

    # The next build takes the (released) lock, cleans the debris and publishes.
    db2, _, _ = clustered_descriptors(800, 32, seed=2)
    ref = store.build_from_descriptors(
        "gp", db2, [Entry(tmp_path / f"img{i}.jpg") for i in range(len(db2))], tmp_path, STAMP, factory="HNSW8"
    )
    assert ref.version == 2 and store.active("gp") == ref
    assert not list((store.root / "gp").glob(".tmp-*"))
    assert store.load("gp").count == 800
    np.testing.assert_array_equal(store.load("gp@1").search_ids(q, 5)[1], expected[1])
