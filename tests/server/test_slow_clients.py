"""Slow clients on real loopback sockets: connections that send nothing, trickle
their headers or trickle their body neither block other clients nor stay open
for ever, and their number is capped.

Two servers (uvicorn in a thread, the one harness): a patient one (deadlines
of minutes) shows that a normal query is answered while slow connections are
held, and that beyond `max_connections` requests get a 503 at once instead of
waiting; a strict one (deadlines of seconds) shows that the server closes each
kind of slow connection itself. Waits are on events (connection counts,
end-of-file) with deadlines far above what a loaded machine needs.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.server.live_support import ws_connect_raw, ws_frame, ws_read_frame
from tests.server.support import Home, build_home
from vpr.server.app import create_app
from vpr.server.harness import ThreadServer
from vpr.settings import ServerSettings

# real servers held by slow connections: `make test` runs it, `make test-fast` does not
pytestmark = pytest.mark.slow

JPEG = {"content-type": "image/jpeg"}
PER_KIND = 8  # slow connections of each kind
WAIT_S = 60.0  # for anything the server must do; every wait ends at its event
HEAD = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: "  # never finished
BODY_HEAD = b"POST /v1/query HTTP/1.1\r\nHost: slow\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    return build_home(tmp_path_factory.mktemp("slow"))


@contextlib.contextmanager
def server(h: Home, **settings: object) -> Iterator[ThreadServer]:
    s = ServerSettings(home=h.home, model="student", device="cpu", decode_threads=2, max_wait_ms=0.0, **settings)  # type: ignore[arg-type]
    with ThreadServer(create_app(s)).start(timeout=WAIT_S) as srv:
        yield srv


def open_connections(srv: ThreadServer) -> int:
    return len(srv.server.server_state.connections)


def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class SlowClients:
    """Connections of three kinds: silent, a header that never ends, a body that
    never ends; a thread sends one more byte on the trickling ones every 0.25 s
    (which is what defeats uvicorn's own keep-alive timer)."""

    def __init__(self, port: int, jpeg: bytes) -> None:
        self.silent = [self._connect(port, b"") for _ in range(PER_KIND)]
        self.heads = [self._connect(port, HEAD) for _ in range(PER_KIND)]
        self.bodies = [self._connect(port, BODY_HEAD + jpeg[:1000]) for _ in range(PER_KIND)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    @property
    def all(self) -> list[socket.socket]:
        return [*self.silent, *self.heads, *self.bodies]

    @staticmethod
    def _connect(port: int, first: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        if first:
            sock.sendall(first)
        return sock

    def _trickle(self) -> None:
        live = [*self.heads, *self.bodies]
        while live and not self._stop.wait(0.25):
            for sock in list(live):
                try:
                    if select.select([sock], [], [], 0)[0]:
                        live.remove(sock)  # answered or closed: stop sending, read what came
                    else:
                        sock.send(b"a" if sock in self.heads else b"\x00")
                except OSError:
                    live.remove(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        for sock in self.all:
            sock.close()


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the server kept a slow connection open; it sent {data[:200]!r}") from None
        if not chunk:
            return data
        data += chunk


def query(url: str, jpeg: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/query", content=jpeg, headers=JPEG, params={"top_k": 1}, timeout=WAIT_S / 2)


def test_slow_connections_do_not_block_queries_and_are_capped(home):
    """Deadlines of minutes: 24 slow connections are held, and a query is answered
    meanwhile (within a client timeout well below those deadlines); at the cap,
    a request is refused at once; closed by the client, the slots come back."""
    jpeg = home.images[3].read_bytes()
    cap = 3 * PER_KIND + 6
    with server(home, header_timeout_s=300, body_timeout_s=300, max_connections=cap) as srv:
        slow = SlowClients(srv.port, jpeg)
        extra: list[socket.socket] = []
        try:
            until(lambda: open_connections(srv) >= 3 * PER_KIND, "the slow connections to be accepted")
            r = query(srv.url, jpeg)
            assert r.status_code == 200 and r.json()["results"][0]["id"] == 3, r.text
            assert open_connections(srv) >= 3 * PER_KIND  # still held: they did not have to go first

            extra = [socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S) for _ in range(cap)]
            until(lambda: open_connections(srv) >= cap, "the connections to reach the cap")
            r = query(srv.url, jpeg)
            assert r.status_code == 503, r.text  # at once, not after the slow ones
        finally:
            slow.close()
            for sock in extra:
                sock.close()
        until(lambda: open_connections(srv) <= 1, "the closed connections to be released")
        assert query(srv.url, jpeg).status_code == 200


def test_the_server_closes_slow_connections(home):
    """Deadlines of seconds: silent and trickling connections are closed by the
    server; a late body is answered 408 (connection: close) first."""
    jpeg = home.images[5].read_bytes()
    with server(home, header_timeout_s=1.5, body_timeout_s=1.5, keep_alive_s=1) as srv:
        slow = SlowClients(srv.port, jpeg)
        try:
            until(lambda: open_connections(srv) >= 3 * PER_KIND, "the slow connections to be accepted")
            deadline = time.monotonic() + WAIT_S
            for sock in [*slow.silent, *slow.heads]:
                assert read_until_closed(sock, deadline) == b""  # closed without an answer
            answers = [read_until_closed(sock, deadline) for sock in slow.bodies]
        finally:
            slow.close()
        timed_out = [a for a in answers if a]
        assert timed_out, "no slow body was answered before its connection was closed"
        for answer in timed_out:  # (a byte sent after the close may reset a connection before its answer is read)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
            assert json.loads(body)["error"] == "body_timeout"
        until(lambda: open_connections(srv) == 0, "the server to forget the closed connections")
        r = query(srv.url, jpeg)
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 5


def test_a_kept_alive_connection_gets_a_new_deadline_per_request(home):
    """The header deadline restarts with each request on a kept-alive connection:
    complete requests keep being answered on it; a half-sent next one is closed."""
    with server(home, header_timeout_s=1.5, keep_alive_s=60) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S)
        with sock:
            for _ in range(3):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b'"ok"' not in data:
                    chunk = sock.recv(4096)
                    assert chunk, f"closed after {data!r}"
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            assert read_until_closed(sock, time.monotonic() + WAIT_S) == b""


def test_slow_client_settings_reach_uvicorn(tmp_path):
    """`uvicorn_options` carries the settings (what `vpr serve` and the harness run)."""
    from vpr.server.app import uvicorn_options
    from vpr.server.connections import HeaderDeadlineProtocol

    s = ServerSettings(home=tmp_path, header_timeout_s=7, keep_alive_s=3, max_connections=99)
    options = uvicorn_options(s)
    assert issubclass(options["http"], HeaderDeadlineProtocol) and options["http"].header_timeout_s == 7
    assert (options["timeout_keep_alive"], options["limit_concurrency"]) == (3, 99)


def test_a_websocket_outlives_the_header_deadline(home):
    """Once upgraded, a stream is the websocket's business: a connection opened
    after it has been closed by the header deadline, the stream still answers."""
    jpeg = home.images[2].read_bytes()
    with server(home, header_timeout_s=1.5) as srv:
        ws = ws_connect_raw(srv.port, timeout=WAIT_S)
        with ws:
            ws.sendall(ws_frame(0x1, json.dumps({"codec": "jpeg", "top_k": 1}).encode()))
            assert json.loads(ws_read_frame(ws)[1])["type"] == "ready"
            later = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S)
            with later:
                assert read_until_closed(later, time.monotonic() + WAIT_S) == b""  # its deadline has passed
            ws.sendall(ws_frame(0x2, jpeg))
            reply = json.loads(ws_read_frame(ws)[1])
            assert reply["type"] == "result" and reply["results"][0]["id"] == 2, reply
