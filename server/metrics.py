"""Prometheus metrics of one app, plus the ASGI middleware that records requests.

Each app owns its own `CollectorRegistry` so that several apps in one process
(tests, a bench harness) never clash on the global default registry. Routes
are labelled by their template (`/v1/admin/jobs/{job_id}`), never by the raw
path, so a scanner cannot blow up label cardinality. Each help text says what
one observation is (an item, a forward pass, a stream), and
tests/server/test_metrics.py holds every family to it. The process's own
metrics (`process_*`, `python_gc_*`, `python_info`) come from prometheus_client's
collectors, registered on the same private registry.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNMATCHED = "<unmatched>"


class Metrics:
    """All collectors of the service, registered in a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vpr_http_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vpr_http_request_duration_seconds",
            "HTTP request latency by route, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "vpr_http_requests_in_flight", "HTTP requests being served (a scrape counts itself)", registry=r
        )
        # The micro-batcher times the model and the index once per group of items
        # (batch_size tells how many shared it); decode and queue are per item.
        self.stage = Histogram(
            "vpr_query_stage_seconds",
            "Time in each query stage: decode and queue once per item; "
            "embed once per successful model forward pass and search once per successful index search "
            "(each shared by the items of a micro-batch)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vpr_model_batch_size", "Items per successful model forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "vpr_queue_depth", "Items waiting for the model (updated on each enqueue, batch and scrape)", registry=r
        )
        self.queue_rejected = Counter(
            "vpr_queue_rejected_total", "Items refused because the queue was full", ["source"], registry=r
        )
        self.frames_received = Counter(
            "vpr_stream_frames_received_total", "Frames received on streams", ["codec"], registry=r
        )
        self.frames_processed = Counter(
            "vpr_stream_frames_processed_total", "Frames answered on streams", ["codec"], registry=r
        )
        self.frames_dropped = Counter(
            "vpr_stream_frames_dropped_total",
            "Frames received on streams but not answered, by reason: superseded (a newer frame came), "
            "queue_full, timeout, undecodable (bad data), unprocessable (the model failed on it)",
            ["codec", "reason"],
            registry=r,
        )
        self.streams = Gauge("vpr_stream_connections", "Websocket streams accepted and not yet closed", registry=r)
        self.stream_errors = Counter(
            "vpr_stream_errors_total",
            "Streams the server closed because of an error, by the error code it sent (internal: a server fault)",
            ["reason"],
            registry=r,
        )
        self.index_size = Gauge("vpr_index_size", "Vectors in the served index", registry=r)
        self.ready = Gauge("vpr_ready", "1 when a model and an index are served", registry=r)
        self.active = Gauge("vpr_active_version_info", "The served versions (value 1)", ["kind", "version"], registry=r)
        self.swaps = Counter(
            "vpr_swaps_total", "Hot swaps that changed the served model or index, by what changed", ["kind"], registry=r
        )
        self.follow_behind = Gauge(
            "vpr_follow_behind",
            "1 while this replica serves another pair than the shared home names, because loading that one failed",
            registry=r,
        )
        self.follow_failures = Counter(
            "vpr_follow_failures_total",
            "Attempts to serve the pair the shared home names that failed (the previous pair stayed served)",
            registry=r,
        )
        self.admin_auth_failures = Counter(
            "vpr_admin_auth_failures_total", "Admin requests refused for a missing or wrong token", registry=r
        )
        self.jobs = Counter(
            "vpr_jobs_total",
            "Background jobs that ran to an end in this process, by kind and final state (succeeded, failed)",
            ["kind", "state"],
            registry=r,
        )
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*

    def set_served(self, model: str | None, index: str | None, index_size: int | None) -> None:
        """Publish what is served now (called after every load or swap)."""
        self.active.clear()
        if model:
            self.active.labels("model", model).set(1)
        if index:
            self.active.labels("index", index).set(1)
        self.index_size.set(index_size or 0)
        self.ready.set(1 if model and index else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering, websockets untouched): counts
    and times every HTTP request by route template and final status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or UNMATCHED
            code = str(status["code"])
            self.metrics.requests.labels(label, scope["method"], code).inc()
            self.metrics.latency.labels(label, scope["method"], code).observe(time.perf_counter() - start)
