"""Shared helpers of the server tests (no tests here): a tiny served home,
image and video encoders, and a model whose forward pass waits on a gate.

The home holds a tiny teacher, two students of it (one with the teacher's
own weights, so that a database image queried as itself comes back first
with score 1; one slightly perturbed, for hot swaps), an unrelated model (to
be refused), and an index of distinct textured images with positions.
"""

from __future__ import annotations

import copy
import io
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch import nn

from tests.conftest import TINY_CONFIG
from vpr.index.meta import Entry
from vpr.index.store import IndexStore
from vpr.model.network import build_model
from vpr.model.registry import LoadedModel, Registry

SIZE = (96, 72)  # W, H: even, for H.264's 4:2:0


@dataclass
class Home:
    home: Path
    db: Path
    images: list[Path]  # id i = images[i]
    teacher: str
    student: str  # teacher weights, role student
    student2: str  # perturbed weights
    other: str  # an unrelated teacher: incompatible with the index
    index: str


def place_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = SIZE) -> list[Path]:
    """Distinct smooth random textures, one JPEG per place."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        p = folder / f"place{i:02d}.jpg"
        Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(p, quality=95)
        paths.append(p)
    return paths


def entries_for(images: list[Path]) -> list[Entry]:
    return [
        Entry(
            p,
            label=f"place {i}",
            utm=(500_000.0 + 10 * i, 4_000_000.0 + 5 * i),
            utm_zone="56H",
            latlon=(-27.47 + i * 1e-4, 153.02 + i * 1e-4),
        )
        for i, p in enumerate(images)
    ]


def build_home(root: Path, n_images: int = 8) -> Home:
    torch.manual_seed(0)
    home = root / "home"
    reg = Registry(home / "models")
    teacher_net = build_model(TINY_CONFIG)
    teacher = reg.register("teacher", teacher_net, role="teacher")
    reg.activate(teacher)
    student = reg.register("student", teacher_net, role="student", parent=str(teacher))
    perturbed = copy.deepcopy(teacher_net)
    with torch.no_grad():
        for p in perturbed.backbone.parameters():
            p.add_(0.01 * p.std().nan_to_num(0.0) * torch.randn_like(p))
    student2 = reg.register("student", perturbed, role="student", parent=str(teacher))
    reg.activate(student)
    torch.manual_seed(1)
    other = reg.register("other", build_model(TINY_CONFIG), role="teacher")
    db = root / "db"
    images = place_images(db, n_images)
    index = IndexStore(home / "indexes").build("places", reg.load(teacher), entries_for(images), root=db)
    return Home(home, db, images, str(teacher), str(student), str(student2), str(other), str(index))


def wait_ready(client, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {r.json()}")


def image_bytes(path: Path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def frames_of(images: list[Path], repeat: int = 1) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in images for _ in range(repeat)]


def encode_h264(frames: list[np.ndarray], fps: int = 10, crf: int = 12) -> bytes:
    """An Annex-B H.264 elementary stream of `frames` (libx264, no B-frames)."""
    h, w = frames[0].shape[:2]
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, fps), Fraction(fps, 1)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(crf)}
    out = bytearray()
    for i, arr in enumerate(frames):
        f = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
        f.pts = i
        for p in enc.encode(f):
            out += bytes(p)
    for p in enc.encode(None):
        out += bytes(p)
    return bytes(out)


def encode_mp4(path: Path, frames: list[np.ndarray], fps: int = 10, crf: int = 12) -> Path:
    """An MP4 (H.264 in AVCC form, as cameras write it) of `frames`."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": str(crf)}
        for arr in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


class GatedNet(nn.Module):
    """Wraps a VPRNet; each forward pass waits until `gate` is set, and
    `entered` tells the test that a forward pass has started."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.inner = net
        self.config = net.config
        self.gate = threading.Event()
        self.entered = threading.Event()

    @property
    def descriptor_dim(self) -> int:
        return self.inner.descriptor_dim

    def forward(self, x: torch.Tensor, return_features: bool = False):
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        return self.inner(x, return_features=return_features)


def gated(model: LoadedModel) -> tuple[LoadedModel, GatedNet]:
    net = GatedNet(model.net)
    return LoadedModel(model.ref, net, model.manifest), net
