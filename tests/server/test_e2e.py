"""End to end: `vpr serve` as a subprocess on a free loopback port, driven by
`vpr query` and `vpr stream` (one as a subprocess like a user types it; the
others through the same `vpr.cli.main.main` in this process, which saves a torch
import per call), then stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.server.live_support import serve_process
from tests.server.support import build_home, encode_mp4, frames_of
from vpr.cli.main import main
from vpr.server.harness import VPR_COMMAND, free_port

# real `vpr` subprocesses end to end: `make test` runs it, `make test-fast` does not
pytestmark = pytest.mark.slow


def vpr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VPR_COMMAND, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def vpr_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`vpr ARGS` in this process: the same parser, command and exit status."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    h = build_home(root)
    srv = serve_process(h.home, root / "serve.log", env={"VPR_MODEL": "student", "VPR_ACCESS_LOG": "true"})
    with srv:
        yield srv.url, h, root, srv


def test_vpr_query(server):
    url, h, root, _ = server
    r = vpr("query", str(h.images[0]), str(h.images[3]), "--url", url, "--top-k", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{h.images[0]}: {h.student} / {h.index}")
    assert lines[1].split()[:4] == ["1.", "1.0000", "place", "0"] and "(-27.470000, 153.020000)" in lines[1]
    assert lines[3].startswith(str(h.images[3])) and lines[4].split()[:4] == ["1.", "1.0000", "place", "3"]
    assert len(lines) == 6


def test_vpr_query_errors(server, capsys):
    url, h, root, _ = server
    bad = root / "notes.txt"
    bad.write_text("not an image")
    r = vpr_here(capsys, "query", str(bad), str(h.images[2]), "--url", url, "--json")
    assert r.returncode == 1  # one image failed, the other was still answered
    first, second = (json.loads(line) for line in r.stdout.strip().splitlines())
    assert first["image"] == str(bad) and "415" in first["error"]
    assert second["results"][0]["id"] == 2 and second["model"] == h.student and len(second["results"]) == 5
    r = vpr_here(capsys, "query", str(h.images[2]), "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and r.stderr.startswith("vpr query: error:") and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("codec,extra", [("h264", []), ("jpeg", ["--fast"])])
def test_vpr_stream(server, capsys, codec, extra):
    url, h, root, _ = server
    video = root / "route.mp4"
    if not video.exists():
        encode_mp4(video, frames_of(h.images, repeat=3), fps=12)  # 24 frames, 2 s
    t0 = time.monotonic()
    r = vpr_here(capsys, "stream", str(video), "--url", url, "--codec", codec, "--top-k", "1", *extra)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith(f"streaming ({codec}) to {h.student} / {h.index}")
    assert out[-1].startswith("end: 24 frames received")
    frames = [line for line in out if line.startswith("frame ")]
    assert frames and frames[-1].split()[1] == "23"
    for line in frames:  # each answered frame shows its own place
        n = int(line.split()[1])
        assert f"place {n // 3} " in line, line
    if codec == "h264":
        assert took >= 1.8  # sent at the video's frame rate (the last of 24 frames at 12 fps leaves at 1.92 s)


def test_vpr_stream_gopro_walk(server, capsys, shared_dir):
    url, _, _, _ = server
    video = shared_dir / "videos" / "gopro_walk" / "walk.mp4"
    if not video.is_file():
        pytest.skip(f"{video} is not present")
    r = vpr_here(capsys, "stream", str(video), "--url", url, "--max-frames", "45")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("end: 45 frames received")
    assert " t=1.4" in r.stdout  # frame times from the video's 29.97 fps


def test_vpr_serve_stops_cleanly_on_sigterm(server):
    url, _, root, srv = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    srv.stop()  # SIGTERM
    # uvicorn shuts down gracefully, then re-raises the signal for the exit status
    assert srv.returncode in (0, -signal.SIGTERM)
    log = (root / "serve.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
