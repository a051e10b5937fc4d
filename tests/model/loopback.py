"""A loopback HTTP server for download tests: serves bytes the test gives it, with
Range support and per-path misbehaviour (missing, failing, truncating, wrong
bytes, ignoring Range), and records every request. No real network is used."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vpr.model.catalogue import Entry


@dataclass
class Route:
    data: bytes
    mode: str = "ok"  # ok | 404 | 500 | ignore-range | truncate
    cut: int = 0  # truncate: bytes of the body sent before the connection closes


@dataclass
class Loopback:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, data: bytes, mode: str = "ok", cut: int = 0) -> str:
        self.routes[path] = Route(data, mode, cut)
        return self.url(path)


def start(state: Loopback) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            route = state.routes.get(self.path)
            if route is None or route.mode == "404":
                self.send_error(404)
                return
            if route.mode == "500":
                self.send_error(500)
                return
            data, start, status = route.data, 0, 200
            rng = self.headers.get("Range")
            if rng and route.mode != "ignore-range":
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if route.mode == "truncate":
                self.wfile.write(body[: route.cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextmanager
def serving() -> Iterator[Loopback]:
    """A started loopback server for the block (the tests' `server` fixture)."""
    state = Loopback()
    srv = start(state)
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()


def blob_entry(data: bytes, urls: Sequence[str], sha256: str | None = "", size: int | None = -1) -> Entry:
    """A catalogue entry for `data` served at `urls` (its sha256 and size by default;
    None leaves either unknown, as for a release nobody published a hash of)."""
    return Entry(
        name="test-blob",
        kind="backbone",
        arch="vgg16",
        description="test bytes",
        preprocessing="none",
        license="test",
        urls=tuple(urls),
        file_name="blob.bin",
        file_format="torch-pickle",
        sha256=hashlib.sha256(data).hexdigest() if sha256 == "" else sha256,
        size=len(data) if size == -1 else size,
        checksum_source="made by the test",
    )
