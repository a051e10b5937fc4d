"""The FastAPI application: `create_app(settings)` assembles it, `serve(settings)` runs it.

Routes live in server/routes/ (probes, queries, the stream, the web page,
admin); they reach the server's parts through FastAPI dependencies
(server/deps.py) that read `app.state`, filled here. The parts are built
here, so that bad settings fail at once, and started and stopped by the
lifespan:

    settings -> metrics, micro-batcher, runtime (the served pair), decode pool,
                query service, open streams, jobs
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI

from vpr.model.lease import Leases
from vpr.server.batcher import MicroBatcher
from vpr.server.connections import header_deadline_protocol
from vpr.server.errors import install_error_handlers
from vpr.server.follow import Follower, ReplicaHeader, owner_for
from vpr.server.inputs import BodyLimitMiddleware
from vpr.server.jobs import JobManager
from vpr.server.metrics import Metrics, MetricsMiddleware
from vpr.server.routes import admin, health, query, stream, web
from vpr.server.runtime import Runtime
from vpr.server.service import QueryService
from vpr.server.stream import OpenStreams
from vpr.settings import ServerSettings

log = logging.getLogger(__name__)

API_VERSION = "1"
DESCRIPTION = """Top-k places for a (low-quality) query image or a live video stream.

**Errors** are JSON `{"error": code, "detail": message}` with a 4xx/5xx status.

**Streaming** (`WS /v1/stream`, not listed below): send a JSON text hello
`{"codec": "jpeg" | "h264", "top_k": 5, "fps": 30}`, then binary messages (one
JPEG each, or an H.264 Annex-B byte stream cut anywhere), optionally
`{"type": "end"}`. The server answers `ready`, then one `result` per processed
frame (`frame`, `pts`, `time_s`, `results`, `track`, `latency_ms`, `timings_ms`,
`received`, `processed`, `dropped`), `warning` for an undecodable frame, and
`end` or `error` (then it closes: 1000 normal, 1003 bad message, 1007 bad
stream, 1008 bad hello, 1009 too big, 1011 internal, 1013 not ready / busy).
While the model is busy only the newest frame is kept.

**Tracking**: each stream has a causal tracker over the database places; every
`result` carries `track` (`id`, `label`, `path`, `position`, `confidence` in
0..1, `localized`, `frames`, `mode`, `update_ms`), or null after a hello with
`"track": false`. Over HTTP, frames sent one request at a time share a tracker
when they name a session (`X-VPR-Session: <id>` on `POST /v1/query`; `track=false`
for a frame-only answer); sessions are forgotten after VPR_TRACK_SESSION_IDLE_S
idle (300 s by default) and at most VPR_TRACK_MAX_SESSIONS are kept (1024).

**Admin** routes need `Authorization: Bearer <token>` or `X-API-Key: <token>`
and exist only when the server has a token (VPR_ADMIN_TOKEN / VPR_ADMIN_TOKEN_FILE).
"""


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    token = settings.resolved_admin_token()  # a broken token file fails here, not on the first request
    metrics = Metrics()
    batcher = MicroBatcher(settings.max_batch_size, settings.max_wait_ms, settings.queue_size, metrics)
    runtime = Runtime(settings, batcher=batcher, metrics=metrics)
    pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="vpr-decode")
    # Replicas over one shared home: leases for writers, a follower of what to serve.
    owner = owner_for(settings.replica_name)
    leases = Leases(settings.leases_dir, owner, settings.lease_ttl_s)
    follower = Follower(runtime, settings.follow_interval_s, leases=leases, metrics=metrics)
    jobs = JobManager(settings.jobs_dir, runtime, metrics=metrics, keep=settings.jobs_keep, leases=leases)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        leases.start()
        jobs.recover()
        loader = threading.Thread(target=runtime.load, name="vpr-load", daemon=True)
        loader.start()
        loop = asyncio.get_running_loop()
        if not settings.load_in_background:
            await loop.run_in_executor(None, loader.join)
        follower.start()  # skips its rounds while the start-up load runs
        try:
            yield
        finally:
            await loop.run_in_executor(None, follower.stop)
            await loop.run_in_executor(None, jobs.shutdown)
            await loop.run_in_executor(None, leases.stop)
            # Let a load in progress finish: a thread killed inside torch at
            # interpreter exit aborts the process.
            await loop.run_in_executor(None, loader.join, 60.0)
            batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Visual place recognition", version=API_VERSION, lifespan=lifespan, description=DESCRIPTION)
    state = app.state
    state.settings, state.metrics, state.batcher, state.runtime, state.jobs = settings, metrics, batcher, runtime, jobs
    state.leases, state.follower, state.replica = leases, follower, owner.replica
    state.service = QueryService(settings, runtime, batcher, pool, metrics)
    state.streams = OpenStreams(metrics)

    limits = {"/v1/query": settings.max_body_bytes, "/v1/query/batch": settings.max_batch_body_bytes}
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: limits.get(path, settings.max_admin_body_bytes),
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(ReplicaHeader, name=owner.replica)
    install_error_handlers(app)

    for router in (health.router, query.router, stream.router, web.router):
        app.include_router(router)
    app.mount("/static", web.static_files(), name="static")
    if token is not None:
        state.admin_token = admin.AdminToken(token)
        app.include_router(admin.router)
    else:
        log.info("admin routes are off (set VPR_ADMIN_TOKEN or VPR_ADMIN_TOKEN_FILE to enable them)")
    _document_limits(app, settings)
    return app


def _document_limits(app: FastAPI, settings: ServerSettings) -> None:
    """Show this server's query limits in its OpenAPI schema (they are settings,
    so the module-level routes cannot declare them)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # also cached by FastAPI: edited in place
        query.document_top_k(schema, settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """How uvicorn runs the app (`serve`, and the harness of tests and benchmarks)."""
    return {
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "ws_max_size": settings.stream_max_message_bytes + 4096,  # the largest frame and its framing
        "timeout_graceful_shutdown": 15,
        # Slow clients: a deadline on each request head (uvicorn has none), idle
        # keep-alive connections closed, and a cap on open connections (503 beyond);
        # BodyLimitMiddleware puts the deadline on bodies.
        "http": header_deadline_protocol(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
    }


def serve(settings: ServerSettings) -> int:
    """Run the app under uvicorn until interrupted (what `vpr serve` calls)."""
    import uvicorn

    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("serving on http://%s:%d (docs at /docs, readiness at /readyz)", host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    return 0
