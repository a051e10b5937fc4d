"""`vpr query` (server/client.py) against a served app: folders stand for their
images, every file that cannot be sent is one line of the report and the rest
go on, and the command's output holds no HTTP log lines or tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.server.support import build_home
from vpr.server.app import create_app
from vpr.server.client import UnreadableImage, VPRClient, expand_images, query_command
from vpr.server.harness import ThreadServer
from vpr.settings import ServerSettings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    h = build_home(root)
    with ThreadServer(create_app(ServerSettings(home=h.home, model="student", device="cpu"))) as srv:
        yield srv, h


@pytest.fixture
def inputs(served, tmp_path) -> dict[str, Path]:
    """A folder of three places (written in reverse name order) beside a text
    file and a subfolder, an empty folder, a missing file, a text file named .jpg."""
    _, h = served
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in (2, 1, 0):
        shutil.copy(h.images[i], folder / f"p{i}.jpg")
    shutil.copy(h.images[3], folder / "sub" / "deeper.jpg")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.jpg").write_text("this is text, not a JPEG")
    return {
        "folder": folder,
        "empty": tmp_path / "empty",
        "missing": tmp_path / "missing.jpg",
        "fake": tmp_path / "fake.jpg",
    }


def test_folders_expand_to_their_images_sorted(inputs):
    out = list(expand_images([inputs["folder"], inputs["missing"], inputs["empty"]]))
    folder = inputs["folder"]
    assert out[:4] == [folder / "p0.jpg", folder / "p1.jpg", folder / "p2.jpg", inputs["missing"]]
    (empty,) = out[4:]
    assert isinstance(empty, UnreadableImage) and empty.path == inputs["empty"] and "no images" in empty.reason


def test_query_reports_each_failure_in_one_line_and_goes_on(served, inputs):
    srv, _ = served
    lines: list[str] = []
    paths = [inputs["missing"], inputs["folder"], inputs["empty"], inputs["fake"]]
    status = query_command(srv.url, paths, top_k=1, out=lines.append)
    assert status == 1
    errors = [line for line in lines if ": error: " in line]
    assert errors == [
        f"{inputs['missing']}: error: no such image file",
        errors[1],
        errors[2],
    ]
    assert errors[1].startswith(f"{inputs['empty']}: error: no images")
    assert errors[2].startswith(f"{inputs['fake']}: error: 400 bad_image: ")
    answered = [line.split(":")[0] for line in lines if " / " in line and ": error: " not in line]
    assert answered == [str(inputs["folder"] / f"p{i}.jpg") for i in range(3)]
    best = [line for line in lines if line.startswith("   1. ")]
    assert [b.split()[4] for b in best] == [f"place{i:02d}.jpg" for i in range(3)]  # each found itself


def test_query_json_lines(served, inputs):
    srv, _ = served
    lines: list[str] = []
    assert query_command(srv.url, [inputs["folder"], inputs["missing"]], top_k=2, as_json=True, out=lines.append) == 1
    answers = [json.loads(line) for line in lines]
    assert [a["image"] for a in answers] == [str(inputs["folder"] / f"p{i}.jpg") for i in range(3)] + [
        str(inputs["missing"])
    ]
    assert all(len(a["results"]) == 2 for a in answers[:3])
    assert answers[3] == {"image": str(inputs["missing"]), "error": "no such image file"}


def test_client_query_of_a_folder_is_a_clear_error(served, inputs):
    srv, _ = served
    with VPRClient(srv.url) as c, pytest.raises(UnreadableImage, match="photos: cannot read"):
        c.query(inputs["folder"])
    with VPRClient(srv.url) as c, pytest.raises(OSError, match="missing.jpg: no such image file"):
        c.query(inputs["missing"])


def test_the_command_prints_no_http_log_and_no_traceback(served, inputs):
    """The real `vpr query` process: logging at INFO, as the CLI sets it."""
    srv, _ = served
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "vpr.cli.main", "query", "--url", srv.url, str(inputs["folder"])]
    p = subprocess.run([*argv, str(inputs["missing"])], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1, p.stderr
    assert "HTTP Request" not in p.stderr + p.stdout and "Traceback" not in p.stderr, p.stderr
    assert " INFO " not in p.stderr, p.stderr  # nor any library's routine logging (faiss.loader)
    assert p.stdout.count(": error: ") == 1 and p.stdout.count(" / ") == 3, p.stdout
