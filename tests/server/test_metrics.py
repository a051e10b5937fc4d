"""Every metric family means what its help text says, and the probes answer
GET and HEAD: one test per family, each reading the `/metrics` exposition after
real requests to a served app (uvicorn in a thread, see support.py).

Tests compare a scrape before and after their own requests, so they hold in
any order; waits are on events or on the metric itself, never on sleeps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, connect

from tests.server.support import Home, build_home, gated
from vpr.server.app import create_app
from vpr.server.harness import ThreadServer
from vpr.server.metrics import Metrics
from vpr.server.serving import Serving
from vpr.settings import ServerSettings

TOKEN = "metrics-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Served:
    srv: ThreadServer
    h: Home
    http: httpx.Client

    def scrape(self) -> Samples:
        r = self.http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

    def family(self, name: str) -> tuple[str, str]:
        """(type, help) of one family as exposed (counters without `_total`)."""
        found = {
            f.name: (f.type, f.documentation) for f in text_string_to_metric_families(self.http.get("/metrics").text)
        }
        assert name in found, f"{name} not exposed"
        return found[name]

    def query(self, i: int) -> httpx.Response:
        return self.http.post("/v1/query", content=self.h.images[i].read_bytes(), headers=JPEG, params={"top_k": 1})

    def stream(self) -> ClientConnection:
        return connect(f"{self.srv.ws_url}/v1/stream", open_timeout=30)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    h = build_home(root)
    settings = ServerSettings(
        home=h.home,
        model="student",
        device="cpu",
        admin_token=TOKEN,
        data_roots=[root],
        queue_size=2,
        max_batch_size=4,
        max_batch_files=2,
        decode_threads=2,
    )
    with ThreadServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        yield Served(srv, h, http)


# ---- probes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head_as_get(served, path):
    get, head = served.http.get(path), served.http.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_readyz_head_says_not_ready_with_retry_after(tmp_path):
    with TestClient(create_app(ServerSettings(home=tmp_path / "empty", device="cpu"))) as client:
        wait_for(lambda: client.get("/readyz").json()["state"] == "not_ready", "the load to fail")
        r = client.head("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] and r.content == b""
        assert client.head("/healthz").status_code == 200


# ---- HTTP -------------------------------------------------------------------------------------------
def test_http_requests_total(served):
    assert served.family("vpr_http_requests")[0] == "counter"
    before = served.scrape()
    for _ in range(3):
        assert served.http.get("/healthz").status_code == 200
    assert served.http.get("/no/such/page").status_code == 404
    assert served.http.head("/readyz").status_code == 200
    after = served.scrape()
    assert delta(before, after, "vpr_http_requests_total", route="/healthz", method="GET", status="200") == 3
    assert delta(before, after, "vpr_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert delta(before, after, "vpr_http_requests_total", route="/readyz", method="HEAD", status="200") == 1


def test_http_request_duration_seconds(served):
    assert served.family("vpr_http_request_duration_seconds")[0] == "histogram"
    labels = {"route": "/v1/query", "method": "POST", "status": "200"}
    before = served.scrape()
    assert served.query(0).status_code == 200 and served.query(1).status_code == 200
    after = served.scrape()
    assert delta(before, after, "vpr_http_request_duration_seconds_count", **labels) == 2
    assert delta(before, after, "vpr_http_request_duration_seconds_sum", **labels) > 0
    assert delta(before, after, "vpr_http_request_duration_seconds_bucket", le="+Inf", **labels) == 2


def test_in_flight_queue_depth_and_rejections(served):
    """Query 0 holds the (gated) model, queries 1 and 2 fill the queue of 2,
    query 3 is refused: the gauges see them, the counter counts the refusal."""
    for name, kind in [
        ("vpr_http_requests_in_flight", "gauge"),
        ("vpr_queue_depth", "gauge"),
        ("vpr_queue_rejected", "counter"),
    ]:
        assert served.family(name)[0] == kind
    rt = served.srv.app.state.runtime
    orig = rt.current
    model, net = gated(orig.model)
    rt._publish(Serving(model, orig.index, rt.device))
    statuses: dict[int, int] = {}

    def post(i: int) -> None:
        with httpx.Client(base_url=served.srv.url, timeout=60) as c:
            statuses[i] = c.post("/v1/query", content=served.h.images[i].read_bytes(), headers=JPEG).status_code

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    before = served.scrape()
    try:
        threads[0].start()
        assert net.entered.wait(30)
        threads[1].start()
        threads[2].start()
        wait_for(lambda: served.srv.app.state.batcher.depth == 2, "two queued queries")
        during = served.scrape()
        refused = served.query(3)
    finally:
        net.gate.set()
        for t in threads:
            t.join(60)
        rt._publish(Serving(orig.model, orig.index, rt.device))
    after = served.scrape()
    assert value(before, "vpr_http_requests_in_flight") == 1  # the scrape itself
    assert value(during, "vpr_http_requests_in_flight") == 4
    assert value(during, "vpr_queue_depth") == 2
    assert refused.status_code == 503 and refused.json()["error"] == "overloaded"
    assert statuses == {0: 200, 1: 200, 2: 200}
    assert delta(before, after, "vpr_queue_rejected_total", source="http") == 1
    assert value(after, "vpr_http_requests_in_flight") == 1 and value(after, "vpr_queue_depth") == 0


# ---- the query stages ---------------------------------------------------------------------------------
def test_query_stage_seconds(served):
    """decode and queue are per item; embed is per forward pass and search per
    index search, so they follow the batches, not the items."""
    kind, help_text = served.family("vpr_query_stage_seconds")
    assert (
        kind == "histogram" and "once per item" in help_text and "once per successful model forward pass" in help_text
    )
    before = served.scrape()
    assert served.query(2).status_code == 200
    one = served.scrape()
    for stage in ("decode", "queue", "embed", "search"):
        assert delta(before, one, "vpr_query_stage_seconds_count", stage=stage) == 1, stage
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in served.h.images[:2]]
    r = served.http.post("/v1/query/batch", files=files)
    assert r.status_code == 200 and r.json()["failed"] == 0
    two = served.scrape()
    passes = delta(one, two, "vpr_model_batch_size_count")
    assert passes in (1, 2)  # the two items shared a forward pass or not: both are honest
    assert delta(one, two, "vpr_query_stage_seconds_count", stage="decode") == 2
    assert delta(one, two, "vpr_query_stage_seconds_count", stage="queue") == 2
    assert delta(one, two, "vpr_query_stage_seconds_count", stage="embed") == passes
    assert delta(one, two, "vpr_query_stage_seconds_count", stage="search") == passes


def test_model_batch_size(served):
    assert served.family("vpr_model_batch_size")[0] == "histogram"
    before = served.scrape()
    assert served.query(4).status_code == 200
    after = served.scrape()
    assert delta(before, after, "vpr_model_batch_size_count") == 1
    assert delta(before, after, "vpr_model_batch_size_sum") == 1
    assert delta(before, after, "vpr_model_batch_size_bucket", le="1.0") == 1


# ---- streams ----------------------------------------------------------------------------------------
def _hello(ws: ClientConnection, hello: str = '{"codec": "jpeg", "top_k": 1}') -> dict:
    ws.send(hello)
    return json.loads(ws.recv(30))


def test_stream_connections(served):
    assert served.family("vpr_stream_connections")[0] == "gauge"

    def open_now() -> float:
        return value(served.scrape(), "vpr_stream_connections")

    wait_for(lambda: open_now() == 0, "the streams of other tests to be closed")
    with served.stream() as ws:
        assert _hello(ws)["type"] == "ready"
        assert open_now() == 1
    wait_for(lambda: open_now() == 0, "the stream to be closed")


def test_stream_frames_received_processed_dropped(served):
    for name in ("received", "processed", "dropped"):
        assert served.family(f"vpr_stream_frames_{name}")[0] == "counter"
    before = served.scrape()
    with served.stream() as ws:
        assert _hello(ws)["type"] == "ready"
        ws.send(served.h.images[5].read_bytes())
        assert json.loads(ws.recv(30))["type"] == "result"
        ws.send(b"these bytes are no image")
        assert json.loads(ws.recv(30))["type"] == "warning"
        ws.send('{"type": "end"}')
        end = json.loads(ws.recv(30))
    assert end == {"type": "end", "received": 2, "processed": 1, "dropped": 0, "bad_frames": 1}
    after = served.scrape()
    assert delta(before, after, "vpr_stream_frames_received_total", codec="jpeg") == 2
    assert delta(before, after, "vpr_stream_frames_processed_total", codec="jpeg") == 1
    assert delta(before, after, "vpr_stream_frames_dropped_total", codec="jpeg", reason="undecodable") == 1
    assert delta(before, after, "vpr_stream_frames_dropped_total", codec="jpeg", reason="superseded") == 0


def test_stream_errors_total_counts_client_and_internal_errors(served, monkeypatch):
    assert served.family("vpr_stream_errors")[0] == "counter"
    before = served.scrape()
    with served.stream() as ws:
        assert _hello(ws, "not json")["error"] == "bad_hello"

    def broken(*args: object, **kw: object) -> dict:
        raise RuntimeError("a fault of the server")

    monkeypatch.setattr(served.srv.app.state.service, "answer", broken)
    with served.stream() as ws:
        assert _hello(ws)["type"] == "ready"
        ws.send(served.h.images[6].read_bytes())
        msg = json.loads(ws.recv(30))
    assert msg["type"] == "error" and msg["error"] == "internal" and msg["close_code"] == 1011
    after = served.scrape()
    assert delta(before, after, "vpr_stream_errors_total", reason="bad_hello") == 1
    assert delta(before, after, "vpr_stream_errors_total", reason="internal") == 1


# ---- what is served, swaps, admin, jobs ----------------------------------------------------------------
def test_index_size_ready_and_active_versions(served, tmp_path):
    for name in ("vpr_index_size", "vpr_ready", "vpr_active_version_info"):
        assert served.family(name)[0] == "gauge"
    now = served.scrape()
    assert value(now, "vpr_ready") == 1 and value(now, "vpr_index_size") == len(served.h.images)
    assert value(now, "vpr_active_version_info", kind="model", version=served.h.student) == 1
    assert value(now, "vpr_active_version_info", kind="index", version=served.h.index) == 1
    with TestClient(create_app(ServerSettings(home=tmp_path / "empty", device="cpu"))) as client:
        wait_for(lambda: client.get("/readyz").json()["state"] == "not_ready", "the load to fail")
        text = client.get("/metrics").text
    assert "vpr_ready 0.0" in text and "vpr_index_size 0.0" in text
    assert "vpr_active_version_info{" not in text


def test_swaps_total(served):
    assert served.family("vpr_swaps")[0] == "counter"
    h = served.h
    before = served.scrape()
    try:
        r = served.http.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student2})
        assert r.status_code == 200, r.text
        swapped = served.scrape()
    finally:
        r = served.http.post("/v1/admin/models/activate", headers=AUTH, json={"model": h.student})
        assert r.status_code == 200, r.text
    after = served.scrape()
    assert delta(before, swapped, "vpr_swaps_total", kind="model") == 1
    assert value(swapped, "vpr_active_version_info", kind="model", version=h.student2) == 1
    assert value(swapped, "vpr_active_version_info", kind="model", version=h.student) == 0
    assert delta(before, after, "vpr_swaps_total", kind="model") == 2
    assert delta(before, after, "vpr_swaps_total", kind="index") == 0  # the index did not change


def test_admin_auth_failures_total(served):
    assert served.family("vpr_admin_auth_failures")[0] == "counter"
    before = served.scrape()
    assert served.http.get("/v1/admin/models").status_code == 401
    assert served.http.get("/v1/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert served.http.get("/v1/admin/models", headers=AUTH).status_code == 200
    assert delta(before, served.scrape(), "vpr_admin_auth_failures_total") == 2


@pytest.mark.slow
def test_jobs_total(served):
    """A rebuild that ends well and one that fails, each counted once under its
    final state (the counter is read until it moves: it follows the job file)."""
    assert served.family("vpr_jobs")[0] == "counter"
    db: Path = served.h.db
    before = served.scrape()
    good = {"folder": str(db), "name": "places-copy", "activate": False}
    bad = {"folder": str(db), "name": "places", "model": served.h.other}  # built, but cannot be served: fails
    for body in (good, bad):
        assert served.http.post("/v1/admin/index/rebuild", headers=AUTH, json=body).status_code == 202

    def counted() -> float:
        now = served.scrape()
        return sum(delta(before, now, "vpr_jobs_total", kind="index.rebuild", state=s) for s in ("succeeded", "failed"))

    wait_for(lambda: counted() == 2, "both jobs to end", timeout=120)
    after = served.scrape()
    assert delta(before, after, "vpr_jobs_total", kind="index.rebuild", state="succeeded") == 1
    assert delta(before, after, "vpr_jobs_total", kind="index.rebuild", state="failed") == 1


# ---- the process ----------------------------------------------------------------------------------------
def test_process_and_platform_metrics(served):
    now = served.scrape()
    assert served.family("process_cpu_seconds")[0] == "counter"
    assert value(now, "process_cpu_seconds_total") > 0
    assert value(now, "process_resident_memory_bytes") > 10 * 2**20
    assert value(now, "process_open_fds") > 0
    assert value(now, "process_start_time_seconds") <= time.time()
    info = [labels for (name, labels) in now if name == "python_info"]
    assert len(info) == 1 and dict(info[0])["implementation"] == "CPython"
    assert any(name == "python_gc_collections_total" for (name, _) in now)
    # each app's own registry: a second one in this process exposes them too, without a clash
    second = Metrics().render()[0].decode()
    assert "process_resident_memory_bytes" in second and "python_info{" in second
