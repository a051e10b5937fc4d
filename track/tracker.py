"""THE tracker: a causal forward filter (an HMM) over database places, fed one frame at a time.

A stream or an HTTP session keeps one `Tracker`. Each processed frame brings the
index's top candidates (ids, cosine scores, positions when the index has them);
`observe` predicts the belief forward with a motion model, weighs it by how
well each place matches the frame, and returns a `Fix`: the tracked place, a
confidence in [0, 1] and whether the tracker considers itself localized. Only
the past and the present are used: a stream must answer now.

Why it is built this way:

- **Sparse belief.** The belief lives on the frame's candidates plus the
  places of the previous belief (at most `support` (place, velocity) states).
  Its cost per frame is O(velocities x support x (support + candidates)) and
  never touches the rest of the database, so a 1M-place index costs what a 1k
  one does. A place that is not among the frame's candidates scored at most
  the last candidate's score; it gets `FLOOR_DROP` temperatures below that
  (a missed retrieval is weak evidence against a place, so a good track
  survives a bad frame but does not coast for long on places no frame returns).
- **Motion model from the database** (`DatabaseProfile`, from a bounded sample
  of the metadata in id order). Three modes:
  - `route`: positions (UTM in the index metadata) whose consecutive ids form
    a traversal (one image per place, ids one apart, nearly every step within
    `ROUTE_STEP` x the median step, and that step short against the map). The
    walker moves along the route, in database order, so a velocity is a speed
    along the route and a turn of the route is not a change of velocity. The
    positions still set the confidence (the same spot in other traversals counts).
  - `positions`: positions whose id order is not a route (a photo collection,
    several views per place, ids far apart).
    Distances are metric, divided by the spacing (the median step between
    consecutive ids), and velocities have `DIRECTIONS` compass headings.
  - `order`: no positions; the distance in database order (ids of a traversal
    or a video). The `route` mode moves the same way.
  The `positions` mode's compass headings cost a walk along a route whose
  heading falls between them, or that turns, most of its recall: on the
  validation split with routes of made-up geometry, a route turning by 90
  degrees every 10 places tracked 0.62 in that mode against 0.87 along the
  route (docs/BENCHMARKS.md). A database recorded by walking or driving is a
  traversal, so the `route` mode is what most positioned indexes get.
- **The walker's velocity is part of the state.** The belief is over (place,
  velocity) pairs: velocities on a grid of `SPEED_STEP` spacings per frame up
  to `reach` (signed along the database order; in the `positions` mode's
  plane: `DIRECTIONS` headings per speed), standing still included. Each state moves
  by its own velocity, with a Gaussian of width `width` spacings around where
  it lands, and keeps its velocity from frame to frame except with chance
  `speed_change`. Evidence then accumulates along a consistent walk (as
  SeqSLAM's sequence matching does) instead of around where the walker was: a
  filter with one shared velocity estimate follows its own mistakes, and one
  without velocity is pulled to places that match many frames. Stopping,
  changing speed and turning back are a change of velocity state. Frames
  that were never observed (dropped by newest-frame-wins, a client that skips)
  are counted by `at`: the states move by velocity x frames elapsed, the width
  grows with their square root, and the chances of a jump and of a velocity
  change compound per frame.
- **Kidnapping.** Each frame the walker may jump anywhere with chance
  `teleport`. Because the observation model is only defined on what the index
  returned, "anywhere" is spread uniformly over the frame's candidates: the
  retrieval is the proposal. A lost walker's true place then gains the score
  ratio of the top candidates over the last one per frame until it wins; the
  re-localization bound is measured in tests/track and bench/track_relocalize.py.
- **Several traversals of one route.** Each traversal is a chain of ids that
  the walker moves along (in the `route` and `order` modes), and the belief
  splits among the chains. With positions, places of different traversals at
  one spot are equivalent for the estimate: its confidence is computed on mass
  summed within `reach` spacings (so a split between traversals does not lower
  it). Without positions the tracker cannot know that two ids are one place:
  the confidence is the share of the chain it reports (honestly lower); the
  reported place is still a right one.
- **Generic places.** A candidate's score is lowered by `hub_weight` times its
  place's hubness, when the index has it (index/hubness.py: the mean cosine of
  the place to its most similar places elsewhere on the map, each relative to
  the map's usual cosine at that distance). Compressed night
  frames land near a few generic-looking places scattered along the route;
  without this a belief that may stand still settles on them.
- **Standing or moving, from the frames themselves** (`frame_motion`). A
  stretch of degraded night frames can match one place as well as the
  walker's own, and "the walker stands there" then explains them best: the
  belief stalls while the walker moves on (on Gardens Point at night, H.264
  QP 40, the tracked misses were such 5-8 frame stalls). Frames of a walker
  who stands are nearly alike; frames of one who moves are as different as
  database places a spacing apart, or more. So each frame's descriptor is
  compared with the last one's (cosine c) against the database's own cosine
  between places one spacing apart (mean m, spread s; `DatabaseProfile.step`,
  which an index build records): standing states are weighed by N(c; 1, s),
  moving states and the jump by 1 when c <= m, else N(c; m, s). It tells
  standing from moving, not a speed: heavily compressed frames are more alike
  than database places as far apart, and reading a speed off c made the
  validation walks worse. Chosen by a rule fixed before the run, on
  validation data only (docs/BENCHMARKS.md). What it costs: a walker who
  moves much less than a spacing per frame (a fast camera on a sparse map)
  reads as standing, which is also the nearest velocity of the grid; and a
  jump while consecutive frames stay alike is weighed by the moving
  likelihood, so such a walker re-localizes somewhat later.
- **Observation likelihood.** exp(score / T), normalised over the support. T
  is `temperature` times the running median of the spread (standard deviation)
  of the candidates' scores over this stream's frames so far, so it adapts to the model and the
  query quality (a student at night scores lower and flatter) from the stream
  itself, with nothing fitted to test queries; a frame whose candidates are
  all alike (uninformative) then moves the belief less than a distinctive one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vpr.settings import TrackSettings

SPREAD_WINDOW = 64  # frames whose score spread sets the temperature
MIN_SPREAD = 1e-12  # candidates that all tie (an uninformative frame) do not set the temperature
FLOOR_DROP = 2.0  # a place the index did not return: this many temperatures below the last one it did
MIN_CUE = 1e-30  # the smaller of the standing/moving likelihoods at least this share of the larger
SPEED_STEP = 0.5  # spacings per frame between the velocities a state can have
DIRECTIONS = 8  # headings per speed in the plane (the `positions` mode)
PROFILE_SAMPLE = 4096  # metadata rows read (in id order) to profile a database
ROUTE_STEP = 3.0  # a step between consecutive ids longer than this many spacings leaves the route
ROUTE_SHARE = 0.9  # ... and positions form a route when at least this share of the steps stays on it
ROUTE_LOCAL = 0.5  # ... and the spacing is at most half the median distance between two places (a photo collection: ~1)


@dataclass(frozen=True)
class DatabaseProfile:
    """What the motion model needs to know about a database, from a bounded sample."""

    count: int  # places in the index
    positions: bool  # metric positions (UTM) for the places
    spacing: float  # metres between consecutive places (positions), 1 id otherwise
    route: bool = False  # positions whose consecutive ids form a traversal: motion along the id order
    # (mean, spread) of the cosine between two database places one spacing apart
    # (index/hubness.step_similarity); None: the tracker reads no motion from the frames
    step: tuple[float, float] | None = None

    @property
    def mode(self) -> str:
        if not self.positions:
            return "order"
        return "route" if self.route else "positions"

    @property
    def planar(self) -> bool:
        """Motion in the plane with compass headings (positions that do not form a route)."""
        return self.positions and not self.route

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        count: int,
        ids: Sequence[int] | None = None,
        step: tuple[float, float] | None = None,
    ) -> DatabaseProfile:
        """Profile from metadata rows in id order (`utm_e`, `utm_n` when known).

        Positions are used only when every sampled row has them and they are not
        all at one point; the spacing is the median of the non-zero steps
        between consecutive rows (a traversal's own sampling distance; one jump
        between traversals or a few stops do not move a median). They form a
        route when at least `ROUTE_SHARE` of those steps are within `ROUTE_STEP`
        spacings (the jumps between concatenated traversals are a few steps) and
        a step is short against the map (`ROUTE_LOCAL`: consecutive places of a
        photo collection are as far apart as any two), and the ids are of one
        image per place, one apart (`ids`: the rows' ids, None: consecutive), as
        the route mode moves by id: several views at one spot, or ids that skip,
        keep the metric `positions` mode. `step`: the index's step similarity
        record (passed through)."""
        xy = positions_of(rows)
        if len(rows) < 2 or np.isnan(xy).any():
            return cls(int(count), False, 1.0, step=step)
        all_steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        steps = all_steps[all_steps > 1e-6]
        if steps.size == 0:
            return cls(int(count), False, 1.0, step=step)
        spacing = float(np.median(steps))
        some = xy[np.unique(np.linspace(0, len(xy) - 1, min(len(xy), 256)).astype(np.int64))]
        pairs = np.linalg.norm(some[:, None] - some[None, :], axis=2)[np.triu_indices(len(some), 1)]
        id_steps = np.diff(np.asarray(ids, np.int64)) if ids is not None else np.ones(len(rows) - 1)
        route = (
            float(np.mean(all_steps <= ROUTE_STEP * spacing)) >= ROUTE_SHARE
            and float(np.mean(all_steps > 1e-6)) >= ROUTE_SHARE  # one image per place
            and float(np.mean(id_steps == 1)) >= ROUTE_SHARE  # ids one apart
            and spacing <= ROUTE_LOCAL * float(np.median(pairs))
        )
        return cls(int(count), True, spacing, route, step)


def positions_of(metas: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
    """(N, 2) UTM easting/northing in metres; NaN rows where a place has none."""
    out = np.full((len(metas), 2), np.nan)
    for i, m in enumerate(metas):
        if not m:
            continue
        e, n = m.get("utm_e"), m.get("utm_n")
        if e is not None and n is not None:
            out[i] = (float(e), float(n))
    return out


@dataclass(frozen=True)
class Fix:
    """Where the tracker places the walker after one frame."""

    id: int  # the tracked database place
    confidence: float  # belief mass within `reach` spacings of it, in [0, 1]
    localized: bool  # confidence >= the `localized` setting
    frames: int  # frames observed since the tracker started
    meta: Any  # what the caller attached to this place (label, position, ...)


class Tracker:
    """One stream's belief over (place, velocity) states (not thread-safe: one caller at a time)."""

    def __init__(self, settings: TrackSettings, profile: DatabaseProfile) -> None:
        self.settings, self.profile = settings, profile
        self.velocities = velocity_grid(settings.reach, profile.planar)
        self.reset()

    def reset(self) -> None:
        # one row per state: its place, the place's coordinates, its velocity (row of `velocities`), its mass
        self.ids = np.zeros(0, np.int64)
        self.xy = np.zeros((0, 2))
        self.vk = np.zeros(0, np.int64)
        self.mass = np.zeros(0)
        self.metas: dict[int, Any] = {}
        self.spreads: deque[float] = deque(maxlen=SPREAD_WINDOW)
        self.frames = 0
        self.last_at: float | None = None
        self.last_desc: np.ndarray | None = None  # the last frame's descriptor (unit length, float16)

    @property
    def nbytes(self) -> int:
        """Memory of the belief (bounded by `support`), for session accounting."""
        arrays = (self.ids, self.xy, self.vk, self.mass, self.velocities)
        desc = self.last_desc.nbytes if self.last_desc is not None else 0
        return int(sum(a.nbytes for a in arrays) + 64 * len(self.metas) + desc)

    # ---- one frame ---------------------------------------------------------------
    def observe(
        self,
        ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
        at: float | None = None,
        hubness: Sequence[float] | np.ndarray | None = None,
        descriptor: Sequence[float] | np.ndarray | None = None,
    ) -> Fix | None:
        """Update with one frame's candidates (best first); None when it has none.

        `metas`: per candidate, what to report for it (and its `utm_e`/`utm_n`
        when the index has positions). `at`: the frame's number in its stream (or any
        clock in frames); the frames elapsed since the last observation widen
        the motion, and None counts one. `hubness`: per candidate, how generic
        its place looks (index/hubness.py); `hub_weight` of it is taken off
        its score, so that places that match any frame do not pull the belief.
        `descriptor`: the frame's own descriptor; how alike it is to the last
        frame's tells standing from moving (`_motion_cue`)."""
        if hubness is not None:
            raw, hub = np.asarray(scores, np.float64).ravel(), np.asarray(hubness, np.float64).ravel()
            if hub.shape != raw.shape:
                raise ValueError(f"{raw.size} scores but {hub.size} hubness values")
            scores = raw - self.settings.hub_weight * np.nan_to_num(hub)
        cand, score, cmeta = self._candidates(ids, scores, metas)
        cue = self._motion_cue(descriptor)  # after the checks: a refused frame is not remembered
        if cand.size == 0:
            return None
        steps = 1.0
        if at is not None:
            if self.last_at is not None:
                steps = max(1.0, float(at) - self.last_at)
            self.last_at = float(at)
        s = self.settings
        # the places a state can land on: the frame's candidates, then the belief's other places
        places, first = np.unique(self.ids, return_index=True)
        carried = ~np.isin(places, cand)
        u_ids = np.concatenate([cand, places[carried]])
        cxy = positions_of(cmeta) if self.profile.positions else np.zeros((cand.size, 2))
        u_xy = np.concatenate([cxy, self.xy[first][carried]])
        prior = self._predict(u_ids, u_xy, cand.size, steps, cue)  # (places, velocities)
        # observation: exp(score / T) per place; places not retrieved: FLOOR_DROP temperatures below the last candidate
        spread = float(np.std(score)) if score.size > 1 else 0.0
        if spread > MIN_SPREAD:
            self.spreads.append(spread)
        temp = s.temperature * float(np.median(self.spreads)) if self.spreads else 1.0
        u_score = np.concatenate([score, np.full(u_ids.size - cand.size, score.min() - FLOOR_DROP * temp)])
        with np.errstate(divide="ignore"):
            log_post = (np.log(prior) + ((u_score - score.max()) / temp)[:, None]).ravel()
        post = np.exp(log_post - log_post.max())
        # keep the heaviest states (the rest is negligible mass by construction)
        keep = np.argsort(-post, kind="stable")[: s.support]
        place, self.vk = np.divmod(keep, len(self.velocities))
        self.ids, self.xy = u_ids[place], u_xy[place]
        self.mass = post[keep] / post[keep].sum()
        new_meta = dict(zip(cand.tolist(), cmeta))
        self.metas = {int(i): new_meta.get(int(i), self.metas.get(int(i))) for i in np.unique(self.ids)}
        self.frames += 1
        return self.fix()

    def _motion_cue(self, descriptor: Sequence[float] | np.ndarray | None) -> tuple[float, float] | None:
        """(likelihood of standing, of moving) from the cosine c of this frame's
        descriptor with the last frame's, against the database's cosine between
        places one spacing apart (mean m, spread s; `DatabaseProfile.step`).
        Standing: N(c; 1, s), frames of one view nearly alike. Moving: 1 when
        c <= m (frames as different as places a spacing apart, or more), else
        N(c; m, s). It only tells standing from moving, not a speed: heavily
        compressed frames are more alike than database places the same
        distance apart, which would read as too slow. Scaled so that the larger
        is 1 (only their ratio matters; both underflowing would empty the
        belief), the smaller at least `MIN_CUE`. None (no cue) for the first
        frame, without a descriptor or the database's record, or when
        `frame_motion` is off. Remembers this frame's descriptor (and forgets the
        last one when this frame has none: the next frame is not compared with
        an older one)."""
        step = self.profile.step
        if not self.settings.frame_motion or step is None or not (step[1] > 0 and math.isfinite(step[0])):
            return None
        d = None if descriptor is None else np.asarray(descriptor, np.float32).ravel()
        norm = float(np.linalg.norm(d)) if d is not None else 0.0
        last, self.last_desc = self.last_desc, None
        if d is None or not math.isfinite(norm) or norm <= 0:
            return None
        d = d / norm  # a new array: the caller's descriptor stays as it is
        self.last_desc = d.astype(np.float16)
        if last is None or last.shape != d.shape:
            return None
        c = float(np.dot(last.astype(np.float32), d))
        mean, spread = step
        log_stand = -0.5 * ((c - 1.0) / spread) ** 2
        log_move = 0.0 if c <= mean else -0.5 * ((c - mean) / spread) ** 2
        top = max(log_stand, log_move)
        return max(MIN_CUE, math.exp(log_stand - top)), max(MIN_CUE, math.exp(log_move - top))

    def _predict(
        self, u_ids: np.ndarray, u_xy: np.ndarray, n_cand: int, steps: float, cue: tuple[float, float] | None = None
    ) -> np.ndarray:
        """Prior mass of each (place, velocity) after `steps` frames: each state
        keeps or changes its velocity, then moves by it (a Gaussian of width
        `width` around where it lands); the jump mass lands on the candidates,
        spread evenly over velocities (a re-localizing walker's speed is unknown).
        With a motion `cue` (standing, moving likelihoods), the standing states
        are weighed by the first and the moving states and the jump by the second."""
        s, n_vel = self.settings, len(self.velocities)
        jump = 1.0 - (1.0 - s.teleport) ** steps
        prior = np.zeros((u_ids.size, n_vel))
        prior[:n_cand] = (jump if self.ids.size else 1.0) / (n_cand * n_vel)
        if self.ids.size == 0:
            return prior
        if cue is not None:
            prior *= cue[1]
        change = 1.0 - (1.0 - s.speed_change) ** steps
        sigma = s.width * math.sqrt(steps)
        to, src = self._coords(u_ids, u_xy), self._coords(self.ids, self.xy)
        offset = to[:, None, :] - src[None, :, :]  # (places, states, 2) in spacings
        offset = np.nan_to_num(offset, nan=np.inf)  # a place without a position is unreachable by motion
        # mass of each state spread over velocities: kept with 1 - change, else evenly over the others
        moved = np.full((self.ids.size, n_vel), self.mass[:, None] * change / max(1, n_vel - 1))
        moved[np.arange(self.ids.size), self.vk] = self.mass * (1.0 - change)
        moved *= (1.0 - jump) / _lattice_sum(sigma)
        if cue is not None:
            moved *= np.where(np.linalg.norm(self.velocities, axis=1) == 0, cue[0], cue[1])[None, :]
        for k, v in enumerate(self.velocities):
            miss = ((offset - v * steps) ** 2).sum(axis=2)  # (places, states), squared spacings
            prior[:, k] += np.exp(-0.5 * miss / sigma**2) @ moved[:, k]
        return prior

    def fix(self) -> Fix | None:
        """The current estimate: the place of most belief (summed over its
        velocities; summing over neighbouring places would pull the estimate
        towards the trailing mass behind a moving walker), with the belief
        within `reach` spacings of it as the confidence (so a split among
        traversals at one spot does not lower it)."""
        if self.ids.size == 0:
            return None
        places, mass, xy = self._places()
        best = int(np.argmax(mass))
        near = self._distance(places, xy, places[best : best + 1], xy[best : best + 1])[:, 0] <= self.settings.reach
        conf = float(np.clip(mass[near].sum(), 0.0, 1.0))
        pid = int(places[best])
        return Fix(pid, conf, conf >= self.settings.localized, self.frames, self.metas.get(pid))

    def ranking(self) -> np.ndarray:
        """Places of the belief, most likely first."""
        places, mass, _ = self._places()
        return places[np.argsort(-mass, kind="stable")]

    # ---- helpers -----------------------------------------------------------------
    def _places(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The belief's places (ascending ids), their mass over all velocities, their coordinates."""
        places, first, inverse = np.unique(self.ids, return_index=True, return_inverse=True)
        return places, np.bincount(inverse, weights=self.mass, minlength=places.size), self.xy[first]

    def _candidates(
        self,
        ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        metas: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[np.ndarray, np.ndarray, list[Mapping[str, Any] | None]]:
        ids_a = np.asarray(ids, np.int64).ravel()
        sc = np.asarray(scores, np.float64).ravel()
        if ids_a.shape != sc.shape:
            raise ValueError(f"{ids_a.size} candidate ids but {sc.size} scores")
        mlist: list[Mapping[str, Any] | None] = list(metas) if metas is not None else [None] * ids_a.size
        if len(mlist) != ids_a.size:
            raise ValueError(f"{ids_a.size} candidate ids but {len(mlist)} metadata entries")
        good = (ids_a >= 0) & np.isfinite(sc)
        _, first = np.unique(ids_a, return_index=True)
        unique = np.zeros(ids_a.size, bool)
        unique[first] = True
        sel = np.flatnonzero(good & unique)[: self.settings.candidates]
        return ids_a[sel], sc[sel], [mlist[i] for i in sel]

    def _coords(self, ids: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Where places are for the motion model, in spacings: their positions
        (planar mode), or their ids along one axis (route and order modes)."""
        if self.profile.planar:
            return xy / self.profile.spacing
        return np.stack([ids.astype(float), np.zeros(ids.size)], axis=1)

    def _distance(
        self,
        a_ids: np.ndarray,
        a_xy: np.ndarray,
        b_ids: np.ndarray,
        b_xy: np.ndarray,
    ) -> np.ndarray:
        """Distances in database spacings (metric with positions, so that the
        same spot in another traversal is near; in id order without) from each
        `b` to each `a`."""
        if self.profile.positions:
            a, b = a_xy / self.profile.spacing, b_xy / self.profile.spacing
        else:
            a, b = self._coords(a_ids, a_xy), self._coords(b_ids, b_xy)
        d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
        return np.where(np.isnan(d), np.inf, d)


def velocity_grid(fastest: float, plane: bool) -> np.ndarray:
    """(V, 2) velocities in spacings per frame: standing still, then every
    `SPEED_STEP` up to `fastest`, both ways along the database order (x), or in
    `DIRECTIONS` headings in the plane (the `positions` mode)."""
    speeds = np.arange(1, int(fastest / SPEED_STEP + 1e-9) + 1) * SPEED_STEP
    if not plane:
        along = np.concatenate([[0.0], speeds, -speeds])
        return np.stack([along, np.zeros_like(along)], axis=1)
    angles = np.arange(DIRECTIONS) * (2 * math.pi / DIRECTIONS)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.concatenate([np.zeros((1, 2)), (speeds[:, None, None] * ring[None]).reshape(-1, 2)])


def _lattice_sum(sigma: float) -> float:
    """Sum of the Gaussian kernel over places one spacing apart: the kernel's
    normaliser, so that motion and jump mass compare on one scale."""
    if sigma > 4.0:
        return sigma * math.sqrt(2 * math.pi)
    m = np.arange(-int(8 * sigma) - 1, int(8 * sigma) + 2)
    return float(np.exp(-0.5 * (m / sigma) ** 2).sum())
