"""`POST /v1/query` and `POST /v1/query/batch`: read the image(s) of an HTTP
request, then hand them to the query service (server/service.py)."""

from __future__ import annotations

import time
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile

from vpr.server.deps import ServiceDep, SettingsDep
from vpr.server.errors import BadRequest, UnsupportedMedia
from vpr.server.inputs import ACCEPTED_TYPES, media_type
from vpr.server.results import BatchResponse, ErrorResponse, QueryResponse
from vpr.server.service import Upload
from vpr.server.sessions import SESSION_HEADER, check_session
from vpr.settings import ServerSettings

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
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "top_k": {"type": "integer", "description": "instead of the query parameter"},
                    },
                }
            },
        },
    }
}
BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "several images as files of one multipart form (any field names); each "
        "is answered on its own: a bad image gets an `error` in its item, the others their results",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "description": "instead of the query parameter"},
                    },
                }
            }
        },
    }
}
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
QUERY_PATHS = ("/v1/query", "/v1/query/batch")

router = APIRouter(tags=["query"])


def top_k_param(
    settings: SettingsDep, top_k: Annotated[int | None, Query(ge=1, description="matches to return")] = None
) -> int:
    """The `top_k` of a query: the server's default when absent, refused above
    its maximum. Checked here rather than in the signature because both are
    settings; `document_top_k` shows them in the OpenAPI schema. A multipart
    form may carry it as a field instead (`form_top_k`)."""
    if top_k is None:
        return settings.top_k_default
    return checked_top_k(top_k, settings, ("query", "top_k"))


def checked_top_k(value: int | str, settings: ServerSettings, loc: tuple[str, str]) -> int:
    """`value` as a top_k in 1..top_k_max, or the 422 a bad query parameter gets."""
    try:
        top_k = int(value)
    except ValueError:
        _invalid(loc, "int_parsing", "Input should be a valid integer, unable to parse string as an integer", value)
    if top_k < 1:
        _invalid(loc, "greater_than_equal", "Input should be greater than or equal to 1", value)
    if top_k > settings.top_k_max:
        _invalid(loc, "less_than_equal", f"Input should be less than or equal to {settings.top_k_max}", value)
    return top_k


def _invalid(loc: tuple[str, str], kind: str, msg: str, value: object) -> NoReturn:
    raise RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


TopK = Annotated[int, Depends(top_k_param)]


def document_top_k(schema: dict[str, Any], settings: ServerSettings) -> None:
    """Write the server's own `top_k` default and range into an OpenAPI schema."""
    text = f"matches to return (1..{settings.top_k_max})"
    for path in QUERY_PATHS:
        for param in schema["paths"][path]["post"].get("parameters", []):
            if param["name"] == "top_k":
                param["description"] = text
                param["schema"] = {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": settings.top_k_max,
                    "default": settings.top_k_default,
                    "title": "Top K",
                    "description": text,
                }


SessionHeader = Annotated[
    str | None,
    Header(
        alias=SESSION_HEADER,
        description="names a session of frames sent one request at a time (1 to 128 of `A-Za-z0-9._~-`): "
        "the answer then carries `track`, the place a causal tracker of this session's frames gives "
        "(sessions are forgotten after VPR_TRACK_SESSION_IDLE_S idle, at most VPR_TRACK_MAX_SESSIONS)",
    ),
]
TrackParam = Annotated[
    bool, Query(description="false: a frame-only answer (no `track`, the session's tracker is not updated)")
]


@router.post(
    "/v1/query",
    response_model=QueryResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY_DOC,
    summary="Top-k places for one image (with X-VPR-Session: and the session's tracked place)",
)
async def query(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    top_k: TopK,
    session: SessionHeader = None,
    track: TrackParam = True,
) -> dict[str, Any]:
    started = time.perf_counter()
    tracking = session is not None and track and settings.track.enabled
    if session is not None:
        check_session(session)
    with service.lease() as serving:
        upload, top_k = await one_image(request, settings, top_k)
        tracker = service.sessions.get(session) if tracking and session is not None else None
        return await service.query(serving, upload, top_k, started, tracker)


@router.post(
    "/v1/query/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY_DOC,
    summary="Top-k places for several images in one request",
)
async def query_batch(request: Request, service: ServiceDep, settings: SettingsDep, top_k: TopK) -> dict[str, Any]:
    started = time.perf_counter()
    with service.lease() as serving:
        uploads, top_k = await all_files(request, settings, top_k)
        return await service.query_batch(serving, uploads, top_k, started)


# ---- reading the request ------------------------------------------------------------------
async def one_image(request: Request, settings: ServerSettings, top_k: int) -> tuple[Upload, int]:
    """The image of a single query (raw body, or the one file of a multipart
    form) and its top_k (a form may carry it as a field)."""
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        files, top_k = await read_form(request, settings, top_k)
        if len(files) != 1:
            raise BadRequest(
                f"the multipart form has {len(files)} files; /v1/query takes "
                "exactly one (use /v1/query/batch for several)"
            )
        return files[0], top_k
    if kind not in ACCEPTED_TYPES:
        raise UnsupportedMedia(
            f"content type {kind or 'missing'!r} is not supported; send "
            f"the image as {', '.join(ACCEPTED_TYPES)} or as a file in multipart/form-data"
        )
    data = await request.body()
    if not data:
        raise BadRequest("the request body is empty; send the image bytes", code="empty_body")
    return Upload(data, kind, "body"), top_k


async def all_files(request: Request, settings: ServerSettings, top_k: int) -> tuple[list[Upload], int]:
    kind = media_type(request.headers.get("content-type"))
    if kind != "multipart/form-data":
        raise UnsupportedMedia(
            f"content type {kind or 'missing'!r}: /v1/query/batch takes multipart/form-data with one file per image"
        )
    files, top_k = await read_form(request, settings, top_k)
    if not files:
        raise BadRequest("the multipart form has no files")
    return files, top_k


async def read_form(request: Request, settings: ServerSettings, top_k: int) -> tuple[list[Upload], int]:
    """Each file part of a multipart form, and the top_k of the query: a
    `top_k` text field counts like the query parameter (both: they must agree).
    Any other text field is refused rather than ignored. The body limit
    applies while the form is parsed (BodyLimitMiddleware), so nothing big is
    buffered."""
    limit = settings.max_batch_files
    form = await request.form(max_files=limit, max_fields=limit)
    out = []
    try:
        for i, (field, value) in enumerate(form.multi_items()):
            if isinstance(value, UploadFile):
                name = f"{field}[{i}]:{value.filename or 'unnamed'}"
                data = await value.read()
                if not data:
                    raise BadRequest(f"{name}: empty file", code="empty_body")
                out.append(Upload(data, value.content_type, name))
            elif field == "top_k":
                top_k = form_top_k(request, settings, value, top_k)
            else:
                raise BadRequest(f"unknown form field {field!r}: the form takes image files and an optional top_k")
    finally:
        await form.close()
    return out, top_k


def form_top_k(request: Request, settings: ServerSettings, value: str, top_k: int) -> int:
    """A `top_k` form field, checked like the query parameter."""
    from_form = checked_top_k(value.strip(), settings, ("form", "top_k"))
    if "top_k" in request.query_params and from_form != top_k:
        _invalid(("form", "top_k"), "conflict", f"top_k is {top_k} in the query but {from_form} in the form", value)
    return from_form
