"""Helpers of the tests that talk to a live server over real loopback sockets
(reliability fuzzing, load, crash): raw HTTP and websocket framing where a
normal client would refuse to misbehave, the resident memory of a process,
and the tests' defaults for `vpr serve` subprocesses. The servers themselves
run through the one harness, vpr.server.harness. No tests here."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.conftest import REPO
from vpr.server.harness import ServeProcess

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc (no psutil needed)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0);
    False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The RSS high-water mark (VmHWM) of this process since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


# ---- raw HTTP/1.1 --------------------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class _Reader:
    """Responses framed by Content-Length (how uvicorn sends every answer here)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.eof = sock, b"", False

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.buf += chunk
        return bool(chunk)

    def response(self) -> RawResponse | None:
        while b"\r\n\r\n" not in self.buf:
            if self.eof or not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length and not self.eof and self._fill():
            pass
        body, self.buf = self.buf[:length], self.buf[length:]
        return RawResponse(int(lines[0].split()[1]), headers, body)


def raw_request(
    port: int,
    head: str,
    body: Iterable[bytes] = (),
    timeout: float = 30.0,
    until_close: bool = False,
    stop_early: bool = True,
) -> tuple[list[RawResponse], bool]:
    """Send a hand-written request: `head` (request line and headers, no blank
    line) then the `body` pieces, stopping early once the server has answered
    (a server may refuse a body before it has all arrived) unless not
    `stop_early` (then only a closed connection stops the sending).

    Returns the responses read and whether the server closed the connection:
    with `until_close`, every response until it does (a lying Content-Length
    makes the server see a second request), else the first one only."""
    out: list[RawResponse] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
        for piece in body:
            if stop_early and select.select([sock], [], [], 0)[0]:
                break  # an answer (or a close) is waiting: stop sending
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        reader = _Reader(sock)
        while (resp := reader.response()) is not None:
            out.append(resp)
            if not until_close:
                break
        if until_close and not reader.eof:
            sock.settimeout(2.0)
            reader._fill()
    return out, reader.eof


def chunked(pieces: Iterable[bytes]) -> Iterable[bytes]:
    """HTTP/1.1 chunked transfer coding of `pieces` (with the final 0 chunk)."""
    for p in pieces:
        if p:
            yield f"{len(p):x}\r\n".encode() + p + b"\r\n"
    yield b"0\r\n\r\n"


# ---- raw websocket (RFC 6455) -------------------------------------------------------------------
def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """One client frame (clients must mask)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    key = mask_key or os.urandom(4)
    arr = np.frombuffer(payload, dtype=np.uint8)
    keys = np.resize(np.frombuffer(key, dtype=np.uint8), n)
    return head + key + (arr ^ keys).tobytes()


def ws_connect_raw(port: int, path: str = "/v1/stream", timeout: float = 30.0) -> socket.socket:
    """A TCP connection upgraded to a websocket by hand."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the websocket handshake")
        buf += chunk
    if not buf.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no upgrade: {buf[:200]!r}")
    return sock


def ws_read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of one unfragmented server frame."""

    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed mid-frame")
            out += chunk
        return out

    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", exactly(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exactly(8))[0]
    return b0 & 0x0F, exactly(n)


def abort(sock: socket.socket, reset: bool) -> None:
    """Drop a connection: an orderly FIN, or a RST (SO_LINGER 0) like a crashed client."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def ws_messages_until_close(ws, timeout: float = 60.0) -> tuple[list[dict], int | None]:
    """Every JSON message of a `websockets` sync connection until the server
    closes it; (messages, close code)."""
    from websockets.exceptions import ConnectionClosed

    msgs: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = ws.recv(max(0.1, deadline - time.monotonic()))
        except ConnectionClosed as e:
            return msgs, (e.rcvd.code if e.rcvd else None)
        except TimeoutError:
            raise AssertionError(f"the server did not close the stream within {timeout} s: {msgs[-3:]}") from None
        msgs.append(json.loads(raw))


# ---- `vpr serve` as a subprocess --------------------------------------------------------------
TEST_ENV = {"VPR_DEVICE": "cpu", "VPR_DECODE_THREADS": "2", "VPR_ACCESS_LOG": "false"}


def serve_process(home: Path, log: Path, env: dict[str, str] | None = None, args: Iterable[str] = ()) -> ServeProcess:
    """`vpr serve` (the one harness, vpr.server.harness) with the tests' defaults:
    the CPU, two decode threads, no access log; start it with `.start()`."""
    return ServeProcess(home, log, args=list(args), env={**TEST_ENV, **(env or {})}, cwd=REPO)
