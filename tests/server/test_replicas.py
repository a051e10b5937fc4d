"""Replicas: two `vpr serve` processes over one home behind nginx (the proxy of
docker-compose.yml, deploy/nginx/nginx.conf, started here on loopback).

Under sustained queries through the proxy:
- an admin rebuild sent through the proxy is served by both replicas within the
  follow bound (VPR_FOLLOW_INTERVAL_S plus the time to load the new index);
- a websocket stream passes the proxy (upgraded);
- a second rebuild of the same index during the first, sent to the other replica,
  answers 202 with the running job; every replica reads that job;
- killing (SIGKILL) the replica that holds the rebuild's lease mid-rebuild leaves
  the other serving the previous version; the job reads as failed there, and the
  next rebuild succeeds on the survivor;
- no query fails: every answer through the proxy is a 200, except the documented
  503s (queue full or not ready, with Retry-After), which are counted.

The rebuild is held at publication by the test taking the index's writer lock
(as tests/server/test_crash.py does), so "during the first" and "mid-rebuild" are
events, not timing. The Milvus variant runs one replica on Milvus Lite (a Lite
file belongs to one process; a real deployment points every replica at a Milvus
server): rebuilds into Milvus through the proxy under their lease, and an
activation written by another writer, followed.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import skip_or_fail
from tests.server.live_support import serve_process
from tests.server.support import build_home, place_images
from vpr.index.store import IndexStore
from vpr.model.store import VersionedStore
from vpr.server.harness import NginxProxy, ServeProcess, nginx_binary

TOKEN = "replicas-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}
FOLLOW_S = 0.5  # VPR_FOLLOW_INTERVAL_S of the replicas
LOAD_ALLOWANCE_S = 15.0  # loading and warming an index on a busy 2-core machine
BOUND_S = FOLLOW_S + LOAD_ALLOWANCE_S
EXTRA_IMAGES = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def nginx_installed() -> None:
    if nginx_binary() is None:
        skip_or_fail("nginx is not installed (run .ci/install-proxy.sh as root)")


@dataclass
class Load:
    """Closed-loop clients sending queries through the proxy until stopped."""

    url: str
    images: list[Path]
    clients: int = 2
    answers: list[tuple[float, int, str, str | None]] = field(default_factory=list)  # (t, status, replica, index)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, seed: int) -> None:
        bodies = [p.read_bytes() for p in self.images]
        i = seed
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                i += 1
                try:
                    r = http.post("/v1/query", content=bodies[i % len(bodies)], headers=JPEG, params={"top_k": 3})
                except httpx.HTTPError as e:
                    with self._lock:
                        self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                index = r.json().get("index") if r.status_code == 200 else None
                with self._lock:
                    self.answers.append((time.monotonic(), r.status_code, r.headers.get("x-vpr-replica", "?"), index))
                    if r.status_code not in (200, 503) or (r.status_code == 503 and "retry-after" not in r.headers):
                        self.failures.append(f"{r.status_code}: {r.text[:300]}")

    def since(self, t: float) -> list[tuple[float, int, str, str | None]]:
        with self._lock:
            return [a for a in self.answers if a[0] >= t]

    def wait_for(self, what: Callable[[list[tuple[float, int, str, str | None]]], bool], since: float, timeout: float):
        deadline = time.monotonic() + timeout
        while not what(self.since(since)):
            assert not self.failures, self.failures[:5]
            assert time.monotonic() < deadline, f"not seen within {timeout} s: {self.since(since)[-6:]}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def poll(fn: Callable[[], dict], until: Callable[[dict], bool], timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if until(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s: {value}"
        time.sleep(0.05)


def job_of(client: httpx.Client, job_id: str) -> dict:
    r = client.get(f"/v1/admin/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def readyz(server: ServeProcess) -> dict:
    return httpx.get(f"{server.url}/readyz", timeout=30).json()


def start_replicas(home: Path, tmp_path: Path, names: list[str], env: dict[str, str]) -> list[ServeProcess]:
    servers = [
        serve_process(home, tmp_path / f"{n}.log", env={**env, "VPR_REPLICA_NAME": n, "VPR_WARMUP": "false"})
        for n in names
    ]
    try:
        for s in servers:  # start together, then wait: their imports and loads overlap
            s.start(ready=False)
        for s in servers:
            s.wait_ready(180)
    except BaseException:
        for s in servers:
            s.kill()
        raise
    return servers


def test_two_replicas_behind_nginx_follow_rebuilds_and_survive_the_lease_holder(tmp_path):
    h = build_home(tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    for p in h.images:
        shutil.copy(p, big / p.name)
    for i, p in enumerate(place_images(tmp_path / "extra", EXTRA_IMAGES, seed=5)):
        p.rename(big / f"extra{i:03d}.jpg")
    env = {
        "VPR_ADMIN_TOKEN": TOKEN,
        "VPR_DATA_ROOTS": str(tmp_path),
        "VPR_FOLLOW_INTERVAL_S": str(FOLLOW_S),
        "VPR_LEASE_TTL_S": "30",  # a dead holder on this machine is replaced at once, long before expiry
    }
    a, b = start_replicas(h.home, tmp_path, ["a", "b"], env)
    by_name = {"a": a, "b": b}
    proxy = NginxProxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], tmp_path / "nginx")
    load: Load | None = None
    writer = VersionedStore(h.home / "indexes", "index")
    try:
        proxy.start(timeout=60)
        load = Load(proxy.url, h.images).start()
        t0 = time.monotonic()
        load.wait_for(lambda seen: {r for _, s, r, _ in seen if s == 200} == {"a", "b"}, t0, 60)
        # a websocket stream through the proxy (upgraded; it stays on one replica)
        with ws_connect(f"{proxy.ws_url}/v1/stream", open_timeout=30) as ws:
            ws.send(json.dumps({"codec": "jpeg", "top_k": 2}))
            assert json.loads(ws.recv(30))["type"] == "ready"
            for i in range(3):
                ws.send(h.images[i].read_bytes())
                msg = json.loads(ws.recv(30))
                assert msg["type"] == "result" and msg["results"][0]["id"] == i, msg

        with httpx.Client(base_url=proxy.url, timeout=60) as via_proxy:
            # ---- 1. a rebuild through the proxy; a second one meanwhile returns the running job
            with writer.writer("places"):  # the rebuild describes, then waits here to publish
                r = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(big)})
                assert r.status_code == 202, r.text
                first = r.json()
                holder = first["replica"]
                assert first["existing"] is False and holder == r.headers["x-vpr-replica"]
                other = by_name["b" if holder == "a" else "a"]
                with httpx.Client(base_url=other.url, timeout=60) as direct:
                    again = direct.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(big)})
                    assert again.status_code == 202, again.text
                    assert again.json()["job"] == first["job"] and again.json()["existing"] is True
                    seen_there = job_of(direct, first["job"])  # job records are read by every replica
                    assert seen_there["replica"] == holder and seen_there["state"] in ("queued", "running")
                assert (
                    via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(h.db)}).json()["job"]
                    == first["job"]
                )
                assert readyz(a)["index"] == readyz(b)["index"] == "places@1"
            done = poll(
                lambda: job_of(via_proxy, first["job"]), lambda j: j["state"] in ("succeeded", "failed"), 120, "job"
            )
            assert done["state"] == "succeeded" and done["result"]["index"] == "places@2", done
            published = time.monotonic()
            for server in (a, b):
                poll(lambda s=server: readyz(s), lambda z: z["index"] == "places@2", BOUND_S, f"{server.url} follows")
            followed_in = time.monotonic() - published
            assert followed_in <= BOUND_S
            for server in (a, b):  # the holder's follower too agrees at its next round
                poll(
                    lambda s=server: readyz(s)["follow"],
                    lambda f: f["behind"] is False and f["wanted"]["index"] == "places@2",
                    BOUND_S,
                    "follow state",
                )
            t1 = time.monotonic()
            load.wait_for(lambda seen: {r for _, s, r, i in seen if s == 200 and i == "places@2"} == {"a", "b"}, t1, 60)

            # ---- 2. the lease holder dies mid-rebuild
            with writer.writer("places"):
                r = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(big)})
                assert r.status_code == 202 and r.json()["existing"] is False, r.text
                doomed_job, doomed_name = r.json()["job"], r.json()["replica"]
                doomed = by_name[doomed_name]
                survivor = b if doomed is a else a
                poll(lambda: job_of(via_proxy, doomed_job), lambda j: j["state"] == "running", 60, "running")
                doomed.kill()
                assert doomed.returncode == -signal.SIGKILL
            t2 = time.monotonic()
            assert readyz(survivor)["index"] == "places@2"
            with httpx.Client(base_url=survivor.url, timeout=60) as direct:
                dead = job_of(direct, doomed_job)
                assert dead["state"] == "failed" and "interrupted" in dead["error"], dead
            load.wait_for(lambda seen: sum(1 for _, s, r, _ in seen if s == 200) >= 10, t2, 60)
            assert {r for _, s, r, _ in load.since(t2 + 1.0) if s == 200} <= {survivor_name(by_name, survivor)}

            r = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(big)})
            assert r.status_code == 202 and r.json()["existing"] is False and r.json()["job"] != doomed_job, r.text
            done = poll(lambda: job_of(via_proxy, r.json()["job"]), lambda j: j["state"] in FINAL, 120, "job")
            assert done["state"] == "succeeded" and done["result"]["index"] == "places@3", done
            assert readyz(survivor)["index"] == "places@3"
            t3 = time.monotonic()
            load.wait_for(lambda seen: any(s == 200 and i == "places@3" for _, s, _, i in seen), t3, 60)
        load.stop()
        statuses = Counter(s for _, s, _, _ in load.answers)
        assert not load.failures, load.failures[:5]
        assert statuses[200] > 0 and set(statuses) <= {200, 503}, statuses
        print(f"\nreplicas: followed in {followed_in:.2f} s (bound {BOUND_S:g} s); answers {dict(statuses)}")
    finally:
        if load is not None:
            load.stop()
        proxy.stop()
        for s in (a, b):
            s.stop()
    assert not list((h.home / "indexes" / "places").glob(".tmp-*"))
    assert IndexStore(h.home / "indexes").versions("places") == [1, 2, 3]


FINAL = ("succeeded", "failed")


def survivor_name(by_name: dict[str, ServeProcess], server: ServeProcess) -> str:
    return next(n for n, s in by_name.items() if s is server)


def test_a_milvus_replica_behind_nginx_rebuilds_under_its_lease_and_follows_activations(tmp_path):
    """Milvus Lite: one replica (a Lite file belongs to one process; a deployment
    points every replica at a Milvus server). Through the proxy, under queries: a
    rebuild into Milvus takes its lease (a second one returns the running job) and
    is served; a second version too; then a roll-back written by another writer
    (`vpr index activate`, another replica) is followed."""
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as e:
        skip_or_fail(f"the Milvus variant needs pymilvus and milvus-lite (extra 'milvus'): {e}")
    h = build_home(tmp_path)
    few = tmp_path / "few"
    few.mkdir()
    for p in h.images[:5]:
        shutil.copy(p, few / p.name)
    env = {
        "VPR_ADMIN_TOKEN": TOKEN,
        "VPR_DATA_ROOTS": str(tmp_path),
        "VPR_FOLLOW_INTERVAL_S": str(FOLLOW_S),
        "VPR_INDEX_BACKEND": "milvus",  # new indexes go to Milvus Lite in the home
    }
    (server,) = start_replicas(h.home, tmp_path, ["m"], env)
    proxy = NginxProxy([f"127.0.0.1:{server.port}"], tmp_path / "nginx")
    load: Load | None = None
    writer = VersionedStore(h.home / "indexes", "index")
    try:
        proxy.start(timeout=60)
        load = Load(proxy.url, h.images).start()
        with httpx.Client(base_url=proxy.url, timeout=60) as via_proxy:

            def rebuild(folder: Path, hold: bool) -> dict:
                body = {"folder": str(folder), "name": "lite", "model": h.teacher}
                if hold:
                    with writer.writer("lite"):
                        r = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json=body)
                        assert r.status_code == 202 and r.json()["existing"] is False, r.text
                        again = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json=body)
                        assert again.status_code == 202 and again.json()["existing"], again.text
                        assert again.json()["job"] == r.json()["job"]
                else:
                    r = via_proxy.post("/v1/admin/index/rebuild", headers=AUTH, json=body)
                    assert r.status_code == 202, r.text
                return poll(lambda: job_of(via_proxy, r.json()["job"]), lambda j: j["state"] in FINAL, 120, "job")

            first = rebuild(h.db, hold=True)
            if first["state"] != "succeeded" and "milvus" in (first.get("error") or "").lower():
                skip_or_fail(f"Milvus Lite cannot start here: {first['error']}")
            assert first["state"] == "succeeded" and first["result"]["index"] == "lite@1", first
            second = rebuild(few, hold=False)
            assert second["state"] == "succeeded" and second["result"]["index"] == "lite@2", second
        store = IndexStore(h.home / "indexes")
        assert {store.manifest(f"lite@{v}")["backend"] for v in (1, 2)} == {"milvus"}
        assert readyz(server)["index"] == "lite@2" and readyz(server)["index_size"] == 5
        t = time.monotonic()
        load.wait_for(lambda seen: any(s == 200 and i == "lite@2" for _, s, _, i in seen), t, 60)

        writer.activate("lite@1")  # a roll-back by another writer
        changed = time.monotonic()
        z = poll(lambda: readyz(server), lambda z: z["index"] == "lite@1", BOUND_S, "follows the roll-back")
        assert z["index_size"] == 8 and z["follow"]["behind"] is False
        load.wait_for(lambda seen: any(s == 200 and i == "lite@1" for _, s, _, i in seen), changed, 60)
        load.stop()
        assert not load.failures, load.failures[:5]
        assert {s for _, s, _, _ in load.answers} <= {200, 503}
    finally:
        if load is not None:
            load.stop()
        proxy.stop()
        server.stop()
