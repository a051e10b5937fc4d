"""Crash: `vpr serve` killed with SIGKILL in the middle of an index rebuild.

The server runs as a real subprocess on a free loopback port with an admin
token. After a hot swap to the second student (so the state to come back to
is not merely the default), a rebuild of a larger folder starts while the test
holds the index's writer lock, so that the job describes every image and then
waits to publish: the process is killed then (no shutdown handler runs), inside
the job for certain, whatever the machine's speed. Restarted
on the same home, the server must come up ready on the previous model and
index with no manual repair, answer queries exactly as before, report the
interrupted job as failed, and run a new rebuild to completion.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx
import pytest

from tests.server.live_support import serve_process
from tests.server.support import build_home, place_images
from vpr.index.store import IndexStore
from vpr.model.store import VersionedStore

TOKEN = "crash-test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXTRA_IMAGES = 60  # enough to be a real rebuild; the timing no longer depends on it


def _poll(client: httpx.Client, job_id: str, until, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/admin/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never reached the expected state: {job}"
        time.sleep(0.05)


def _described_or_over(job: dict) -> bool:
    """The job has described every image (or ended)."""
    progress = job["progress"]
    described = job["state"] == "running" and progress["total"] is not None and progress["done"] == progress["total"]
    return described or job["state"] in ("succeeded", "failed")


def _query(client: httpx.Client, path) -> dict:
    r = client.post("/v1/query", content=path.read_bytes(), headers={"content-type": "image/jpeg"}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_sigkill_during_a_rebuild_restarts_on_the_previous_index_and_model(tmp_path):
    h = build_home(tmp_path)
    big = tmp_path / "big"  # the 8 places (same names) and many more images
    big.mkdir()
    for p in h.images:
        shutil.copy(p, big / p.name)
    extra = [
        p.rename(big / f"extra{i:03d}.jpg")
        for i, p in enumerate(place_images(tmp_path / "extra", EXTRA_IMAGES, seed=4))
    ]
    env = {"VPR_ADMIN_TOKEN": TOKEN, "VPR_DATA_ROOTS": str(tmp_path)}  # the rebuilds read `big`
    log = tmp_path / "serve.log"

    first = serve_process(h.home, log, env=env).start()
    try:
        with httpx.Client(base_url=first.url, headers=AUTH, timeout=60) as c:
            r = c.post("/v1/admin/models/activate", json={"model": h.student2})
            assert r.status_code == 200, r.text
            before = _query(c, h.images[3])
            assert (before["model"], before["index"]) == (h.student2, h.index)
            assert before["results"][0]["id"] == 3
            with VersionedStore(h.home / "indexes", "index").writer("places"):  # the rebuild cannot publish
                r = c.post("/v1/admin/index/rebuild", json={"folder": str(big), "batch_size": 8})
                assert r.status_code == 202, r.text
                job_id = r.json()["job"]
                running = _poll(c, job_id, _described_or_over)
                assert running["state"] == "running", running
                first.kill()  # SIGKILL between describing the images and publishing them
        assert first.returncode == -signal.SIGKILL
    finally:
        first.kill()

    # what a killed server leaves: a job file that still says running, nothing published
    stale = json.loads((h.home / "jobs" / f"{job_id}.json").read_text())
    assert stale["state"] == "running" and stale["progress"]["done"] == stale["progress"]["total"] == 8 + EXTRA_IMAGES
    store = IndexStore(h.home / "indexes")
    assert store.versions("places") == [1] and str(store.active("places")) == h.index

    second = serve_process(h.home, log, env=env).start()  # same home, nothing repaired by hand
    try:
        with httpx.Client(base_url=second.url, headers=AUTH, timeout=60) as c:
            ready = c.get("/readyz").json()
            assert ready["ready"] and (ready["model"], ready["index"], ready["index_size"]) == (h.student2, h.index, 8)
            after = _query(c, h.images[3])
            assert (after["model"], after["index"]) == (h.student2, h.index)
            assert [m["id"] for m in after["results"]] == [m["id"] for m in before["results"]]
            assert [m["score"] for m in after["results"]] == [m["score"] for m in before["results"]]

            job = c.get(f"/v1/admin/jobs/{job_id}").json()
            assert job["state"] == "failed" and "interrupted" in job["error"], job
            assert job["finished"] is not None

            r = c.post("/v1/admin/index/rebuild", json={"folder": str(big), "batch_size": 8})
            assert r.status_code == 202, r.text
            done = _poll(c, r.json()["job"], lambda j: j["state"] in ("succeeded", "failed"))
            assert done["state"] == "succeeded", done
            assert done["result"]["index"] == "places@2" and done["result"]["activated"]
            assert done["result"]["count"] == 8 + EXTRA_IMAGES
            ready = c.get("/readyz").json()
            assert (ready["model"], ready["index"], ready["index_size"]) == (h.student2, "places@2", 8 + EXTRA_IMAGES)
            q = _query(c, extra[42])
            assert q["index"] == "places@2" and q["results"][0]["path"] == extra[42].name
            assert _query(c, h.images[3])["results"][0]["path"] == h.images[3].name
    finally:
        second.stop()
    assert second.returncode in (0, -signal.SIGTERM)
    # no half-built folders left behind, and the new version is the active one
    assert not list((h.home / "indexes" / "places").glob(".tmp-*"))
    assert store.versions("places") == [1, 2] and str(store.active("places")) == "places@2"
