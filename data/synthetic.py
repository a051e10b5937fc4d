"""A deterministic synthetic street route: a real place-recognition problem
without downloading anything.

A straight street, lined on both sides with procedurally textured buildings
(facade colours, window grids, shop fronts and signs drawn from small shared
palettes, so no single cue identifies a place), parked cars, lamp posts,
road markings and crossings, is ray-cast from a camera looking along it.

- The database pass drives the right lane at fixed spacing, at daylight.
- The query pass visits each place again from a shifted viewpoint (lateral
  offset, forward jitter, camera height, yaw and pitch), under another
  lighting (`dusk` by default: darker, warm, some windows lit; `night`;
  or `day`), with other parked cars and sensor noise.

Queries are positive for database views within `radius` metres. Views a
few metres apart look alike and the facades repeat their styles, so the
task is not trivial (a random-init network is far from perfect) but it is
learnable (a network whose NetVLAD clusters fit the data scores well).

The result is a folder dataset (`database/`, `queries/`, dvgl
`@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg` names) plus `route.json`;
`data.datasets.open_dataset("synthetic", path)` reads it. Same parameters
and seed give byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from PIL import Image
from tqdm import tqdm

from vpr.data.geo import utm_to_latlon
from vpr.data.names import dvgl_name
from vpr.model.fileio import atomic_write_json, staged_dir

log = logging.getLogger(__name__)

ROUTE_FILE = "route.json"
GENERATOR_VERSION = 1
LightingName = Literal["day", "dusk", "night"]
LIGHTINGS: tuple[str, ...] = get_args(LightingName)
ZONE, BAND, ORIGIN = 32, "T", (514_000.0, 5_034_000.0)  # somewhere in northern Italy

HALF_WIDTH = 7.0  # street half width, wall to wall (m)
SIDEWALK = 2.5
FOCAL_FOV_DEG = 75.0
SUPERSAMPLE = 2

FACADE_PALETTE = np.array(
    [
        [0.78, 0.72, 0.62],
        [0.70, 0.45, 0.35],
        [0.85, 0.82, 0.76],
        [0.55, 0.58, 0.62],
        [0.83, 0.68, 0.45],
        [0.62, 0.66, 0.55],
        [0.48, 0.40, 0.36],
        [0.90, 0.88, 0.84],
    ]
)
SIGN_PALETTE = np.array(
    [
        [0.80, 0.12, 0.12],
        [0.10, 0.35, 0.75],
        [0.12, 0.55, 0.25],
        [0.95, 0.75, 0.10],
        [0.55, 0.20, 0.60],
        [0.95, 0.45, 0.10],
        [0.15, 0.15, 0.15],
        [0.92, 0.92, 0.92],
    ]
)
CAR_PALETTE = np.array(
    [
        [0.75, 0.10, 0.10],
        [0.15, 0.20, 0.50],
        [0.85, 0.85, 0.85],
        [0.12, 0.12, 0.12],
        [0.55, 0.55, 0.58],
        [0.20, 0.45, 0.30],
        [0.85, 0.75, 0.20],
    ]
)


@dataclass(frozen=True)
class RouteParams:
    places: int = 60
    seed: int = 0
    spacing: float = 4.0  # metres between database views
    size: tuple[int, int] = (160, 120)
    lighting: LightingName = "dusk"  # of the query pass
    radius: float | None = None  # positives; default 1.25 * spacing

    def validate(self) -> RouteParams:
        if not 2 <= self.places <= 100_000:
            raise ValueError(f"synthetic route: places must be 2..100000, got {self.places}")
        if not 0.5 <= self.spacing <= 100:
            raise ValueError(f"synthetic route: spacing must be 0.5..100 m, got {self.spacing}")
        w, h = self.size
        if not (32 <= w <= 2048 and 32 <= h <= 2048):
            raise ValueError(f"synthetic route: image size must be 32..2048 a side, got {w}x{h}")
        if self.lighting not in LIGHTINGS:
            raise ValueError(f"synthetic route: lighting must be one of {', '.join(LIGHTINGS)}, got {self.lighting!r}")
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"synthetic route: radius must be > 0 m, got {self.radius}")
        return self

    @property
    def radius_m(self) -> float:
        return float(self.radius) if self.radius is not None else 1.25 * self.spacing


# ---- the world ------------------------------------------------------------------


def _hash(*ints: npt.ArrayLike) -> np.ndarray:
    """Deterministic integer hash -> uniform floats in [0, 1) (value noise)."""
    h = np.full((), 1469598103934665603, dtype=np.uint64)  # 0-d: broadcasts against the inputs
    for v in ints:
        u = np.asarray(v).astype(np.int64).astype(np.uint64)
        h = (h ^ u) * np.uint64(1099511628211)
        h ^= h >> np.uint64(29)
    h = h * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(40)).astype(np.float64)) / float(1 << 24)


@dataclass
class Side:
    edges: np.ndarray  # building boundaries along the street (n+1,)
    colour: np.ndarray  # (n, 3)
    height: np.ndarray
    floor_h: np.ndarray
    win_step: np.ndarray
    win_w: np.ndarray  # fraction of the step
    win_h: np.ndarray  # fraction of the floor
    frame: np.ndarray  # (n, 3) window frame colour
    sign: np.ndarray  # (n, 3)
    awning: np.ndarray  # bool
    cornice: np.ndarray  # bool
    poles: np.ndarray  # lamp post positions


def _make_side(rng: np.random.Generator, start: float, end: float) -> Side:
    widths = []
    total = start
    while total < end:
        w = float(rng.uniform(5.0, 14.0))
        widths.append(w)
        total += w
    n = len(widths)
    edges = start + np.concatenate([[0.0], np.cumsum(widths)])
    colour = FACADE_PALETTE[rng.integers(0, len(FACADE_PALETTE), n)] * rng.uniform(0.9, 1.1, (n, 1))
    frame = np.where(rng.random((n, 1)) < 0.5, [[0.95, 0.95, 0.92]], [[0.25, 0.22, 0.20]])
    first = start + float(rng.uniform(0, 12))
    poles = np.arange(first, end, 15.0)
    poles = poles + rng.uniform(-3.0, 3.0, len(poles))
    return Side(
        edges=edges,
        colour=np.clip(colour, 0, 1),
        height=rng.uniform(7.0, 24.0, n),
        floor_h=rng.uniform(2.8, 3.6, n),
        win_step=rng.choice([1.6, 2.0, 2.5, 3.0], n),
        win_w=rng.uniform(0.35, 0.7, n),
        win_h=rng.uniform(0.4, 0.65, n),
        frame=frame,
        sign=SIGN_PALETTE[rng.integers(0, len(SIGN_PALETTE), n)],
        awning=rng.random(n) < 0.35,
        cornice=rng.random(n) < 0.5,
        poles=poles,
    )


@dataclass
class World:
    sides: tuple[Side, Side]  # left (y = +HALF_WIDTH), right (y = -HALF_WIDTH)
    crossings: np.ndarray  # x of zebra crossings
    manholes: np.ndarray  # (m, 2) x, y


def make_world(rng: np.random.Generator, length: float) -> World:
    start, end = -30.0, length + 120.0
    crossings = np.sort(rng.uniform(start, end, max(1, int(length / 50))))
    manholes = np.stack(
        [
            rng.uniform(start, end, max(2, int(length / 12))),
            rng.uniform(-HALF_WIDTH + SIDEWALK + 1, HALF_WIDTH - SIDEWALK - 1, max(2, int(length / 12))),
        ],
        1,
    )
    return World((_make_side(rng, start, end), _make_side(rng, start, end)), crossings, manholes)


@dataclass
class Cars:
    x0: list[np.ndarray]  # per side, sorted car starts
    length: list[np.ndarray]
    colour: list[np.ndarray]


def make_cars(rng: np.random.Generator, length: float, density: float = 0.5) -> Cars:
    x0s, lens, cols = [], [], []
    for _ in range(2):
        x, starts, ls = -30.0, [], []
        while x < length + 120:
            gap = rng.exponential(4.5 / density)
            x += gap
            ln = float(rng.uniform(3.8, 4.8))
            starts.append(x)
            ls.append(ln)
            x += ln + 0.8
        x0s.append(np.array(starts))
        lens.append(np.array(ls))
        cols.append(CAR_PALETTE[rng.integers(0, len(CAR_PALETTE), len(starts))])
    return Cars(x0s, lens, cols)


@dataclass(frozen=True)
class Lighting:
    gain: float
    tint: tuple[float, float, float]
    shadow: float  # brightness of the shaded (right) facades
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    lit_windows: float  # fraction of windows lit
    lamps: float  # strength of street-lamp pools on the ground
    noise: float  # sensor noise sigma (0..255 scale)


LIGHTING = {
    "day": Lighting(1.0, (1.0, 1.0, 1.0), 0.7, (0.35, 0.55, 0.85), (0.75, 0.85, 0.95), 0.0, 0.0, 1.5),
    "dusk": Lighting(0.55, (1.12, 0.92, 0.75), 0.85, (0.25, 0.22, 0.45), (0.95, 0.6, 0.4), 0.3, 0.35, 4.0),
    "night": Lighting(0.16, (0.8, 0.9, 1.2), 1.0, (0.02, 0.03, 0.08), (0.08, 0.08, 0.15), 0.55, 1.0, 6.0),
}


# ---- rendering ------------------------------------------------------------------


def _facade(side: Side, s: int, x: np.ndarray, z: np.ndarray, light: Lighting) -> tuple[np.ndarray, np.ndarray]:
    """Facade colour at (x, z) on one side, and a mask of 'above the roof'."""
    b = np.clip(np.searchsorted(side.edges, x, side="right") - 1, 0, len(side.height) - 1)
    lx = x - side.edges[b]
    bw = side.edges[b + 1] - side.edges[b]
    above = z > side.height[b]
    col = side.colour[b].copy()
    grain = _hash(np.floor(x / 0.3), np.floor(z / 0.15), s) * 0.12 - 0.06
    col *= (1 + grain)[:, None]
    # ground floor: shop window, door, sign band, optional awning
    ground = z < 3.6
    shop = ground & (z > 0.4) & (z < 2.7) & (lx > 0.6) & (lx < bw - 0.6)
    door = shop & (np.abs(lx - bw * 0.3) < 0.6)
    glass = np.array([0.18, 0.22, 0.26]) + 0.15 * (z / 2.7)[:, None]
    col = np.where(shop[:, None], glass, col)
    col = np.where(door[:, None], np.array([0.30, 0.20, 0.12]), col)
    sign = ground & (z >= 2.85) & (z < 3.45) & (lx > 0.4) & (lx < bw - 0.4)
    letters = _hash(np.floor((lx - 0.4) / 0.35), b, s + 7) > 0.45
    sign_col = np.where((letters & (np.abs(z - 3.15) < 0.18))[:, None], 1.0 - side.sign[b] * 0.8, side.sign[b])
    col = np.where(sign[:, None], sign_col, col)
    awning = side.awning[b] & (z >= 2.5) & (z < 2.85)
    stripes = (np.floor(lx / 0.5) % 2 == 0)[:, None]
    col = np.where(awning[:, None], np.where(stripes, side.sign[b], np.array([0.95, 0.95, 0.9])), col)
    # upper floors: a grid of framed windows
    zu = z - 3.6
    fl = np.floor(zu / side.floor_h[b])
    fz = zu - fl * side.floor_h[b]
    cl = np.floor(lx / side.win_step[b])
    fx = lx - cl * side.win_step[b]
    ww, wh = side.win_w[b] * side.win_step[b], side.win_h[b] * side.floor_h[b]
    x0w, z0w = (side.win_step[b] - ww) / 2, side.floor_h[b] * 0.3
    upper = (~ground) & (z < side.height[b] - 0.8) & (lx > 0.4) & (lx < bw - 0.4)
    frame = upper & (fx > x0w - 0.1) & (fx < x0w + ww + 0.1) & (fz > z0w - 0.1) & (fz < z0w + wh + 0.1)
    pane = upper & (fx > x0w) & (fx < x0w + ww) & (fz > z0w) & (fz < z0w + wh)
    col = np.where(frame[:, None], side.frame[b], col)
    pane_col = np.array([0.20, 0.25, 0.32]) + 0.25 * (fz / side.floor_h[b])[:, None] * np.array([0.6, 0.7, 1.0])
    lit = pane & (_hash(fl, cl, b, s + 11) < light.lit_windows)
    col = np.where(pane[:, None], pane_col, col)
    cornice = (side.cornice[b] & (np.abs(fz) < 0.12) & ~ground) | (z > side.height[b] - 0.45)
    col = np.where(cornice[:, None], col * 0.7, col)
    edge = (lx < 0.12) | (lx > bw - 0.12)
    col = np.where(edge[:, None], col * 0.55, col)
    col = col * light.gain * np.asarray(light.tint) * (light.shadow if s == 1 else 1.0)
    col = np.where(lit[:, None], np.array([1.0, 0.85, 0.55]) * (0.55 + 0.35 * _hash(fl, cl, b, s + 3))[:, None], col)
    return col, above


def _ground(world: World, x: np.ndarray, y: np.ndarray, light: Lighting) -> np.ndarray:
    road = np.abs(y) < HALF_WIDTH - SIDEWALK
    n = _hash(np.floor(x / 0.2), np.floor(y / 0.2), 99) * 0.06
    col = np.where(road[:, None], (0.30 + n)[:, None] * np.ones(3), (0.62 + n)[:, None] * np.array([1.0, 0.97, 0.92]))
    joint = ~road & ((np.abs(x - np.round(x)) < 0.03) | (np.abs(y - np.round(y)) < 0.03))
    col = np.where(joint[:, None], col * 0.75, col)
    kerb = np.abs(np.abs(y) - (HALF_WIDTH - SIDEWALK)) < 0.12
    col = np.where(kerb[:, None], np.array([0.8, 0.8, 0.78]), col)
    dash = (np.abs(y) < 0.08) & ((x % 9.0) < 4.5)
    edge_line = np.abs(np.abs(y) - (HALF_WIDTH - SIDEWALK - 0.4)) < 0.07
    zebra = np.zeros_like(x, dtype=bool)
    lo, hi = (float(x.min()) - 3, float(x.max()) + 3) if x.size else (0.0, 0.0)
    for cx in world.crossings[(world.crossings > lo) & (world.crossings < hi)]:
        zebra |= road & (np.abs(x - cx) < 2.0) & ((np.floor((y + 20) / 0.6) % 2) == 0)
    white = (dash | edge_line | zebra) & road
    col = np.where(white[:, None], np.array([0.88, 0.88, 0.85]), col)
    for mx, my in world.manholes[(world.manholes[:, 0] > lo) & (world.manholes[:, 0] < hi)]:
        col = np.where((((x - mx) ** 2 + (y - my) ** 2) < 0.25)[:, None], col * 0.5, col)
    col = col * light.gain * np.asarray(light.tint)
    if light.lamps > 0:
        pool = np.zeros_like(x)
        for s, side in enumerate(world.sides):
            ys = (HALF_WIDTH - 0.6) * (1 if s == 0 else -1)
            for px in side.poles[(side.poles > lo - 8) & (side.poles < hi + 8)]:
                pool += np.exp(-((x - px) ** 2 + (y - ys) ** 2) / 8.0)
        col = col + light.lamps * 0.35 * np.minimum(pool, 1.5)[:, None] * np.array([1.0, 0.8, 0.5])
    return col


@dataclass(frozen=True)
class Camera:
    x: float
    y: float
    z: float
    yaw_deg: float
    pitch_deg: float


def render(
    world: World, cars: Cars, cam: Camera, light: Lighting, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """Ray-cast one view (supersampled, box-filtered) -> RGB image."""
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    focal = (w / 2) / math.tan(math.radians(FOCAL_FOV_DEG) / 2)
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    cy, sy = math.cos(math.radians(cam.yaw_deg)), math.sin(math.radians(cam.yaw_deg))
    cp, sp = math.cos(math.radians(cam.pitch_deg)), math.sin(math.radians(cam.pitch_deg))
    fwd = np.array([cy * cp, sy * cp, sp])
    left = np.array([-sy, cy, 0.0])
    up = np.cross(fwd, left)
    d = (
        fwd[None, :]
        - ((u.ravel() - w / 2) / focal)[:, None] * left[None, :]
        + ((h / 2 - v.ravel()) / focal)[:, None] * up[None, :]
    )
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    o = np.array([cam.x, cam.y, cam.z])
    far = 1e9
    t_best = np.full(len(d), far)
    col = np.zeros((len(d), 3))
    # sky
    elev = np.clip(dz / np.linalg.norm(d, axis=1), 0, 1)[:, None]
    sky = np.asarray(light.sky_horizon) * (1 - elev) + np.asarray(light.sky_top) * elev
    col[:] = sky
    with np.errstate(divide="ignore", invalid="ignore"):
        # ground
        tg = np.where(dz < 0, -cam.z / dz, far)
        hit = tg < t_best
        gx, gy = o[0] + tg * dx, o[1] + tg * dy
        if hit.any():
            col[hit] = _ground(world, gx[hit], gy[hit], light)
            t_best = np.where(hit, tg, t_best)
        # walls
        for s, side in enumerate(world.sides):
            yw = HALF_WIDTH if s == 0 else -HALF_WIDTH
            tw = np.where(dy * (1 if s == 0 else -1) > 0, (yw - cam.y) / dy, far)
            cand = tw < t_best
            if not cand.any():
                continue
            wx, wz = o[0] + tw * dx, o[2] + tw * dz
            fc, above = _facade(side, s, wx[cand], wz[cand], light)
            idx = np.flatnonzero(cand)
            keep = ~above
            col[idx[keep]] = fc[keep]
            t_best[idx[keep]] = tw[idx[keep]]
        # lamp posts: thin vertical posts with a lamp head (planes x = const);
        # only the image columns a post can cover are traced
        column = np.tile(np.arange(w), h)
        for s, side in enumerate(world.sides):
            ys = (HALF_WIDTH - 0.6) * (1 if s == 0 else -1)
            for px in side.poles[(side.poles > cam.x + 0.5) & (side.poles < cam.x + 250)]:
                rel = np.array([px, ys, 0.0]) - o
                depth = float(rel @ fwd)
                if depth <= 0.3:
                    continue
                uc = w / 2 - float(rel @ left) / depth * focal
                half = 0.7 / depth * focal + 2
                if uc + half < 0 or uc - half > w:
                    continue
                sel = np.flatnonzero((column >= uc - half) & (column <= uc + half))
                tp = (px - cam.x) / dx[sel]
                py, pz = o[1] + tp * dy[sel], o[2] + tp * dz[sel]
                near = (tp > 0) & (tp < t_best[sel])
                on = near & (np.abs(py - ys) < 0.09) & (pz > 0) & (pz < 5.0)
                head = near & (np.abs(py - ys * 0.93) < 0.45) & (np.abs(pz - 5.0) < 0.15)
                m = on | head
                if m.any():
                    c = np.where(
                        head[m][:, None],
                        np.array([0.9, 0.85, 0.6]) * max(light.lamps, light.gain),
                        np.array([0.2, 0.22, 0.2]) * light.gain,
                    )
                    col[sel[m]] = c
                    t_best[sel[m]] = tp[m]
        # parked cars: boxes seen from the street side, as vertical panels
        for s in range(2):
            yc = (HALF_WIDTH - SIDEWALK - 1.0) * (1 if s == 0 else -1)
            tc = np.where(dy * (1 if s == 0 else -1) > 0, (yc - cam.y) / dy, far)
            cx, cz = o[0] + tc * dx, o[2] + tc * dz
            k = np.clip(np.searchsorted(cars.x0[s], cx, side="right") - 1, 0, len(cars.x0[s]) - 1)
            inside = (cx >= cars.x0[s][k]) & (cx < cars.x0[s][k] + cars.length[s][k])
            rel = (cx - cars.x0[s][k]) / cars.length[s][k]
            body = inside & (cz > 0.25) & (cz < 1.45) & (tc < t_best)
            roof = inside & (cz >= 1.0) & (rel > 0.2) & (rel < 0.8)
            paint = cars.colour[s][k] * light.gain * np.asarray(light.tint)
            window = np.array([0.15, 0.17, 0.2]) * max(light.gain, 0.3)
            c = np.where(roof[:, None], window, paint)
            c = np.where(
                (cz < 0.6)[:, None] & ((np.abs(rel - 0.18) < 0.08) | (np.abs(rel - 0.82) < 0.08))[:, None],
                np.array([0.05, 0.05, 0.05]),
                c,
            )
            col[body] = c[body]
            t_best = np.where(body, tc, t_best)
    # aerial perspective: far things fade to the horizon colour
    fog = np.exp(-np.minimum(t_best, 400) / 140.0)[:, None]
    hitsome = (t_best < far)[:, None]
    col = np.where(hitsome, col * fog + np.asarray(light.sky_horizon) * light.gain**0.5 * (1 - fog), col)
    img = np.clip(col.reshape(h, w, 3) * 255.0, 0, 255)
    small = Image.fromarray(img.astype(np.uint8)).resize(size, Image.Resampling.BOX)
    if light.noise > 0:
        arr = np.asarray(small, dtype=np.float32) + rng.normal(0, light.noise, (size[1], size[0], 3))
        small = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return small


# ---- writing a route ------------------------------------------------------------


def _file_name(
    x: float, y: float, heading_rad: float, yaw: float, index: int, tag: str
) -> tuple[str, tuple[float, float]]:
    """dvgl name for a camera at street coordinates (x, y)."""
    ch, sh = math.cos(heading_rad), math.sin(heading_rad)
    east = ORIGIN[0] + x * ch - y * sh
    north = ORIGIN[1] + x * sh + y * ch
    lat, lon = utm_to_latlon(east, north, ZONE)
    compass = (90.0 - math.degrees(heading_rad) - yaw) % 360  # degrees from north, clockwise
    name = dvgl_name(east, north, ZONE, BAND, lat, lon, pano_id=tag, tile=f"{index:05d}", heading=compass)
    return name, (east, north)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, optimize=False)
    return buf.getvalue()


def _describe(params: RouteParams) -> dict[str, Any]:
    p = asdict(params)
    p["size"] = list(params.size)
    return {
        "format": "vpr-synthetic-route",
        "generator_version": GENERATOR_VERSION,
        "params": p,
        "radius_m": params.radius_m,
        "utm_zone": f"{ZONE}{BAND}",
    }


def _generate(tmp: Path, params: RouteParams, progress: bool) -> dict[str, int]:
    ss = np.random.SeedSequence([params.seed, GENERATOR_VERSION])
    world_ss, db_ss, q_ss, layout_ss = ss.spawn(4)
    length = (params.places - 1) * params.spacing
    world = make_world(np.random.default_rng(world_ss), length)
    layout = np.random.default_rng(layout_ss)
    heading = float(layout.uniform(0, 2 * math.pi))
    db_rng, q_rng = np.random.default_rng(db_ss), np.random.default_rng(q_ss)
    db_cars = make_cars(db_rng, length, density=0.5)
    q_cars = make_cars(q_rng, length, density=0.6)
    (tmp / "database").mkdir()
    (tmp / "queries").mkdir()
    bar = tqdm(total=2 * params.places, desc="synthetic route", unit="img", disable=not progress)
    for i in range(params.places):
        x = i * params.spacing
        cam = Camera(x, -2.0, 1.6, 0.0, 2.0)
        name, _ = _file_name(cam.x, cam.y, heading, cam.yaw_deg, i, "db")
        (tmp / "database" / name).write_bytes(_jpeg(render(world, db_cars, cam, LIGHTING["day"], params.size, db_rng)))
        bar.update()
    light = LIGHTING[params.lighting]
    for i in range(params.places):
        cam = Camera(
            i * params.spacing + float(q_rng.uniform(-0.3, 0.3)) * params.spacing,
            float(q_rng.uniform(-3.0, 0.5)),
            float(q_rng.uniform(1.3, 1.9)),
            float(q_rng.uniform(-8, 8)),
            float(q_rng.uniform(-2, 4)),
        )
        name, _ = _file_name(cam.x, cam.y, heading, cam.yaw_deg, i, "q")
        (tmp / "queries" / name).write_bytes(_jpeg(render(world, q_cars, cam, light, params.size, q_rng)))
        bar.update()
    bar.close()
    return {"database": params.places, "queries": params.places}


def make_route(
    out_dir: Path,
    places: int = RouteParams.places,
    seed: int = RouteParams.seed,
    spacing: float = RouteParams.spacing,
    size: tuple[int, int] | str = RouteParams.size,
    lighting: LightingName = RouteParams.lighting,
    radius: float | None = RouteParams.radius,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write (or reuse) a synthetic route folder; returns its path.

    An existing folder made with the same parameters is reused as is; one made
    with other parameters is an error unless `overwrite`. The folder appears
    atomically (generated in a hidden sibling, then renamed).
    """
    params = RouteParams(
        int(places), int(seed), float(spacing), _size(size), lighting, None if radius is None else float(radius)
    ).validate()
    out = Path(out_dir)
    desc = _describe(params)
    if out.exists():
        existing = _read_route(out)
        if (
            existing is not None
            and existing.get("params") == desc["params"]
            and existing.get("generator_version") == GENERATOR_VERSION
        ):
            log.info("synthetic route %s already exists with these parameters; reusing it", out)
            return out
        if any(out.iterdir()) and not overwrite:
            raise ValueError(
                f"{out}: exists and is not a synthetic route with these parameters; "
                "choose another folder or pass overwrite"
            )
    with staged_dir(out) as tmp:
        desc["counts"] = _generate(tmp, params, progress)
        atomic_write_json(tmp / ROUTE_FILE, desc)
    log.info(
        "synthetic route: %d database and %d query views in %s (seed %d)",
        params.places,
        params.places,
        out,
        params.seed,
    )
    return out


def _read_route(folder: Path) -> dict | None:
    try:
        return json.loads((folder / ROUTE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _size(size: tuple[int, int] | list[int] | str) -> tuple[int, int]:
    if isinstance(size, str):
        w, sep, h = size.lower().partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit():
            raise ValueError(f"synthetic route: bad size {size!r}, expected WIDTHxHEIGHT like 160x120")
        return int(w), int(h)
    if len(size) != 2:
        raise ValueError(f"synthetic route: bad size {size!r}, expected (width, height)")
    return int(size[0]), int(size[1])
