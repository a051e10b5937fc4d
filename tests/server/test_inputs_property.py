"""Property: every image of at least one pixel, of any aspect ratio up to
1:1000, in any mode and container a camera, phone or editor writes, gets an
answer from a real server (uvicorn on a loopback port) over HTTP and the
websocket: never a 5xx, never a dropped connection, and afterwards a normal
query gets the same answer as before."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from tests.conftest import TINY_CONFIG
from tests.server.support import entries_for, place_images
from vpr.index.store import IndexStore
from vpr.model.network import build_model
from vpr.model.registry import Registry
from vpr.server.app import create_app
from vpr.server.harness import ThreadServer
from vpr.settings import ServerSettings

pytestmark = pytest.mark.slow

MAX_PIXELS = 60_000
TOP_K = 3
MODES = {
    "JPEG": ["RGB", "L", "CMYK"],
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "I;16"],
    "WEBP": ["RGB", "RGBA"],
}
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
MAX_SIDE = {"JPEG": 65_500, "PNG": 100_000, "WEBP": 16_383}
ORIENTATIONS = [None, 1, 2, 3, 4, 5, 6, 7, 8, 0, 9]  # 0 and 9 are invalid tags


@dataclass(frozen=True)
class Spec:
    fmt: str
    mode: str
    width: int
    height: int
    orientation: int | None
    animated: bool
    seed: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def encode(self) -> bytes:
        rng = np.random.default_rng(self.seed)
        base = Image.fromarray(rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8))
        img, kw = _in_mode(base, self.mode)
        if self.orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = self.orientation
            kw["exif"] = exif
        if self.animated:
            kw.update(save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)], duration=50)
        if self.fmt == "JPEG":
            kw["quality"] = int(rng.integers(5, 96))
        buf = io.BytesIO()
        img.save(buf, format=self.fmt, **kw)
        return buf.getvalue()


def _in_mode(rgb: Image.Image, mode: str) -> tuple[Image.Image, dict]:
    if mode == "P+transparency":
        return rgb.convert("P"), {"transparency": 0}
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey), {}
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode)
        img.putalpha(rgb.convert("L"))  # varied transparency
        return img, {}
    return rgb.convert(mode), {}


@st.composite
def specs(draw: st.DrawFn, formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP"), over_cap: bool = True) -> Spec:
    fmt = draw(st.sampled_from(formats))
    short = draw(st.integers(1, 260 if over_cap else math.isqrt(MAX_PIXELS)))
    ratio = draw(st.integers(1, 1000))
    room = (2 if over_cap else 1) * MAX_PIXELS // short
    long = max(short, min(short * ratio, room, MAX_SIDE[fmt]))
    width, height = (long, short) if draw(st.booleans()) else (short, long)
    return Spec(
        fmt=fmt,
        mode=draw(st.sampled_from(MODES[fmt])),
        width=width,
        height=height,
        orientation=draw(st.sampled_from(ORIENTATIONS)),
        animated=fmt != "JPEG" and draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class Home:
    home: Path
    images: list[Path]


def vgg_home(root: Path) -> Home:
    """A tiny VGG16 teacher and its index: VGG16's max-pools are what once
    pooled a 1000x60 image down to nothing."""
    torch.manual_seed(0)
    registry = Registry(root / "home" / "models")
    net = build_model({**TINY_CONFIG, "backbone": {"name": "vgg16"}})
    ref = registry.register("teacher", net, role="teacher")
    images = place_images(root / "db", 8)
    IndexStore(root / "home" / "indexes").build("places", registry.load(ref), entries_for(images), root=root / "db")
    return Home(root / "home", images)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[ThreadServer, Home]]:
    h = vgg_home(tmp_path_factory.mktemp("property"))
    s = ServerSettings(home=h.home, device="cpu", max_pixels=MAX_PIXELS, decode_threads=2)
    with ThreadServer(create_app(s)).start() as srv:
        yield srv, h


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    srv, _ = server
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client


def _local_port(r: httpx.Response) -> int:
    return int(r.extensions["network_stream"].get_extra_info("client_addr")[1])


def _baseline(http: httpx.Client, h: Home) -> tuple[dict, int]:
    r = http.post("/v1/query", content=h.images[3].read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.json()["results"], _local_port(r)


def test_every_image_over_http(server, http):
    _, h = server
    before, port = _baseline(http, h)

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(spec=specs())
    def check(spec: Spec) -> None:
        data = spec.encode()
        r = http.post(
            "/v1/query", content=data, headers={"content-type": CONTENT_TYPES[spec.fmt]}, params={"top_k": TOP_K}
        )
        assert r.status_code < 500, (spec, r.text)
        assert _local_port(r) == port, f"{spec}: the keep-alive connection was dropped"
        if spec.pixels <= MAX_PIXELS:
            assert r.status_code == 200, (spec, r.text)
            assert len(r.json()["results"]) == TOP_K and r.json()["top_k"] == TOP_K
        else:
            assert r.status_code == 413 and r.json()["error"] == "image_too_large", (spec, r.text)
            assert f"limit of {MAX_PIXELS}" in r.json()["detail"]

    check()
    after, port_after = _baseline(http, h)
    assert after == before and port_after == port


def _result(ws: ClientConnection) -> dict:
    msg = json.loads(ws.recv(timeout=60))
    return msg


def test_every_jpeg_frame_on_a_stream(server):
    srv, h = server
    with connect(f"{srv.ws_url}/v1/stream", max_size=None) as ws:
        ws.send(json.dumps({"codec": "jpeg", "top_k": TOP_K}))
        assert _result(ws)["type"] == "ready"
        ws.send(h.images[3].read_bytes())
        before = _result(ws)
        assert before["type"] == "result", before
        sent = 1

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(spec=specs(formats=("JPEG",), over_cap=False))
        def check(spec: Spec) -> None:
            nonlocal sent
            ws.send(spec.encode())  # one at a time: nothing is superseded
            msg = _result(ws)
            assert msg["type"] == "result" and msg["frame"] == sent, (spec, msg)
            assert len(msg["results"]) == TOP_K
            sent += 1

        check()
        ws.send(h.images[3].read_bytes())
        after = _result(ws)
        assert after["type"] == "result" and after["results"] == before["results"]
        ws.send(json.dumps({"type": "end"}))
        end = _result(ws)
    assert end["type"] == "end" and end["processed"] == end["received"] == sent + 1 and end["bad_frames"] == 0
