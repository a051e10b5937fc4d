"""The FastAPI application: `create_app(settings)` and `serve(settings)`.

Routes: POST /v1/query, POST /v1/query/batch, WS /v1/stream, GET /healthz,
/readyz, /metrics, admin routes under /v1/admin (only with a token), and the
OpenAPI docs at /docs. The event loop never decodes or runs the model:
decoding goes to a thread pool, the forward pass and the search to the
micro-batcher's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vpr.model.preprocess import ImageDecodeError, ImageTooLarge
from vpr.server.admin import admin_router
from vpr.server.batcher import Answer, BatcherStopped, QueueFull
from vpr.server.inputs import ACCEPTED_TYPES, ApiError, BodyLimitMiddleware, check_media, media_type
from vpr.server.jobs import JobManager
from vpr.server.metrics import Metrics, MetricsMiddleware
from vpr.server.results import BatchResponse, ErrorResponse, QueryResponse, Readiness, answer_json, rounded
from vpr.server.runtime import NotReady, Runtime, Serving
from vpr.server.stream import StreamSession
from vpr.settings import ServerSettings

try:  # the web page (issue 7) lives in its own module
    from vpr.server.web import install_web
except ModuleNotFoundError as e:  # pragma: no cover - only while it is being written
    if e.name != f"{__package__}.web":
        raise
    install_web = None

log = logging.getLogger(__name__)

API_VERSION = "1"
IMAGE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "one image: the raw bytes with its content type, or a multipart form with one file",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "several images as files of one multipart form (any field names)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}
DESCRIPTION = """Top-k places for a (low-quality) query image or a live video stream.

**Errors** are JSON `{"error": code, "detail": message}` with a 4xx/5xx status.

**Streaming** (`WS /v1/stream`, not listed below): send a JSON text hello
`{"codec": "jpeg" | "h264", "top_k": 5, "fps": 30}`, then binary messages (one
JPEG each, or an H.264 Annex-B byte stream cut anywhere), optionally
`{"type": "end"}`. The server answers `ready`, then one `result` per processed
frame (`frame`, `pts`, `time_s`, `results`, `latency_ms`, `timings_ms`,
`received`, `processed`, `dropped`), `warning` for an undecodable frame, and
`end` or `error` (then it closes: 1000 normal, 1003 bad message, 1007 bad
stream, 1008 bad hello, 1009 too big, 1011 internal, 1013 not ready / busy).
While the model is busy only the newest frame is kept.

**Admin** routes need `Authorization: Bearer <token>` or `X-API-Key: <token>`
and exist only when the server has a token (VPR_ADMIN_TOKEN / VPR_ADMIN_TOKEN_FILE).
"""
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "corrupt or truncated image, malformed multipart",
        413: "body or image too large",
        415: "unsupported media type",
        422: "bad parameter (e.g. top_k)",
        503: "not ready, or overloaded (see Retry-After)",
        504: "the model did not answer in time",
    }.items()
}


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    token = settings.resolved_admin_token()
    metrics = Metrics()
    runtime = Runtime(settings, metrics)
    jobs = JobManager(settings.jobs_dir, runtime, keep=settings.jobs_keep)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        jobs.recover()
        loader = threading.Thread(target=runtime.load, name="vpr-load", daemon=True)
        loader.start()
        if not settings.load_in_background:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, jobs.shutdown)
            # Let a load in progress finish: a thread killed inside torch at
            # interpreter exit aborts the process.
            await asyncio.get_running_loop().run_in_executor(None, loader.join, 60.0)
            runtime.close()

    app = FastAPI(title="Visual place recognition", version=API_VERSION, lifespan=lifespan, description=DESCRIPTION)
    app.state.settings, app.state.runtime, app.state.jobs, app.state.metrics = settings, runtime, jobs, metrics
    limits = {"/v1/query": settings.max_body_bytes, "/v1/query/batch": settings.max_batch_body_bytes}
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: limits.get(path, settings.max_admin_body_bytes))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)

    def top_k_param() -> Any:
        return Query(
            settings.top_k_default,
            ge=1,
            le=settings.top_k_max,
            description=f"matches to return (1..{settings.top_k_max})",
        )

    # ---- probes -----------------------------------------------------------------
    @app.get("/healthz", tags=["probes"], summary="Liveness: the process answers")
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["probes"],
        response_model=Readiness,
        summary="Readiness: model and index loaded",
        responses={503: {"model": Readiness}},
    )
    def readyz() -> JSONResponse:
        cur, st = runtime.current, runtime.status
        body = Readiness(
            ready=cur is not None,
            state="ready" if cur is not None else st.state,
            reason=None if cur is not None else st.reason,
            model=cur.model_spec if cur else None,
            index=cur.index_spec if cur else None,
            index_size=cur.index.count if cur else None,
            device=str(runtime.device),
        )
        headers = {} if cur is not None else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body.model_dump(), status_code=200 if cur is not None else 503, headers=headers)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics")
    def metrics_route() -> Response:
        metrics.queue_depth.set(runtime.batcher.depth)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    # ---- queries -----------------------------------------------------------------
    @app.post(
        "/v1/query",
        tags=["query"],
        response_model=QueryResponse,
        responses=ERRORS,
        openapi_extra=IMAGE_BODY_DOC,
        summary="Top-k places for one image",
    )
    async def query(request: Request, top_k: int = top_k_param()) -> dict[str, Any]:
        t0 = time.perf_counter()
        with _lease(runtime) as serving:
            data, declared, name = await _one_image(request, settings)
            x, decode_ms = await _prepare(runtime, serving, data, declared, name)
            answer = await _embed(runtime, serving, x, top_k)
        total = (time.perf_counter() - t0) * 1000
        return {
            **answer_json(answer.hits, serving),
            "top_k": top_k,
            "batch_size": answer.batch_size,
            "timings_ms": _timings(decode_ms, answer, total),
        }

    @app.post(
        "/v1/query/batch",
        tags=["query"],
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY_DOC,
        summary="Top-k places for several images in one request",
    )
    async def query_batch(request: Request, top_k: int = top_k_param()) -> dict[str, Any]:
        t0 = time.perf_counter()
        with _lease(runtime) as serving:
            files = await _all_files(request, settings)
            prepared = await asyncio.gather(*(_prepare(runtime, serving, d, t, n) for d, t, n in files))
            answers = await _embed_many(runtime, serving, [x for x, _ in prepared], top_k)
        total = (time.perf_counter() - t0) * 1000
        items = [
            {"file": name, "results": answer_json(a.hits, serving)["results"], "timings_ms": _timings(dec, a, total)}
            for (_, _, name), (_, dec), a in zip(files, prepared, answers)
        ]
        return {
            "items": items,
            "model": serving.model_spec,
            "index": serving.index_spec,
            "top_k": top_k,
            "timings_ms": rounded({"total": total}),
        }

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        """Place recognition on a live stream (protocol: server/stream.py)."""
        await StreamSession(ws, runtime).run()

    if install_web is not None:
        install_web(app, runtime)
    if token is not None:
        app.include_router(admin_router(runtime, jobs, token))
    else:
        log.info("admin routes are off (set VPR_ADMIN_TOKEN or VPR_ADMIN_TOKEN_FILE to enable them)")
    return app


# ---- request helpers -----------------------------------------------------------------
@contextlib.contextmanager
def _lease(runtime: Runtime):
    """The served pair for one request, or 503 when there is none."""
    with contextlib.ExitStack() as stack:
        try:
            serving = stack.enter_context(runtime.lease())
        except NotReady as e:
            raise ApiError(
                503, "not_ready", str(e), headers={"Retry-After": str(runtime.settings.retry_after_s)}
            ) from None
        yield serving


async def _one_image(request: Request, settings: ServerSettings) -> tuple[bytes, str | None, str]:
    """The image of a single query: raw body, or the one file of a multipart form."""
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        files = await _form_files(request, settings)
        if len(files) != 1:
            raise ApiError(
                400,
                "bad_request",
                f"the multipart form has {len(files)} files; /v1/query takes "
                "exactly one (use /v1/query/batch for several)",
            )
        return files[0]
    if kind not in ACCEPTED_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {kind or 'missing'!r} is not supported; send "
            f"the image as {', '.join(ACCEPTED_TYPES)} or as a file in multipart/form-data",
        )
    data = await request.body()
    if not data:
        raise ApiError(400, "empty_body", "the request body is empty; send the image bytes")
    return data, kind, "body"


async def _all_files(request: Request, settings: ServerSettings) -> list[tuple[bytes, str | None, str]]:
    kind = media_type(request.headers.get("content-type"))
    if kind != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {kind or 'missing'!r}: /v1/query/batch takes multipart/form-data with one file per image",
        )
    files = await _form_files(request, settings)
    if not files:
        raise ApiError(400, "bad_request", "the multipart form has no files")
    return files


async def _form_files(request: Request, settings: ServerSettings) -> list[tuple[bytes, str | None, str]]:
    """(bytes, declared type, name) of each file part. The body limit applies
    while the form is parsed (BodyLimitMiddleware), so nothing big is buffered."""
    limit = settings.max_batch_files
    form = await request.form(max_files=limit, max_fields=limit)
    out = []
    try:
        for i, (field, value) in enumerate(form.multi_items()):
            if isinstance(value, UploadFile):
                name = f"{field}[{i}]:{value.filename or 'unnamed'}"
                data = await value.read()
                if not data:
                    raise ApiError(400, "empty_body", f"{name}: empty file")
                out.append((data, value.content_type, name))
    finally:
        await form.close()
    return out


async def _prepare(
    runtime: Runtime, serving: Serving, data: bytes, declared: str | None, name: str
) -> tuple[Any, float]:
    check_media(declared, data, name)
    try:
        return await asyncio.get_running_loop().run_in_executor(runtime.pool, runtime.prepare, data, serving, name)
    except ImageTooLarge as e:
        raise ApiError(413, "image_too_large", str(e)) from None
    except ImageDecodeError as e:
        if isinstance(e.__cause__, Image.DecompressionBombError):  # Pillow's own cap, above ours
            raise ApiError(413, "image_too_large", f"{name}: {e.__cause__}") from None
        raise ApiError(400, "bad_image", str(e)) from None


async def _embed(runtime: Runtime, serving: Serving, x: Any, k: int) -> Answer:
    return (await _embed_many(runtime, serving, [x], k))[0]


async def _embed_many(runtime: Runtime, serving: Serving, xs: list[Any], k: int) -> list[Answer]:
    """Queue all items (all or none), then wait with a deadline."""
    s = runtime.settings
    futures = []
    try:
        for x in xs:
            futures.append(runtime.batcher.submit(x, serving, k, source="http"))
    except QueueFull as e:
        for f in futures:
            f.cancel()
        raise ApiError(
            503, "overloaded", f"{e}; retry in {s.retry_after_s} s", headers={"Retry-After": str(s.retry_after_s)}
        ) from None
    except BatcherStopped as e:
        raise ApiError(503, "shutting_down", str(e), headers={"Retry-After": str(s.retry_after_s)}) from None
    waiting = [asyncio.wrap_future(f) for f in futures]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*waiting), s.query_timeout_s))
    except TimeoutError:
        for f in futures:
            f.cancel()
        raise ApiError(504, "timeout", f"no answer from the model within {s.query_timeout_s:g} s") from None
    except BatcherStopped as e:
        raise ApiError(503, "shutting_down", str(e), headers={"Retry-After": str(s.retry_after_s)}) from None


def _timings(decode_ms: float, a: Answer, total_ms: float) -> dict[str, float]:
    return rounded(
        {"decode": decode_ms, "queue": a.queue_ms, "embed": a.embed_ms, "search": a.search_ms, "total": total_ms}
    )


# ---- errors --------------------------------------------------------------------------------
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": code, "detail": message}` (422s add `errors`)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _CODES.get(exc.status_code, "error")
        return JSONResponse(
            {"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors
        )
        return JSONResponse({"error": "invalid_request", "detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it; the status shows in the metrics

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal", "detail": f"internal error ({type(exc).__name__})"}, status_code=500)


# ---- running ------------------------------------------------------------------------------------
def serve(settings: ServerSettings) -> int:
    """Run the app under uvicorn until interrupted (what `vpr serve` calls)."""
    import uvicorn

    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("serving on http://%s:%d (docs at /docs, readiness at /readyz)", host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.stream_max_message_bytes + 4096,
        timeout_graceful_shutdown=15,
        access_log=settings.access_log,
    )
    return 0
