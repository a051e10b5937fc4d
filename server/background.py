"""The app under uvicorn in a background thread, on a loopback socket.

For tests and benchmarks that need real sockets (chunked bodies, websockets
cut mid-frame, concurrent clients) without a second process: the socket is
bound before uvicorn starts (port 0 picks a free one, no race with other
processes), and the server is stopped gracefully when the block ends.

    with BackgroundServer(create_app(settings)) as srv:
        httpx.get(f"{srv.url}/readyz")
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI


class BackgroundServer:
    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        ws_max_size: int | None = None,
        start_timeout: float = 60.0,
        **config: Any,
    ) -> None:
        settings = getattr(app.state, "settings", None)
        if ws_max_size is None and settings is not None:
            ws_max_size = settings.stream_max_message_bytes + 4096  # as serve() does
        self.app, self.host, self.port = app, host, port
        self.start_timeout = start_timeout
        self.config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            access_log=False,
            ws_max_size=ws_max_size or 16 * 1024 * 1024,
            timeout_graceful_shutdown=10,
            **config,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="vpr-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn stopped during start-up (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {self.start_timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
