"""The one way tests and benchmarks run a server on a loopback port.

- `ThreadServer(app)`: the app under uvicorn in a thread of this process. Fast
  to start, and the caller can reach into the app (`app.state`) while it
  serves. The socket is bound before uvicorn starts (port 0 picks a free one,
  no race with other processes).
- `ServeProcess(home, log)`: `vpr serve` as a real subprocess, for what only
  a process shows (SIGKILL, SIGTERM, a restart on the same home) and for
  benchmarks that keep the server apart from the clients' GIL. Its output
  goes to a log file, quoted when it fails.
- `NginxProxy(upstreams, prefix)`: Debian's nginx with deploy/nginx/nginx.conf
  (the proxy of docker-compose.yml) on a loopback port in front of running
  replicas, for the replica tests and bench/replicas.py.

`start()` returns once the server accepts connections and, unless
`ready=False`, once `/readyz` says ready; it fails early, with the reason,
when the server exits or reports that loading failed. `stop()` (or the end
of a `with` block) shuts it down gracefully.

    with ThreadServer(create_app(settings)) as srv:
        httpx.post(f"{srv.url}/v1/query", content=jpeg, headers={"content-type": "image/jpeg"})
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

import httpx
import uvicorn
from fastapi import FastAPI

from vpr.server.app import uvicorn_options

HOST = "127.0.0.1"
# What the `vpr` console script runs.
VPR_COMMAND = [sys.executable, "-c", "import sys; from vpr.cli.main import main; sys.exit(main())"]
POLL_S = 0.05  # between readiness probes (each wait also ends when the server exits)


class ServerFailed(RuntimeError):
    """The server exited, or cannot become ready; the message says why."""


def free_port() -> int:
    """A port free now (a subprocess binds it itself, so another process could take it first)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class LoopbackServer(ABC):
    """What both kinds share: addresses, readiness, `with` blocks."""

    host = HOST
    port = 0
    launched = False  # `start()` got as far as a running server (a `with` block does not start it again)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, ready: bool = True, timeout: float = 120.0) -> Self:
        self._launch(timeout)
        self.launched = True
        if ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """The body of the first `/readyz` that says ready."""
        deadline = time.monotonic() + timeout
        last: object = "no answer"
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while True:
                self._check_running()
                try:
                    r = http.get("/readyz")
                    body = r.json()
                    if r.status_code == 200:
                        return dict(body)
                    if body.get("state") == "not_ready":  # loading failed: only an admin reload helps
                        reason = body.get("reason")
                        raise ServerFailed(f"server at {self.url} cannot become ready: {reason}{self._context()}")
                    last = body
                except httpx.HTTPError as e:
                    last = e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"server at {self.url} not ready after {timeout:g} s ({last}){self._context()}")
                self._wait_exit(min(POLL_S, remaining))

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def _launch(self, timeout: float) -> None:
        """Start the server on `self.port`."""

    @abstractmethod
    def _check_running(self) -> None:
        """Raise ServerFailed when the server has exited."""

    @abstractmethod
    def _wait_exit(self, seconds: float) -> None:
        """Wait up to `seconds`, returning early when the server exits."""

    def _context(self) -> str:
        return ""

    def __enter__(self) -> Self:
        return self if self.launched else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Uvicorn(uvicorn.Server):
    """Sets `changed` once start-up has finished, served or not."""

    def __init__(self, config: uvicorn.Config, changed: threading.Event) -> None:
        super().__init__(config)
        self.changed = changed

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.changed.set()


class ThreadServer(LoopbackServer):
    """The app under uvicorn in a background thread of this process."""

    def __init__(self, app: FastAPI, port: int = 0, log_level: str = "warning", **config: Any) -> None:
        settings = getattr(app.state, "settings", None)
        options = uvicorn_options(settings) if settings is not None else {}
        options.update(log_level=log_level, access_log=False, **config)
        self.app, self.port = app, port
        self._changed = threading.Event()  # start-up finished, or the thread ended
        self._exited = threading.Event()
        self.server = _Uvicorn(uvicorn.Config(app, lifespan="on", **options), self._changed)
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def _launch(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._run, args=(sock,), name="vpr-uvicorn", daemon=True)
        self._thread.start()
        if not self._changed.wait(timeout):
            self.stop()
            raise TimeoutError(f"uvicorn did not start within {timeout:g} s")
        if not self.server.started:
            self.stop()
            raise ServerFailed("uvicorn stopped during start-up (see the log)")

    def _run(self, sock: socket.socket) -> None:
        try:
            self.server.run(sockets=[sock])
        finally:
            self._exited.set()
            self._changed.set()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _check_running(self) -> None:
        if self._exited.is_set():
            raise ServerFailed(f"uvicorn at {self.url} stopped (see the log)")

    def _wait_exit(self, seconds: float) -> None:
        self._exited.wait(seconds)


class ServeProcess(LoopbackServer):
    """`vpr --home HOME serve ARGS` on a loopback port, its output appended to `log`.

    The environment is this process's without any `VPR_*` variable (the
    caller's own settings never leak in), plus `env`."""

    def __init__(
        self,
        home: Path,
        log: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.home, self.log_path, self.cwd = Path(home), Path(log), cwd
        self.port = port or free_port()
        clean = {k: v for k, v in os.environ.items() if not k.startswith("VPR_")}
        self.env = {**clean, **(env or {})}
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def command(self) -> list[str]:
        serve = ["serve", "--host", self.host, "--port", str(self.port), *self.args]
        return [*VPR_COMMAND, "--home", str(self.home), *serve]

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _launch(self, timeout: float) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self, chars: int = 6000) -> str:
        """The end of the server's output."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, like a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._close_log()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if that takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(f"vpr serve exited with {self.proc.returncode}:\n{self.log()}")

    def _wait_exit(self, seconds: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(seconds)

    def _context(self) -> str:
        return f":\n{self.log()}"


# ---- nginx in front of replicas --------------------------------------------------------------
NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"


def nginx_binary() -> str | None:
    """Debian's nginx (`.ci/install-proxy.sh`), or None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render_nginx_conf(template: str, upstreams: Sequence[str], port: int, prefix: Path) -> str:
    """deploy/nginx/nginx.conf for loopback: listen on `port`, each upstream group
    lists `upstreams` ("127.0.0.1:PORT") with the template's server parameters,
    and pid, logs and temporary files go under `prefix`. Everything else (the
    balancing, retries, websocket upgrade, session hash) is the deployed file's."""
    text = re.sub(r"(?m)^(\s*)listen\s+\S+;", rf"\g<1>listen {HOST}:{port};", template)

    def servers(m: re.Match[str]) -> str:
        indent, params = m.group(1), m.group(2)
        return "".join(f"{indent}server {u}{params};\n" for u in upstreams)

    # one group of consecutive `server host:port ...;` lines per upstream block
    text = re.sub(r"(?m)^(\s*)server\s+[^\s;]+:\d+([^;\n]*);\n(?:\1server\s+[^\s;]+:\d+[^;\n]*;\n)*", servers, text)
    text = re.sub(r"(?m)^pid\s+[^;]+;", f"pid {prefix / 'nginx.pid'};", text)
    text = re.sub(r"(?m)^error_log\s+[^;]+;", f"error_log {prefix / 'error.log'} info;", text)
    # The master runs as whoever runs the test; as root, workers would switch to the
    # deployed user, who cannot write the test's private folders.
    user = "user root;" if os.geteuid() == 0 else ""
    text = re.sub(r"(?m)^user\s+[^;]+;", user, text)
    temp = "".join(
        f"    {kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {\n", "http {\n" + temp, 1)


class NginxProxy(LoopbackServer):
    """nginx with deploy/nginx/nginx.conf on a loopback port in front of `upstreams`
    (`host:port` of running replicas); its files go under `prefix`."""

    def __init__(self, upstreams: Sequence[str], prefix: Path, port: int | None = None, conf: Path = NGINX_CONF):
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (run .ci/install-proxy.sh as root)")
        self.binary, self.prefix, self.port = binary, Path(prefix), port or free_port()
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.prefix / "nginx.conf"
        self.conf_path.write_text(render_nginx_conf(conf.read_text(), upstreams, self.port, self.prefix))
        self.proc: subprocess.Popen[bytes] | None = None

    def _launch(self, timeout: float) -> None:
        test = subprocess.run(
            [self.binary, "-t", "-p", str(self.prefix), "-c", str(self.conf_path)], capture_output=True, text=True
        )
        if test.returncode != 0:
            raise ServerFailed(f"nginx refuses {self.conf_path}: {test.stderr.strip()}")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx did not listen on {self.port} within {timeout:g} s{self._context()}")
            self._wait_exit(POLL_S)

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Ready when a replica behind it is (its /readyz, through the proxy)."""
        return super().wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGQUIT: nginx's graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(f"nginx exited with {self.proc.returncode}{self._context()}")

    def _wait_exit(self, seconds: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(seconds)

    def _context(self) -> str:
        try:
            return ":\n" + (self.prefix / "error.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""
