"""Admin routes: token checks, model hot swaps (also with requests in flight),
background index rebuilds that swap the served index while queries go on,
roll-backs, jobs persisted on disk."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from tests.server.support import build_home, entries_for, gated, place_images, wait_ready
from vpr.index.store import IndexStore
from vpr.model.registry import Registry
from vpr.server.app import create_app
from vpr.server.jobs import JobManager
from vpr.server.runtime import Runtime
from vpr.server.serving import Serving
from vpr.settings import ServerSettings

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def served_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    h = build_home(root)
    stale = uuid.uuid4().hex  # a job a killed server left running
    (h.home / "jobs").mkdir(parents=True)
    (h.home / "jobs" / f"{stale}.json").write_text(
        json.dumps({"id": stale, "kind": "index.rebuild", "state": "running"})
    )
    settings = ServerSettings(
        home=h.home,
        model="student",
        device="cpu",
        admin_token=TOKEN,
        warmup=False,
        decode_threads=2,
        data_roots=[root],  # the database folders of these tests lie beside the home
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, h, root, stale


@pytest.fixture
def served(served_module):
    """The module's server, back on the first student and places@1 before each
    test, so that no test depends on what an earlier one activated."""
    client, h, _, _ = served_module
    for path, body in (
        ("/v1/admin/models/activate", {"model": h.student}),
        ("/v1/admin/index/activate", {"index": h.index}),
    ):
        r = client.post(path, headers=AUTH, json=body)
        assert r.status_code == 200, r.text
    return served_module


class Querier(threading.Thread):
    """Queries image `i` in a loop until stopped; records (status, model, index, top id)."""

    def __init__(self, client, image, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.client, self.data, self.pause = client, image.read_bytes(), pause
        self.seen: list[tuple[int, str | None, str | None, int | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            r = self.client.post("/v1/query", content=self.data, headers=JPEG, params={"top_k": 1})
            b = r.json()
            self.seen.append(
                (r.status_code, b.get("model"), b.get("index"), b["results"][0]["id"] if r.status_code == 200 else None)
            )
            time.sleep(self.pause)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> list:
        self.halt.set()
        self.join(30)
        return self.seen


def test_admin_needs_the_right_token(served):
    client, _, _, _ = served
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"X-API-Key": "wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ):
        r = client.get("/v1/admin/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/v1/admin/models/activate", json={"model": "student@2"})
    assert r.status_code == 401
    assert client.get("/v1/admin/models", headers=AUTH).status_code == 200
    assert client.get("/v1/admin/models", headers={"X-API-Key": TOKEN}).status_code == 200
    assert client.app.state.metrics.registry.get_sample_value("vpr_admin_auth_failures_total") >= 7


def test_list_models(served):
    client, h, _, _ = served
    body = client.get("/v1/admin/models", headers=AUTH).json()
    by_ref = {m["ref"]: m for m in body["models"]}
    assert set(by_ref) == {h.teacher, h.student, h.student2, h.other}
    assert by_ref[h.student]["served"] and by_ref[h.student]["active"] and by_ref[h.student]["parent"] == h.teacher
    assert by_ref[h.other]["compatible_with_served_index"] is False
    assert by_ref[h.student2]["compatible_with_served_index"] is True
    assert body["served"] == {"model": h.student, "index": h.index, "index_size": 8}
    idx = client.get("/v1/admin/indexes", headers=AUTH).json()
    assert idx["indexes"]["places"][0]["active"] and idx["indexes"]["places"][0]["count"] == 8


def test_refused_activations_change_nothing(served):
    client, h, _, _ = served
    r = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.other})
    assert r.status_code == 409 and r.json()["error"] == "incompatible" and h.teacher in r.json()["detail"]
    r = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": "nosuch@1"})
    assert r.status_code == 404
    r = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": "bad name!"})
    assert r.status_code == 422
    r = client.post("/v1/admin/models/activate", headers=AUTH, json={"modle": h.student2})
    assert r.status_code == 422
    assert client.get("/readyz").json()["model"] == h.student
    assert Registry(h.home / "models").active("other") is None


def test_in_flight_request_finishes_on_the_old_model(served):
    client, h, _, _ = served
    rt = client.app.state.runtime
    orig = rt.current
    model, net = gated(orig.model)
    rt._publish(Serving(model, orig.index, rt.device))
    answer: dict = {}
    t = threading.Thread(
        target=lambda: answer.update(r=client.post("/v1/query", content=h.images[3].read_bytes(), headers=JPEG))
    )
    t.start()
    try:
        assert net.entered.wait(10)  # the request is inside the old model's forward pass
        r = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student2})
        assert r.status_code == 200, r.text
        assert r.json()["previous"]["model"] == h.student and r.json()["served"]["model"] == h.student2
    finally:
        net.gate.set()
        t.join(30)
    old = answer["r"]
    assert old.status_code == 200 and old.json()["model"] == h.student and old.json()["results"][0]["id"] == 3
    new = client.post("/v1/query", content=h.images[3].read_bytes(), headers=JPEG)
    assert new.json()["model"] == h.student2 and new.json()["results"][0]["id"] == 3
    # back to the first student for the next tests
    assert client.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student}).status_code == 200


def test_model_activation_during_queries(served):
    client, h, _, _ = served
    q = Querier(client, h.images[5])
    q.start()
    q.wait_for(3)
    r = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student2})
    n = len(q.seen)
    q.wait_for(n + 3)
    seen = q.stop()
    assert r.status_code == 200
    assert all(s == 200 for s, *_ in seen), seen
    models = [m for _, m, _, _ in seen]
    switch = models.index(h.student2)
    assert switch >= 3 and set(models[:switch]) == {h.student} and set(models[switch:]) == {h.student2}
    assert all(top == 5 for *_, top in seen)
    # persisted: the registry's active version and the server's choice survive a restart
    assert Registry(h.home / "models").active("student").version == 2
    assert json.loads((h.home / "serving.json").read_text())["model"] == "student"
    rt = Runtime(ServerSettings(home=h.home))
    model_spec, index_spec = rt.select()
    assert str(rt.registry.resolve(model_spec)) == h.student2 and index_spec == "places"


def test_rebuild_swaps_the_index_while_queries_go_on(served):
    client, h, root, _ = served
    db2 = root / "db2"
    images2 = place_images(db2, 10, seed=5)
    q = Querier(client, h.images[2])
    q.start()
    q.wait_for(2)
    r = client.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(db2), "batch_size": 4})
    assert r.status_code == 202, r.text
    at_submit = len(q.seen)
    job_id = r.json()["job"]
    assert r.headers["location"] == f"/v1/admin/jobs/{job_id}" == r.json()["status_url"]
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/admin/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    n = len(q.seen)
    q.wait_for(n + 2)
    seen = q.stop()
    assert job["state"] == "succeeded", job
    assert n > at_submit  # queries were answered while the job ran
    assert job["progress"]["done"] == job["progress"]["total"] == 10
    new = job["result"]["index"]  # places@2, or later when another test published a version first
    assert new.startswith("places@") and new != h.index and job["result"]["activated"] and job["result"]["count"] == 10
    assert job["result"]["model"] == h.teacher  # the index's own model described the new images
    assert json.loads((h.home / "jobs" / f"{job_id}.json").read_text())["state"] == "succeeded"
    assert all(s == 200 for s, *_ in seen), [x for x in seen if x[0] != 200]
    indexes = [i for _, _, i, _ in seen]
    assert indexes[0] == h.index and indexes[-1] == new
    ready = client.get("/readyz").json()
    assert ready["index"] == new and ready["index_size"] == 10
    r = client.post("/v1/query", content=images2[9].read_bytes(), headers=JPEG).json()
    assert r["index"] == new and r["results"][0]["id"] == 9 and r["results"][0]["path"] == "place09.jpg"
    listed = client.get("/v1/admin/jobs", headers=AUTH).json()["jobs"]
    assert job_id in [j["id"] for j in listed]


def test_failed_rebuilds_leave_the_served_index(served):
    client, h, root, _ = served
    before = client.get("/readyz").json()["index"]
    # built by an unrelated model: published but not activated
    r = client.post(
        "/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(root / "db"), "model": h.other, "name": "places"}
    )
    assert r.status_code == 202
    job = _wait(client, r.json()["job"])
    assert job["state"] == "failed" and "did not activate" in job["error"], job
    assert client.get("/readyz").json()["index"] == before


def test_rebuilds_that_cannot_work_are_refused_at_once(served):
    """What the request alone shows to be wrong is a 4xx with the reason, and no job."""
    client, h, root, _ = served
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    jobs_before = sorted(p.name for p in (h.home / "jobs").glob("*.json"))
    db = str(root / "db")
    for body, code, reason in [
        ({"folder": str(root / "missing")}, 422, "not a folder"),
        ({"folder": str(root / "empty")}, 422, "no images"),
        ({"folder": str(root / "notes"), "recursive": True}, 422, "no images"),
        ({"folder": db, "factory": "Bogus9"}, 422, "Bogus9"),
        ({"folder": db, "factory": "IVF64,Flat"}, 422, "at least 64 images"),  # 8 images cannot train it
        ({"dataset": {"kind": "bogus", "path": db}}, 422, "folder, mat, traversal, synthetic"),
        ({"dataset": {"kind": "folder", "path": str(root / "missing")}}, 422, "no such file"),
        ({}, 422, "exactly one"),
        ({"folder": db, "dataset": {"kind": "folder", "path": str(root)}}, 422, "exactly one"),
        ({"folder": db, "model": "nosuch"}, 404, "nosuch"),
        ({"folder": db, "name": "../evil"}, 422, "evil"),
        ({"folder": "../../etc"}, 403, "outside the data roots"),
        ({"folder": str(root.parent)}, 403, "outside the data roots"),
    ]:
        r = client.post("/v1/admin/index/rebuild", headers=AUTH, json=body)
        assert r.status_code == code, (body, r.text)
        assert reason in r.json()["detail"], (body, r.json())
    assert sorted(p.name for p in (h.home / "jobs").glob("*.json")) == jobs_before


def _wait(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/admin/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture
def on_a_second_index(tmp_path):
    """A server of its own serving places@2 (10 other places) over places@1 (8),
    so that rolling back depends on no other test having rebuilt the index."""
    h = build_home(tmp_path)
    images2 = place_images(tmp_path / "db2", 10, seed=5)
    teacher = Registry(h.home / "models").load(h.teacher)
    second = IndexStore(h.home / "indexes").build("places", teacher, entries_for(images2), root=tmp_path / "db2")
    assert str(second) == "places@2"
    settings = ServerSettings(
        home=h.home, model="student", device="cpu", admin_token=TOKEN, warmup=False, decode_threads=2
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, h


def test_index_roll_back_with_a_search_in_flight_and_reload(on_a_second_index):
    client, h = on_a_second_index
    rt = client.app.state.runtime
    orig = rt.current
    assert orig.index_spec == "places@2"
    model, net = gated(orig.model)
    rt._publish(Serving(model, orig.index, rt.device))
    answer: dict = {}
    t = threading.Thread(
        target=lambda: answer.update(r=client.post("/v1/query", content=h.images[1].read_bytes(), headers=JPEG))
    )
    t.start()
    try:
        assert net.entered.wait(10)
        r = client.post("/v1/admin/index/activate", headers=AUTH, json={"index": h.index})
    finally:
        net.gate.set()
        t.join(30)
    assert r.status_code == 200 and r.json()["served"]["index"] == h.index
    # the request in flight searched the index it started with, still open
    assert answer["r"].status_code == 200 and answer["r"].json()["index"] == "places@2"
    assert len(answer["r"].json()["results"]) == 5
    assert client.get("/readyz").json()["index_size"] == 8
    r = client.post("/v1/query", content=h.images[4].read_bytes(), headers=JPEG).json()
    assert r["index"] == h.index and r["results"][0]["id"] == 4
    assert client.post("/v1/admin/index/activate", headers=AUTH, json={"index": "places@99"}).status_code == 404
    r = client.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["served"]["index"] == h.index


def test_jobs_interrupted_by_a_restart_are_failed(served):
    client, _, _, stale = served
    job = client.get(f"/v1/admin/jobs/{stale}", headers=AUTH).json()
    assert job["state"] == "failed" and "interrupted" in job["error"]
    for bad in ("0" * 32, "nothex", "..%2F..%2Fetc%2Fpasswd"):
        assert client.get(f"/v1/admin/jobs/{bad}", headers=AUTH).status_code == 404


def test_rebuilds_only_read_under_the_data_roots(tmp_path):
    rt = Runtime(ServerSettings(home=tmp_path / "h", data_roots=[tmp_path / "data"]))
    jobs = JobManager(tmp_path / "h" / "jobs", rt)
    (tmp_path / "data" / "x").mkdir(parents=True)
    assert jobs._allowed(tmp_path / "data" / "x") == (tmp_path / "data" / "x").resolve()
    with pytest.raises(PermissionError, match="outside the data roots"):
        jobs._allowed(tmp_path / "data" / ".." / "elsewhere")


def _chain(start: str, steps: list[tuple[str, str]], end: str) -> list[int] | None:
    """An order in which every (previous, served) step follows the one before,
    from `start` to `end`; None when there is none."""

    def walk(at: str, left: list[int]) -> list[int] | None:
        if not left:
            return [] if at == end else None
        for i in left:
            if steps[i][0] == at and (rest := walk(steps[i][1], [j for j in left if j != i])) is not None:
                return [i, *rest]
        return None

    return walk(start, list(range(len(steps))))


def test_overlapping_activations_each_report_their_own_swap(served, monkeypatch):
    """Activations whose loads overlap: each reply's `previous` is the pair that
    very swap replaced, so the replies chain from the first pair to the last."""
    client, h, _, _ = served
    rt = client.app.state.runtime
    models = [h.student2, h.teacher, h.student, h.student2, h.teacher, h.student]
    together = threading.Barrier(len(models), timeout=60)
    load = rt.registry.load

    def load_together(*args, **kwargs):
        together.wait()  # every activation has read the state it starts from
        return load(*args, **kwargs)

    monkeypatch.setattr(rt.registry, "load", load_together)
    ready = client.get("/readyz").json()
    start, index = ready["model"], ready["index"]
    replies: list = [None] * len(models)

    def activate(i: int) -> None:
        replies[i] = client.post("/v1/admin/models/activate", headers=AUTH, json={"model": models[i]})

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert all(r is not None and r.status_code == 200 for r in replies), [r and r.text for r in replies]
    bodies = [r.json() for r in replies]
    assert sorted(b["served"]["model"] for b in bodies) == sorted(models)
    end = client.get("/readyz").json()["model"]
    steps = [(b["previous"]["model"], b["served"]["model"]) for b in bodies]
    assert _chain(start, steps, end) is not None, (start, steps, end)
    assert all(b["previous"]["index"] == b["served"]["index"] == index for b in bodies)
    assert client.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student}).status_code == 200
