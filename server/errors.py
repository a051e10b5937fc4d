"""The server's typed errors, and how HTTP answers them.

Errors are raised where they happen (the runtime, the query service, input
checks, the admin routes) and say *what* went wrong, not how to answer it:
each carries a stable machine `code` and a human `detail`. Every transport
maps the type to its own answer:

- HTTP: `install_error_handlers` turns each into `{"error": code, "detail":
  detail}` with the status of `HTTP_STATUS` (503s add Retry-After, 401s
  WWW-Authenticate);
- the websocket (server/stream.py): a warning, a dropped frame, or a close
  code, per type.

The types are few and broad; a finer `code` tells clients apart what the
status does not (413 `body_too_large` vs `image_too_large`, 409
`incompatible` vs `not_ready`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses or cannot complete; `code` is stable, `detail` is for humans."""

    default_code = "error"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code


class BadRequest(ApiError):
    """Malformed input (an empty body, a form with the wrong number of files)."""

    default_code = "bad_request"


class BadImage(BadRequest):
    """Bytes that are not a decodable image of an accepted format."""

    default_code = "bad_image"


class Unauthorized(ApiError):
    """A missing or wrong admin token."""

    default_code = "unauthorized"


class Forbidden(ApiError):
    """Allowed to ask, not allowed to have (a folder outside the data roots)."""

    default_code = "forbidden"


class NotFound(ApiError):
    default_code = "not_found"


class Conflict(ApiError):
    """Valid, but not possible in the present state (an incompatible pair, nothing served)."""

    default_code = "conflict"


class TooLarge(ApiError):
    """A body, an image or a frame over its limit."""

    default_code = "too_large"


class UnsupportedMedia(ApiError):
    """A content type or image format the server does not decode."""

    default_code = "unsupported_media_type"


class InvalidRequest(ApiError):
    """A well-formed request with a bad value (an unknown name, a malformed spec)."""

    default_code = "invalid_request"


class Unavailable(ApiError):
    """Temporarily unable to answer: the client should retry later."""

    default_code = "unavailable"


class NotReady(Unavailable):
    """Nothing (or nothing consistent) is loaded; the detail says why."""

    default_code = "not_ready"


class Overloaded(Unavailable):
    """The model queue is full."""

    default_code = "overloaded"


class ShuttingDown(Unavailable):
    default_code = "shutting_down"


class RequestTimeout(ApiError):
    """The client did not send its whole request in time (a stalled or trickling upload)."""

    default_code = "request_timeout"


class QueryTimeout(ApiError):
    """The model did not answer within the query timeout."""

    default_code = "timeout"


# ---- HTTP ----------------------------------------------------------------------------------
HTTP_STATUS: dict[type[ApiError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    Conflict: 409,
    TooLarge: 413,
    UnsupportedMedia: 415,
    InvalidRequest: 422,
    Unavailable: 503,
    QueryTimeout: 504,
}
# Codes of errors raised by the framework itself (unknown path, bad method, multipart parser).
FRAMEWORK_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}
ADMIN_REALM = 'Bearer realm="vpr-admin"'


def http_status(error: ApiError) -> int:
    """The status of the most specific mapped type (500 for none)."""
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 500


def http_headers(error: ApiError, retry_after_s: int) -> dict[str, str]:
    if isinstance(error, Unavailable):
        return {"Retry-After": str(retry_after_s)}
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": ADMIN_REALM}
    return {}


def install_error_handlers(app: FastAPI) -> None:
    """Every HTTP error is `{"error": code, "detail": message}` (422s add `errors`)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = http_headers(exc, request.app.state.settings.retry_after_s)
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=http_status(exc), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = FRAMEWORK_CODES.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

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
