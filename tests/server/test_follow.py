"""Following the shared home (server/follow.py) and jobs shared by replicas
(server/jobs.py), in one process: the follower's rounds are run by the test
(`Follower.check`), so every step is an event, not a wait.

- an activation written by another writer (another replica, `vpr index activate`)
  is served after one round, through the one hot swap;
- a new pair that cannot be loaded leaves the old one served, and /readyz and the
  metrics say so until the shared home names a loadable pair again;
- a running job of another live replica is neither failed by `recover` nor read
  as failed; once its owner's lease ends, every replica reads it as failed.
"""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.server.support import build_home, entries_for, place_images, wait_ready
from vpr.index.store import IndexStore
from vpr.model.lease import Lease, Leases, Owner
from vpr.model.registry import Registry
from vpr.server.app import create_app
from vpr.server.jobs import JobManager, rebuild_key
from vpr.settings import ServerSettings

JPEG = {"content-type": "image/jpeg"}
TOKEN = "follow-test-admin-token-0123456789"


def metric(client: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exposed")


def served_app(tmp_path):
    h = build_home(tmp_path)
    teacher = Registry(h.home / "models").load(h.teacher)
    images2 = place_images(tmp_path / "db2", 5, seed=9)
    store = IndexStore(h.home / "indexes")
    second = store.build("places", teacher, entries_for(images2), root=tmp_path / "db2", activate=False)
    assert str(second) == "places@2" and str(store.active("places")) == h.index
    # a round every hour: the test runs the rounds itself
    settings = ServerSettings(
        home=h.home,
        model="student",  # its own setting: the active version of `student`
        device="cpu",
        warmup=False,
        decode_threads=2,
        follow_interval_s=3600,
        replica_name="r1",
        admin_token=TOKEN,
    )
    return h, store, create_app(settings)


def test_an_activation_elsewhere_is_followed_and_a_broken_one_is_reported(tmp_path):
    h, store, app = served_app(tmp_path)
    with TestClient(app) as client:
        wait_ready(client)
        follower = app.state.follower
        assert follower.check() is False, "nothing changed"
        ready = client.get("/readyz").json()
        assert ready["index"] == h.index and ready["replica"] == "r1"
        assert ready["follow"]["wanted"] == {"model": ready["model"], "index": h.index}
        r = client.post("/v1/query", content=h.images[2].read_bytes(), headers=JPEG)
        assert r.status_code == 200 and r.headers["x-vpr-replica"] == "r1"

        store.activate("places@2")  # what another replica's activation writes
        assert follower.check() is True
        ready = client.get("/readyz").json()
        assert ready["index"] == "places@2" and ready["index_size"] == 5 and ready["follow"]["behind"] is False
        assert client.post("/v1/query", content=h.images[2].read_bytes(), headers=JPEG).json()["index"] == "places@2"

        # a version whose files do not match its manifest: it cannot be loaded
        teacher = Registry(h.home / "models").load(h.teacher)
        third = store.build("places", teacher, entries_for(h.images[:4]), root=h.db, activate=False)
        with open(store.dir(third) / "index.faiss", "ab") as f:
            f.write(b"damage")
        store.activate(third)
        assert follower.check() is False
        ready = client.get("/readyz")
        assert ready.status_code == 200, "still serving the previous pair"
        body = ready.json()
        assert body["index"] == "places@2" and body["follow"]["behind"] is True
        assert body["follow"]["wanted"]["index"] == "places@3" and "places@3" in body["follow"]["error"]
        assert metric(client, "vpr_follow_behind") == 1 and metric(client, "vpr_follow_failures_total") == 1
        assert follower.check() is False and metric(client, "vpr_follow_failures_total") == 1, "backs off"
        assert client.post("/v1/query", content=h.images[2].read_bytes(), headers=JPEG).json()["index"] == "places@2"

        store.activate("places@2")  # the shared home names a loadable pair again
        assert follower.check() is False
        body = client.get("/readyz").json()
        assert body["follow"]["behind"] is False and body["follow"]["error"] is None
        assert metric(client, "vpr_follow_behind") == 0

        # an admin choice made after start ranks above the replica's own VPR_MODEL:
        # this replica's own activation stays, and so does one made through another replica
        r = client.post("/v1/admin/models/activate", headers={"X-API-Key": TOKEN}, json={"model": h.teacher})
        assert r.status_code == 200, r.text
        assert follower.check() is False and client.get("/readyz").json()["model"] == h.teacher
        (h.home / "serving.json").write_text(
            json.dumps({"model": "student", "index": "places", "updated": "2999-01-01T00:00:00+00:00"})
        )
        assert follower.check() is True and client.get("/readyz").json()["model"] == h.student


def test_a_live_replicas_job_is_left_alone_and_read_as_failed_when_its_lease_ends(tmp_path):
    home = tmp_path / "home"
    other = Leases(home / "leases", Owner.this_process("other"), 30)
    mine = Leases(home / "leases", Owner.this_process("mine"), 30)
    job_id = "b" * 32
    lease = other.acquire(rebuild_key("places"), {"job": job_id})
    assert isinstance(lease, Lease)
    jobs_dir = home / "jobs"
    jobs_dir.mkdir(parents=True)
    job = {
        "id": job_id,
        "kind": "index.rebuild",
        "state": "running",
        "replica": "other",
        "owner": other.owner.as_dict(),
        "lease": lease.key,
        "finished": None,
        "error": None,
    }
    (jobs_dir / f"{job_id}.json").write_text(json.dumps(job))
    jobs = JobManager(jobs_dir, runtime=None, leases=mine)  # type: ignore[arg-type]  # reading needs no runtime
    assert jobs.recover() == 0
    assert jobs.get(job_id)["state"] == "running"  # type: ignore[index]
    assert [j["id"] for j in jobs.recent()] == [job_id]

    other.release(lease)  # its owner stops (a dead process on this machine reads the same)
    seen = jobs.get(job_id)
    assert seen is not None and seen["state"] == "failed" and "interrupted: replica other" in seen["error"]
    assert json.loads((jobs_dir / f"{job_id}.json").read_text())["state"] == "failed", "written for every replica"
