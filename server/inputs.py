"""Untrusted input at the edge: body size limits and media types.

Every refusal is a typed error (server/errors.py) that HTTP answers as
`{"error": <code>, "detail": <message>}` with a 4xx status, so a client can
branch on `error` and show `detail`; the server itself keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpr.server.errors import BadImage, TooLarge, UnsupportedMedia

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


class BodyLimitMiddleware:
    """Enforce a per-route body limit on the bytes actually received (a lying or
    absent Content-Length does not help), and on the declared length as soon as
    the body is first read."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit, declared)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


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


def check_media(declared: str | None, data: bytes, source: str) -> None:
    """Refuse what is not a JPEG, PNG or WebP before decoding.

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
