"""Fuzzing the live server over real loopback sockets (uvicorn in a thread).

Each kind of bad input is tried many times (hypothesis, derandomized so a
failure reproduces): truncated, mutated and random-byte images of every
accepted type, decompression bombs, bodies over the limit (truthful, lying
and absent Content-Length, chunked), wrong content types, malformed
multipart, garbage and truncated H.264 streams, websockets dropped in the
middle of a frame, admin requests with wrong tokens. Every answer must be
the documented 4xx (or websocket close code); afterwards the server still
answers a normal query exactly as before and its memory has not grown
beyond a bound (see `test_still_correct_and_memory_bounded`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.server.live_support import (
    abort,
    chunked,
    peak_rss_bytes,
    raw_request,
    reset_peak_rss,
    rss_bytes,
    ws_connect_raw,
    ws_frame,
    ws_messages_until_close,
    ws_read_frame,
)
from tests.server.support import Home, build_home, encode_h264, frames_of
from vpr.server.app import create_app
from vpr.server.harness import ThreadServer
from vpr.server.inputs import BodyLimitMiddleware, BodyTooLarge
from vpr.settings import ServerSettings

# fuzzing the server takes the longest of the server tests: `make test` runs it, `make test-fast` does not
pytestmark = pytest.mark.slow

TOKEN = "reliability-admin-token-0123456789abcdef"
KB = 1024
LIMIT = 256 * KB  # max_body_bytes of the served app
BATCH_LIMIT = 512 * KB  # max_batch_body_bytes
MAX_PIXELS = 100_000
PROBE = 64 * KB  # stream_probe_bytes: an H.264 stream with no frame in this many bytes is refused
WS_MAX = 128 * KB  # stream_max_message_bytes
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Trailing bytes after the last pixel data (JPEG EOI, PNG IDAT CRC + IEND...):
# an image cut only there still decodes whole, which is a correct answer.
TRAILER = 32
# Leading bytes of formats that are not accepted (they answer 415, not 400).
OTHER_MAGIC = (b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

FUZZ = settings(
    deadline=None, derandomize=True, database=None, max_examples=100, suppress_health_check=list(HealthCheck)
)


@dataclass(repr=False)
class Live:
    h: Home
    srv: ThreadServer
    http: httpx.Client
    app: object
    encoded: dict[tuple[str, int], bytes]
    h264: bytes  # 16 frames: frame f shows place f // 2
    baseline: dict  # the normal query's answer before any fuzzing
    bombs: list[tuple[bytes, str]] = field(default_factory=list)  # real bombs, a few KB each
    rss_warm: int = 0

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"Live({self.srv.url})"

    @property
    def port(self) -> int:
        return self.srv.port

    def gauge(self, name: str) -> float:
        return self.app.state.metrics.registry.get_sample_value(name) or 0.0


def encode(path: Path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    h = build_home(tmp_path_factory.mktemp("fuzz"))
    settings_ = ServerSettings(
        home=h.home,
        model="student",
        device="cpu",
        admin_token=TOKEN,
        decode_threads=2,
        max_body_bytes=LIMIT,
        max_batch_body_bytes=BATCH_LIMIT,
        max_batch_files=4,
        max_pixels=MAX_PIXELS,
        stream_probe_bytes=PROBE,
        stream_max_message_bytes=WS_MAX,
        stream_max_bad_frames=2,
        stream_hello_timeout_s=5,
        access_log=False,
    )
    app = create_app(settings_)
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        encoded = {(fmt, i): encode(p, fmt) for fmt in FORMATS for i, p in enumerate(h.images)}
        live = Live(h, srv, http, app, encoded, encode_h264(frames_of(h.images, repeat=2), fps=10), {})
        live.bombs = [(real_bomb(fmt, side), ctype) for fmt, ctype in FORMATS.items() for side in (1000, 3000)]
        live.baseline = normal_query(live)
        assert live.baseline["results"][0]["id"] == 3
        churn(live, rounds=1)  # warm-up: thread pools, allocator arenas, codec tables
        live.rss_warm = settled_rss()
        yield live


# ---- helpers -------------------------------------------------------------------------------------
def settled_rss() -> int:
    """RSS once freed memory is handed back (gc, then glibc's malloc_trim), so
    that what is measured is memory in use, not what the allocator keeps cached."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: plain RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def normal_query(live: Live) -> dict:
    r = live.http.post("/v1/query", content=live.h.images[3].read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.json()


def assert_still_serving(live: Live) -> None:
    body = normal_query(live)
    assert [m["id"] for m in body["results"]] == [m["id"] for m in live.baseline["results"]]
    assert body["results"][0]["score"] == pytest.approx(live.baseline["results"][0]["score"], abs=1e-5)
    assert (body["model"], body["index"]) == (live.baseline["model"], live.baseline["index"])


def post_image(live: Live, data: bytes, ctype: str, multipart: bool) -> httpx.Response:
    if multipart:
        return live.http.post("/v1/query", files={"file": ("fuzz", data, ctype)})
    return live.http.post("/v1/query", content=data, headers={"content-type": ctype})


def assert_error(r: httpx.Response, status: int, code: str | tuple[str, ...]) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert body["error"] in ((code,) if isinstance(code, str) else code), body
    assert isinstance(body["detail"], str) and body["detail"]


@contextlib.contextmanager
def stream_hello(live: Live, codec: str):
    """A websocket stream past its hello (the server answered `ready`)."""
    with connect(f"{live.srv.ws_url}/v1/stream", max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps({"codec": codec, "top_k": 1}))
        ready = json.loads(ws.recv(30))
        assert ready["type"] == "ready", ready
        yield ws


def send_until_closed(ws, pieces) -> None:
    """Send what the client has; the server may close the stream midway."""
    for p in pieces:
        try:
            ws.send(p)
        except ConnectionClosed:
            return


def wait_streams_closed(live: Live, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while live.gauge("vpr_stream_connections") != 0:
        assert time.monotonic() < deadline, "a dropped websocket was never cleaned up"
        time.sleep(0.02)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge canvas (a bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims another size."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def real_bomb(fmt: str, side: int) -> bytes:
    """A real image of side x side uniform pixels: a few KB that decode to megabytes."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


# ---- images ----------------------------------------------------------------------------------------
@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), i=st.integers(0, 7), multipart=st.booleans(), data=st.data())
def test_truncated_images(live, fmt, i, multipart, data):
    full = live.encoded[(fmt, i)]
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    r = post_image(live, full[:cut], FORMATS[fmt], multipart)
    if cut == 0:
        assert_error(r, 400, "empty_body")
    elif cut >= len(full) - TRAILER and r.status_code == 200:
        assert r.json()["results"][0]["id"] == i  # only the trailer was lost: the whole picture is there
    else:
        assert_error(r, 400, "bad_image")


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x10\x00\x00\x00WEBPVP8 "]),
    rest=st.binary(min_size=0, max_size=4096),
    ctype=st.sampled_from(sorted(FORMATS.values())),
    multipart=st.booleans(),
)
def test_random_bytes(live, prefix, rest, ctype, multipart):
    data = prefix + rest
    if not data or data.startswith(OTHER_MAGIC):
        return  # empty bodies and other formats have their own tests
    r = post_image(live, data, ctype, multipart)
    if prefix == b"":
        assert_error(r, 400, "bad_image")  # not even the signature of an accepted type
    elif r.status_code == 413:  # a random frame header may declare a huge size: refused before decoding
        assert_error(r, 413, "image_too_large")
    else:
        assert_error(r, 400, "bad_image")


def _tga(width: int = 4, height: int = 4) -> bytes:
    """An uncompressed TGA: a format with no signature, that Pillow would decode."""
    header = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, width, height, 24, 0)
    return header + bytes(range(256))[: 3 * width * height]


def test_formats_without_a_signature_never_reach_the_decoder(live):
    """Bytes that are not JPEG, PNG or WebP are refused before decoding, even
    when some other decoder would accept them (a TGA has no magic bytes)."""
    Image.open(io.BytesIO(_tga())).load()  # it is a valid image...
    for ctype in FORMATS.values():
        for multipart in (False, True):
            assert_error(post_image(live, _tga(), ctype, multipart), 400, "bad_image")  # ...but not an accepted one
    with stream_hello(live, "jpeg") as ws:
        ws.send(_tga())
        msg = json.loads(ws.recv(30))
        assert msg["type"] == "warning" and msg["error"] == "bad_frame" and "not JPEG" in msg["detail"], msg


@FUZZ
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    i=st.integers(0, 7),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_images(live, fmt, i, flips):
    data = bytearray(live.encoded[(fmt, i)])
    for pos, value in flips:
        data[pos % len(data)] = value
    r = post_image(live, bytes(data), FORMATS[fmt], multipart=False)
    # damaged pixels may still decode (an answer), else the documented refusals; never a 5xx
    if r.status_code == 200:
        body = r.json()
        assert len(body["results"]) == 5 and body["model"] == live.baseline["model"]
    elif r.status_code == 413:
        assert_error(r, 413, "image_too_large")
    elif bytes(data).startswith(OTHER_MAGIC):  # the flips wrote another format's signature
        assert_error(r, 415, "unsupported_media_type")
    else:
        assert_error(r, 400, "bad_image")


@FUZZ
@given(kind=st.sampled_from(["png", "jpeg"]), multipart=st.booleans(), data=st.data())
def test_decompression_bomb_headers(live, kind, multipart, data):
    """Headers declaring more than the pixel limit (PNG up to 2^31-1 a side,
    JPEG up to 65535): 413 before any pixel is decoded."""
    top = 2**31 - 1 if kind == "png" else 65535
    width = data.draw(st.integers(1, top), label="width")
    height = data.draw(st.integers(1, top), label="height")
    if width * height <= MAX_PIXELS:
        width = max(width, 2000)
        height = MAX_PIXELS // width + 1
    if kind == "png":
        body, ctype = png_header_only(width, height), "image/png"
    else:
        body, ctype = jpeg_with_size(live.encoded[("JPEG", 0)], width, height), "image/jpeg"
    r = post_image(live, body, ctype, multipart)
    assert_error(r, 413, "image_too_large")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_real_decompression_bombs(live, fmt):
    """Small files (a few KB) of up to 16 M pixels: refused from the header,
    never decoded (decoded, the largest is 48 MB of RGB: the peak RSS shows it)."""
    bombs = {side: real_bomb(fmt, side) for side in (400, 1000, 4000)}
    rises = []
    # The high-water mark is the whole test process's: an unrelated thread's burst (for example a fixture
    # of an earlier module winding down) can lift it once. A server that decodes the bombs
    # lifts it every time, so the bound must hold on one of three passes, not on all.
    for _ in range(3):
        base = settled_rss()
        can_watch_peak = reset_peak_rss()
        for side, data in bombs.items():
            assert len(data) < LIMIT  # the body limit does not catch them: the pixel limit must
            for multipart in (False, True):
                r = post_image(live, data, FORMATS[fmt], multipart)
                assert_error(r, 413, "image_too_large")
                assert f"{side}x{side}" in r.json()["detail"]
        if not can_watch_peak:
            break
        rises.append(peak_rss_bytes() - base)
        if rises[-1] < 32 * 1024 * 1024:
            break
    assert not rises or min(rises) < 32 * 1024 * 1024, f"peak RSS rose by {rises} bytes"
    assert_still_serving(live)


# ---- bodies over the limit ---------------------------------------------------------------------------
def _head(path: str, ctype: str, extra: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{extra}".rstrip("\r\n")


@FUZZ
@given(
    mode=st.sampled_from(["truthful", "overstated", "understated", "chunked", "multipart", "batch"]),
    over=st.integers(1, 3 * LIMIT),
    piece=st.integers(1 * KB, 64 * KB),
)
def test_huge_bodies(live, mode, over, piece):
    body = b"\xff\xd8\xff" + bytes(LIMIT + over - 3)
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)]
    if mode in ("multipart", "batch"):
        req = httpx.Request("POST", "http://x/", files={"file": ("big.jpg", body + bytes(BATCH_LIMIT), "image/jpeg")})
        data = req.read()
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        path = "/v1/query" if mode == "multipart" else "/v1/query/batch"
        responses, _ = raw_request(
            live.port, _head(path, req.headers["content-type"], f"Content-Length: {len(data)}"), pieces
        )
    elif mode == "truthful":
        responses, _ = raw_request(live.port, _head("/v1/query", "image/jpeg", f"Content-Length: {len(body)}"), pieces)
    elif mode == "overstated":  # declares more than it sends: refused on the declaration
        responses, _ = raw_request(
            live.port, _head("/v1/query", "image/jpeg", f"Content-Length: {LIMIT + over * 997}"), pieces[:1]
        )
    elif mode == "chunked":  # no Content-Length at all: counted as it arrives
        responses, _ = raw_request(
            live.port, _head("/v1/query", "image/jpeg", "Transfer-Encoding: chunked"), chunked(pieces)
        )
    else:  # understated: HTTP/1.1 framing ends the body at the declared length; the rest is garbage
        declared = min(over, LIMIT // 2)
        responses, closed = raw_request(
            live.port,
            _head("/v1/query", "image/jpeg", f"Content-Length: {declared}"),
            pieces,
            until_close=True,
            stop_early=False,
        )
        assert responses and all(r.status == 400 for r in responses), responses
        assert closed  # the server hangs up on a connection that sent garbage
        return
    assert len(responses) == 1, responses
    r = responses[0]
    assert r.status == 413 and r.json()["error"] == "body_too_large", (r.status, r.body[:200])
    assert str(BATCH_LIMIT if mode == "batch" else LIMIT) in r.json()["detail"]


@FUZZ
@given(
    declared=st.one_of(st.none(), st.integers(0, LIMIT)),
    sizes=st.lists(st.integers(0, 96 * KB), min_size=1, max_size=12),
)
def test_body_limit_counts_bytes_received(declared, sizes):
    """At the ASGI level (behind a proxy, or HTTP/2) nothing frames the body
    by its declared length: the limit applies to the bytes that arrive."""
    import asyncio

    seen = {"bytes": 0}

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            seen["bytes"] += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return

    messages = [
        {"type": "http.request", "body": bytes(n), "more_body": i < len(sizes) - 1} for i, n in enumerate(sizes)
    ]

    async def receive():
        return messages.pop(0)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "path": "/v1/query", "headers": headers}
    mw = BodyLimitMiddleware(app, limit_for=lambda path: LIMIT)
    total = sum(sizes)
    try:
        asyncio.run(mw(scope, receive, None))
        refused = False
    except BodyTooLarge as e:
        refused = True
        assert e.status_code == 413 and str(LIMIT) in e.detail
    assert refused == (total > LIMIT)
    assert seen["bytes"] <= LIMIT  # the app never saw more than the limit


# ---- content types and multipart ---------------------------------------------------------------------
ACCEPTED = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png", "image/webp"}


def _other_format(kind: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), "red").save(buf, format=kind)
    return buf.getvalue()


OTHER_FORMATS = {k: _other_format(k) for k in ("GIF", "BMP", "TIFF")}


@FUZZ
@given(
    ctype=st.one_of(
        st.sampled_from(
            [
                "text/plain",
                "application/json",
                "application/octet-stream",
                "image/gif",
                "image/bmp",
                "image/tiff",
                "image/avif",
                "video/mp4",
                "image",
                "*/*",
                "image/jpeg2000",
                "application/x-www-form-urlencoded",
            ]
        ),
        st.from_regex(r"[a-z]{1,10}/[a-z0-9.+-]{1,16}", fullmatch=True),
        st.from_regex(r"([!-~]([ -~]{0,38}[!-~])?)?", fullmatch=True),  # no edge spaces: HTTP strips them
    ),
    where=st.sampled_from(["raw", "part", "batch-raw", "batch-part"]),
)
def test_wrong_content_types(live, ctype, where):
    base = ctype.split(";", 1)[0].strip().lower()
    if (
        base in ACCEPTED
        or base.startswith("multipart/")
        or (where.endswith("part") and base in ("", "application/octet-stream"))
    ):
        return  # accepted (a part sent as octet-stream is sniffed)
    jpeg = live.encoded[("JPEG", 1)]
    path = "/v1/query" if not where.startswith("batch") else "/v1/query/batch"
    if where.endswith("part"):
        r = live.http.post(path, files={"file": ("x.jpg", jpeg, ctype)})
    else:
        r = live.http.post(path, content=jpeg, headers={"content-type": ctype} if ctype else {})
    if where == "batch-part":  # a batch answers per item: the part's own error
        assert r.status_code == 200 and r.json()["failed"] == 1, r.text[:300]
        (item,) = r.json()["items"]
        assert item["error"]["status"] == 415 and item["error"]["error"] == "unsupported_media_type"
        return
    assert_error(r, 415, "unsupported_media_type")


@pytest.mark.parametrize("kind", sorted(OTHER_FORMATS))
def test_other_image_formats_are_415_whatever_the_header_says(live, kind):
    for ctype in ("image/jpeg", "image/png", "image/webp"):
        for multipart in (False, True):
            assert_error(post_image(live, OTHER_FORMATS[kind], ctype, multipart), 415, "unsupported_media_type")
        assert_error(
            live.http.post("/v1/query", files={"f": ("x", OTHER_FORMATS[kind], "application/octet-stream")}),
            415,
            "unsupported_media_type",
        )


def _multipart(files: list[tuple[str, bytes, str]], boundary: str = "fuzzboundary1234") -> tuple[bytes, str]:
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="{n}"\r\n'
        f"Content-Type: {t}\r\n\r\n".encode()
        + d
        + b"\r\n"
        for i, (n, d, t) in enumerate(files)
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@FUZZ
@given(
    kind=st.sampled_from(
        ["truncated", "garbage", "no_boundary", "wrong_boundary", "bad_headers", "no_file", "two_files", "empty_file"]
    ),
    data=st.data(),
)
def test_malformed_multipart(live, kind, data):
    jpeg = live.encoded[("JPEG", 2)]
    body, ctype = _multipart([("q.jpg", jpeg, "image/jpeg")])
    expect = ("bad_request",)
    if kind == "truncated":
        cut = data.draw(st.integers(0, len(body) - 1), label="cut")
        r = live.http.post("/v1/query", content=body[:cut], headers={"content-type": ctype})
        if cut >= len(body) - 2 and r.status_code == 200:  # only the final CRLF is missing
            assert r.json()["results"][0]["id"] == 2
            return
        assert_error(r, 400, ("bad_request", "empty_body"))
        return
    if kind == "garbage":
        body = data.draw(st.binary(min_size=0, max_size=2048), label="garbage")
        body = data.draw(st.sampled_from([b"", b"--fuzzboundary1234\r\n"]), label="lead") + body
    elif kind == "no_boundary":
        ctype = "multipart/form-data"
    elif kind == "wrong_boundary":
        ctype = "multipart/form-data; boundary=" + data.draw(st.from_regex(r"[a-zA-Z0-9]{1,40}", fullmatch=True))
        if "fuzzboundary1234".startswith(ctype.split("=", 1)[1]):
            return
    elif kind == "bad_headers":
        junk = data.draw(st.binary(min_size=1, max_size=300).filter(lambda b: b"\r\n\r\n" not in b))
        body = b"--fuzzboundary1234\r\n" + junk + b"\r\n\r\n" + jpeg + b"\r\n--fuzzboundary1234--\r\n"
    elif kind == "no_file":
        body = (
            b'--fuzzboundary1234\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--fuzzboundary1234--\r\n'
        )
    elif kind == "two_files":
        body, ctype = _multipart([("a.jpg", jpeg, "image/jpeg"), ("b.jpg", jpeg, "image/jpeg")])
    else:
        body, ctype = _multipart([("e.jpg", b"", "image/jpeg")])
        expect = ("empty_body",)
    r = live.http.post("/v1/query", content=body, headers={"content-type": ctype})
    if kind in ("garbage", "bad_headers") and r.status_code in (415, 413):
        # the junk happened to parse as a part of another declared type / size
        assert_error(r, r.status_code, ("unsupported_media_type", "image_too_large"))
        return
    assert_error(r, 400, (*expect, "bad_image", "empty_body"))


# ---- websocket streams ----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=40)
@given(payload=st.binary(min_size=1, max_size=20_000), start_code=st.booleans(), piece=st.integers(1, 8192))
def test_garbage_h264_streams(live, payload, start_code, piece):
    if start_code:
        payload = b"\x00\x00\x00\x01" + payload
    with stream_hello(live, "h264") as ws:
        pieces = [payload[i : i + piece] for i in range(0, len(payload), piece)]
        send_until_closed(ws, pieces + [bytes(16 * KB)] * (PROBE // (16 * KB) + 2))  # then zeros past the probe
        msgs, code = ws_messages_until_close(ws)
    assert code == 1007, (code, msgs[-2:])
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"] == "bad_stream" and msgs[-1]["close_code"] == 1007
    assert not [m for m in msgs if m["type"] == "result"]


@settings(FUZZ, max_examples=30)
@given(frac=st.floats(0.0, 1.0), piece=st.integers(200, 6000), end=st.booleans())
def test_truncated_h264_streams(live, frac, piece, end):
    stream = live.h264[: int(len(live.h264) * frac)]
    with stream_hello(live, "h264") as ws:
        send_until_closed(ws, [stream[i : i + piece] for i in range(0, len(stream), piece)])
        if not end:  # the client just goes away
            ws.close()
            wait_streams_closed(live)
            return
        ws.send(json.dumps({"type": "end"}))
        msgs, code = ws_messages_until_close(ws)
    assert code == 1000, msgs[-2:]
    final = msgs[-1]
    assert final["type"] == "end" and final["received"] <= 16
    results = [m for m in msgs if m["type"] == "result"]
    assert final["processed"] == len(results) and final["processed"] + final["dropped"] == final["received"]
    for m in results:  # whatever was decoded whole is answered correctly; the
        # last frame may be cut short and concealed by the decoder (mixed with the one before)
        if m["frame"] < final["received"] - 1:
            assert m["results"][0]["id"] == m["frame"] // 2, m


@settings(FUZZ, max_examples=30)
@given(
    frames=st.lists(st.one_of(st.integers(0, 7), st.binary(min_size=1, max_size=600)), min_size=1, max_size=8),
    truncate=st.booleans(),
)
def test_bad_jpeg_frames(live, frames, truncate):
    bad = 0
    with stream_hello(live, "jpeg") as ws:
        for f in frames:
            if isinstance(f, int):
                data = live.encoded[("JPEG", f)]
                if truncate:
                    data = data[: len(data) // 2]
                    bad += 1
            else:
                data = f
                bad += 1
            try:
                ws.send(data)
                msg = json.loads(ws.recv(30))
            except ConnectionClosed:
                break
            if bad > 2:  # stream_max_bad_frames = 2
                assert msg["type"] == "error" and msg["error"] == "bad_stream", msg
                break
            if isinstance(f, int) and not truncate:
                assert msg["type"] == "result" and msg["results"][0]["id"] == f, msg
            else:
                assert msg["type"] == "warning" and msg["error"] == "bad_frame", msg
        if bad <= 2:
            ws.send(json.dumps({"type": "end"}))
        msgs, code = ws_messages_until_close(ws)
    assert code == (1007 if bad > 2 else 1000), (code, msgs[-2:])


@settings(FUZZ, max_examples=40)
@given(
    stage=st.sampled_from(["hello", "header", "payload"]),
    codec=st.sampled_from(["h264", "jpeg"]),
    size=st.integers(200, WS_MAX),
    frac=st.floats(0.0, 0.99),
    reset=st.booleans(),
)
def test_websocket_dropped_mid_frame(live, stage, codec, size, frac, reset):
    sock = ws_connect_raw(live.port)
    try:
        hello = ws_frame(1, json.dumps({"codec": codec}).encode())
        if stage == "hello":
            sock.sendall(hello[: max(1, int(len(hello) * frac))])
        else:
            sock.sendall(hello)
            opcode, ready = ws_read_frame(sock)
            assert opcode == 1 and json.loads(ready)["type"] == "ready"
            payload = live.h264[:size] if codec == "h264" else live.encoded[("JPEG", 0)][:size]
            frame = ws_frame(2, payload.ljust(size, b"\0"))
            cut = int(len(frame) * frac) if stage == "payload" else int(len(frame[:10]) * frac)
            sock.sendall(frame[: max(1, cut)])
    finally:
        abort(sock, reset)
    wait_streams_closed(live)


def test_streams_work_after_the_fuzzing(live):
    with stream_hello(live, "jpeg") as ws:
        for i in (4, 7):
            ws.send(live.encoded[("JPEG", i)])
            msg = json.loads(ws.recv(30))
            assert msg["type"] == "result" and msg["results"][0]["id"] == i
        ws.send(json.dumps({"type": "end"}))
        msgs, code = ws_messages_until_close(ws)
    assert code == 1000 and msgs[-1]["type"] == "end"
    assert_still_serving(live)


# ---- admin ------------------------------------------------------------------------------------------------
def _near_misses(token: str) -> list[str]:
    return [
        token[:-1],
        token + "x",
        token.upper(),
        " " + token[1:],
        token[::-1],
        token[:16],
        "x" + token[1:],
        token.replace("a", "b"),
        "",
        "null",
        "Bearer " + token,
    ]


@FUZZ
@given(
    token=st.one_of(st.sampled_from(_near_misses(TOKEN)), st.from_regex(r"[!-~]{1,80}", fullmatch=True)),
    how=st.sampled_from(["bearer", "BEARER", "x-api-key", "basic", "token-scheme", "both-wrong"]),
    route=st.sampled_from(["models", "activate", "rebuild", "jobs", "reload", "index-activate"]),
)
def test_admin_wrong_tokens(live, token, how, route):
    if token.strip() == TOKEN:
        return
    headers = {
        "bearer": {"Authorization": f"Bearer {token}"},
        "BEARER": {"Authorization": f"BEARER {token}"},
        "x-api-key": {"X-API-Key": token},
        "basic": {"Authorization": f"Basic {TOKEN}"},
        "token-scheme": {"Authorization": f"Token {TOKEN}"},
        "both-wrong": {"Authorization": f"Bearer {token}", "X-API-Key": token},
    }[how]
    headers = {k: v.strip() for k, v in headers.items()}  # HTTP forbids surrounding whitespace
    jobs_before = len(list((live.h.home / "jobs").glob("*.json"))) if (live.h.home / "jobs").exists() else 0
    method, path, body = {
        "models": ("GET", "/v1/admin/models", None),
        "activate": ("POST", "/v1/admin/models/activate", {"model": live.h.student2}),
        "rebuild": ("POST", "/v1/admin/index/rebuild", {"folder": str(live.h.db)}),
        "jobs": ("GET", "/v1/admin/jobs", None),
        "reload": ("POST", "/v1/admin/reload", None),
        "index-activate": ("POST", "/v1/admin/index/activate", {"index": live.h.index}),
    }[route]
    r = live.http.request(method, path, headers=headers, json=body)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    jobs_after = len(list((live.h.home / "jobs").glob("*.json"))) if (live.h.home / "jobs").exists() else 0
    assert jobs_after == jobs_before  # nothing was started


def test_admin_right_token_still_works_and_nothing_changed(live):
    r = live.http.get("/v1/admin/models", headers={"X-API-Key": TOKEN})
    assert r.status_code == 200 and r.json()["served"]["model"] == live.baseline["model"]
    failures = live.app.state.metrics.registry.get_sample_value("vpr_admin_auth_failures_total")
    assert failures >= 40


# ---- afterwards ----------------------------------------------------------------------------------------------
def churn(live: Live, rounds: int) -> int:
    """A fixed mix of bad inputs that moves a lot of bytes through the server
    (about 65 MB a round); returns the bytes sent."""
    sent = 0
    junk = b"\xff\xd8\xff" + bytes(LIMIT - 4 * KB)  # under the limit: read whole, then refused (400)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for _ in range(250):
            assert_error(post_image(live, junk, "image/jpeg", False), 400, "bad_image")
            sent += len(junk)
        for _ in range(10):
            big = [bytes(32 * KB)] * (LIMIT // (32 * KB) + 2)
            responses, _ = raw_request(
                live.port, _head("/v1/query", "image/jpeg", "Transfer-Encoding: chunked"), chunked(big)
            )
            assert responses[0].status == 413
            sent += LIMIT
        for data, ctype in live.bombs:
            assert_error(post_image(live, data, ctype, True), 413, "image_too_large")
        for _ in range(20):
            assert_error(post_image(live, rng.bytes(4000), "image/png", False), 400, "bad_image")
        for i in range(8):
            assert post_image(live, live.encoded[("WEBP", i)], "image/webp", True).json()["results"][0]["id"] == i
        for _ in range(2):
            with stream_hello(live, "h264") as ws:
                send_until_closed(ws, [b"\x00\x00\x01" + rng.bytes(16 * KB)] + [bytes(16 * KB)] * 6)
                _, code = ws_messages_until_close(ws)
            assert code == 1007
            with stream_hello(live, "h264") as ws:
                send_until_closed(ws, [live.h264[: len(live.h264) // 2]])
                ws.send(json.dumps({"type": "end"}))
                _, code = ws_messages_until_close(ws)
            assert code == 1000
            sock = ws_connect_raw(live.port)
            sock.sendall(ws_frame(1, b'{"codec": "h264"}'))
            ws_read_frame(sock)
            sock.sendall(ws_frame(2, live.h264[:20_000])[:9000])
            abort(sock, reset=True)
        for _ in range(10):
            assert live.http.get("/v1/admin/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    wait_streams_closed(live)
    return sent


@pytest.mark.slow
def test_still_correct_and_memory_bounded(live):
    """After all of the above, and three more rounds that push about 190 MB of
    refused bodies, bombs and broken streams through the server: the normal
    query gets the same answer as before any fuzzing; resident memory grew by
    less than 96 MiB since the warm-up; Python objects did not pile up.

    Why 96 MiB: the process (torch, the model, the index, the test itself)
    sits near 1 GB. Memory is measured after gc and malloc_trim, so it is
    memory in use; after a warm-up round of the same mix it still moves
    by a few tens of MB from round to round (allocator arenas of the worker
    threads; measured here: up and down within about 50 MB over 16 rounds,
    no trend). A leak of what the server is handed would be a share of the
    ~190 MB pushed through it, and a decoded bomb 9 to 27 MB each, so
    keeping half of the traffic, or a few bombs, fails the bound; the
    object count catches smaller per-request leaks (a request or a stream
    session kept alive is dozens of objects, over ~1500 requests)."""
    objects = len(gc.get_objects())
    sent = churn(live, rounds=3)
    assert sent > 180 * 1024 * 1024
    after = settled_rss()
    grown, more_objects = after - live.rss_warm, len(gc.get_objects()) - objects
    print(
        f"RSS after warm-up {live.rss_warm / 2**20:.1f} MiB, after fuzzing {after / 2**20:.1f} MiB "
        f"(+{grown / 2**20:.1f}); {sent / 2**20:.0f} MiB sent in the last rounds; objects +{more_objects}"
    )
    assert grown < 96 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB after fuzzing"
    assert more_objects < 5000
    assert_still_serving(live)
    assert live.gauge("vpr_stream_connections") == 0
    assert live.http.get("/readyz").json()["ready"]
