"""Untrusted input at the edge: body size limits and media types.

Every refusal is a typed error (server/errors.py) that HTTP answers as
`{"error": <code>, "detail": <message>}` with a 4xx status, so a client can
branch on `error` and show `detail`; the server itself keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpr.server.errors import BadImage, RequestTimeout, TooLarge, UnsupportedMedia

# Accepted query image types -> the Pillow format name.
ACCEPTED_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
GENERIC_TYPES = ("application/octet-stream", "")


class BodyTooLarge(TooLarge, HTTPException):
    """Raised from inside `receive`. Also an HTTPException because FastAPI lets
    only those through unchanged while it parses a body (anything else becomes
    a 400), so this surfaces as a 413 wherever the body happens to be read
    (raw body, multipart, JSON)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        what = f"declared {declared} bytes" if declared is not None else "body"
        TooLarge.__init__(self, f"request {what} exceeds the limit of {limit} bytes", code="body_too_large")
        self.status_code, self.headers = 413, None


class BodyTimeout(RequestTimeout, HTTPException):
    """Raised from inside `receive` when the body is late (an HTTPException for
    the reason given in `BodyTooLarge`): 408, and the connection is closed."""

    def __init__(self, timeout_s: float, received: int) -> None:
        detail = f"the request body did not arrive within {timeout_s:g} s ({received} bytes received)"
        RequestTimeout.__init__(self, detail, code="body_timeout")
        self.status_code, self.headers = 408, None


class BodyLimitMiddleware:
    """Enforce a per-route body limit on the bytes actually received (a lying or
    absent Content-Length does not help), and on the declared length as soon as
    the body is first read.

    With `timeout_s`, the whole body must have arrived that long after the
    request's head (uvicorn has no such deadline, and a client trickling its
    body would hold the connection and the request's resources for ever): a
    late body is a 408 and the connection is closed after it. Once the body is
    complete, `receive` is passed through unbounded (a response may wait on it
    for the client's disconnect)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], timeout_s: float | None = None) -> None:
        self.app, self.limit_for, self.timeout_s = app, limit_for, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        timeout_s = self.timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        received, complete, late = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, complete, late
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit, declared)
            if complete or deadline is None or timeout_s is None:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                late = True
                raise BodyTimeout(timeout_s, received) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            else:  # http.disconnect
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if late and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def media_type(header: str | None) -> str:
    """`image/JPEG; charset=x` -> `image/jpeg` (aliases folded)."""
    base = (header or "").split(";", 1)[0].strip().lower()
    return ALIASES.get(base, base)


def sniff(data: bytes) -> str | None:
    """The media type the leading bytes announce, for the formats we meet."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "image/avif"
    return None


def check_media(declared: str | None, data: bytes, source: str) -> str:
    """Refuse what is not a JPEG, PNG or WebP before decoding; the Pillow
    format to decode it with (its signature's, whatever the header said).

    The declared type must be one we accept (or generic, for multipart parts
    sent as octet-stream); bytes that are clearly another image format are
    refused too, so Pillow's other decoders are never reached from outside.
    Bytes without the signature of an accepted format are refused as a bad
    image here, not handed to Pillow: it would try every decoder it has, and
    some formats have no signature at all (a TGA header decodes from 18 bytes).
    """
    kind = media_type(declared)
    accepted = ", ".join(ACCEPTED_TYPES)
    if kind not in ACCEPTED_TYPES and kind not in GENERIC_TYPES:
        raise UnsupportedMedia(f"{source}: content type {kind or 'missing'!r} is not supported; send one of {accepted}")
    actual = sniff(data)
    if actual is not None and actual not in ACCEPTED_TYPES:
        raise UnsupportedMedia(f"{source}: the data is {actual}, which is not supported; send one of {accepted}")
    if actual is None:
        raise BadImage(f"{source}: not a decodable image (the data does not start like a JPEG, PNG or WebP file)")
    return ACCEPTED_TYPES[actual]
