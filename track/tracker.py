"""THE tracker: a causal forward filter (an HMM) over database places, fed one frame at a time.

A stream or an HTTP session keeps one `Tracker`. Each processed frame brings the
index's top candidates (ids, cosine scores, positions when the index has them);
`observe` predicts the belief forward with a motion model, weighs it by how
well each place matches the frame, and returns a `Fix`: the tracked place, a
confidence in [0, 1] and whether the tracker considers itself localized. Only
the past and the present are used: a stream must answer now.

Why it is built this way:

- **Sparse belief.** The belief lives on the frame's candidates plus the
  places carried from the previous belief (at most `support` of them). Its cost
  per frame is O(support x (support + candidates)) and never touches the rest
  of the database, so a 1M-place index costs what a 1k one does. A place that
  is not among the frame's candidates scored at most the last candidate's
  score, so it gets that score (an upper bound: carried places are not
  penalised for a missed retrieval, which keeps a good track through a bad frame).
- **Motion model from the database.** With positions (UTM in the index
  metadata) the distance between places is metric, divided by the database's
  spacing (the median step between consecutive places in id order, from a
  bounded sample of the metadata: `DatabaseProfile`). Without positions it is
  the distance in database order (ids of a traversal or a video). The kernel is
  a Gaussian in those units of width `reach`, centred where each place would
  be after moving at the estimated velocity (an exponential average of the
  estimate's own steps, so the estimate does not trail a moving walker; a
  standing walker has velocity near zero). Stopping, changing speed and turning
  back stay inside the kernel and the velocity follows within a few frames.
  Frames that were never observed (dropped by newest-frame-wins, a client that
  skips) are counted by `at`: the prediction moves by velocity x frames elapsed,
  its width grows with their square root (speed uncertainty adds up like a
  random walk) and the jump chance compounds per frame.
- **Kidnapping.** Each frame the walker may jump anywhere with chance
  `teleport`. Because the observation model is only defined on what the index
  returned, "anywhere" is spread uniformly over the frame's candidates: the
  retrieval is the proposal. A lost walker's true place then gains the score
  ratio of the top candidates over the last one per frame until it wins; the
  re-localization bound is measured in tests/track and bench/track_gardens.py.
- **Several traversals of one route.** With positions, places of different
  traversals at one spot are equivalent: the belief splits among them, and the
  estimate and confidence are computed on mass summed within `reach` spacings
  (so a split between traversals does not lower the confidence). In order-only
  mode the tracker cannot know that two ids are one place: each traversal is a
  separate chain, the belief splits among them and the confidence is the share
  of the chain it reports (honestly lower); the reported place is still a right one.
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
VELOCITY_RATE = 0.3  # weight of the newest step in the estimated velocity
PROFILE_SAMPLE = 4096  # metadata rows read (in id order) to profile a database


@dataclass(frozen=True)
class DatabaseProfile:
    """What the motion model needs to know about a database, from a bounded sample."""

    count: int  # places in the index
    positions: bool  # metric positions (UTM) for the places
    spacing: float  # metres between consecutive places (positions), 1 id otherwise

    @property
    def mode(self) -> str:
        return "positions" if self.positions else "order"

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], count: int) -> DatabaseProfile:
        """Profile from metadata rows in id order (`utm_e`, `utm_n` when known).

        Positions are used only when every sampled row has them and they are not
        all at one point; the spacing is the median of the non-zero steps
        between consecutive rows (a traversal's own sampling distance; one jump
        between traversals or a few stops do not move a median)."""
        xy = positions_of(rows)
        if len(rows) < 2 or np.isnan(xy).any():
            return cls(int(count), False, 1.0)
        steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        steps = steps[steps > 1e-6]
        if steps.size == 0:
            return cls(int(count), False, 1.0)
        return cls(int(count), True, float(np.median(steps)))


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
    """One stream's belief over database places (not thread-safe: one caller at a time)."""

    def __init__(self, settings: TrackSettings, profile: DatabaseProfile) -> None:
        self.settings, self.profile = settings, profile
        self.reset()

    def reset(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.mass = np.zeros(0)
        self.xy = np.zeros((0, 2))
        self.metas: dict[int, Any] = {}
        self.spreads: deque[float] = deque(maxlen=SPREAD_WINDOW)
        self.frames = 0
        self.last_at: float | None = None
        self.smoothed = np.zeros(0)
        self.velocity = np.zeros(2)  # estimated motion per frame, in coordinates (metres, or ids along x)
        self.last_point: np.ndarray | None = None  # coordinates of the previous estimate

    @property
    def nbytes(self) -> int:
        """Memory of the belief (bounded by `support`), for session accounting."""
        return int(self.ids.nbytes + self.mass.nbytes + self.xy.nbytes + self.smoothed.nbytes + 64 * len(self.metas))

    # ---- one frame ---------------------------------------------------------------
    def observe(
        self,
        ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
        at: float | None = None,
    ) -> Fix | None:
        """Update with one frame's candidates (best first); None when it has none.

        `metas`: per candidate, what to report for it (and its `utm_e`/`utm_n`
        in positions mode). `at`: the frame's number in its stream (or any
        clock in frames); the frames elapsed since the last observation widen
        the motion, and None counts one."""
        cand, score, cmeta = self._candidates(ids, scores, metas)
        if cand.size == 0:
            return None
        steps = 1.0
        if at is not None:
            if self.last_at is not None:
                steps = max(1.0, float(at) - self.last_at)
            self.last_at = float(at)
        s = self.settings
        cxy = positions_of(cmeta) if self.profile.positions else np.zeros((cand.size, 2))
        carried = ~np.isin(self.ids, cand)
        u_ids = np.concatenate([cand, self.ids[carried]])
        u_xy = np.concatenate([cxy, self.xy[carried]])
        # prediction: motion of the previous belief plus the jump mass on the candidates
        jump = 1.0 - (1.0 - s.teleport) ** steps
        prior = np.zeros(u_ids.size)
        prior[: cand.size] = (jump if self.ids.size else 1.0) / cand.size
        if self.ids.size:
            sigma = s.reach * math.sqrt(steps)
            shift = self.velocity * steps
            kernel = np.exp(-0.5 * (self._distance(u_ids, u_xy, self.ids, self.xy, shift) / sigma) ** 2)
            prior += (1.0 - jump) * (np.nan_to_num(kernel) @ self.mass) / _lattice_sum(sigma)
        # observation: exp(score / T); places not retrieved get the last candidate's score
        spread = float(np.std(score)) if score.size > 1 else 0.0
        if spread > MIN_SPREAD:
            self.spreads.append(spread)
        temp = s.temperature * float(np.median(self.spreads)) if self.spreads else 1.0
        u_score = np.concatenate([score, np.full(u_ids.size - cand.size, score.min() - FLOOR_DROP * temp)])
        with np.errstate(divide="ignore"):
            log_post = np.log(prior) + (u_score - score.max()) / temp
        post = np.exp(log_post - log_post.max())
        post /= post.sum()
        # keep the heaviest places (the rest is negligible mass by construction)
        keep = np.argsort(-post, kind="stable")[: s.support]
        self.ids, self.mass, self.xy = u_ids[keep], post[keep] / post[keep].sum(), u_xy[keep]
        new_meta = dict(zip(cand.tolist(), cmeta))
        self.metas = {int(i): new_meta.get(int(i), self.metas.get(int(i))) for i in self.ids}
        self.frames += 1
        fix = self.fix()
        if fix is not None:
            self._update_velocity(fix.id, steps)
        return fix

    def fix(self) -> Fix | None:
        """The current estimate: the place of most belief (its own mass: summing
        over a window would pull the estimate towards the trailing mass behind
        a moving walker), with the belief within `reach` spacings of it as the
        confidence (so a split among traversals at one spot does not lower it)."""
        if self.ids.size == 0:
            return None
        near = self._distance(self.ids, self.xy, self.ids, self.xy) <= self.settings.reach
        self.smoothed = np.clip(near.astype(float) @ self.mass, 0.0, 1.0)
        best = int(np.argmax(self.mass))
        conf = float(self.smoothed[best])
        pid = int(self.ids[best])
        return Fix(pid, conf, conf >= self.settings.localized, self.frames, self.metas.get(pid))

    def ranking(self) -> np.ndarray:
        """Places of the belief, most likely first."""
        return self.ids[np.argsort(-self.mass, kind="stable")]

    # ---- helpers -----------------------------------------------------------------
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
        """Where places are: their positions (metres), or their ids along one axis."""
        if self.profile.positions:
            return xy
        return np.stack([ids.astype(float), np.zeros(ids.size)], axis=1)

    def _distance(
        self,
        a_ids: np.ndarray,
        a_xy: np.ndarray,
        b_ids: np.ndarray,
        b_xy: np.ndarray,
        shift: np.ndarray | None = None,
    ) -> np.ndarray:
        """Distances in database spacings (metric with positions, in id order
        without) from each `b` moved by `shift` to each `a`."""
        b = self._coords(b_ids, b_xy)
        if shift is not None:
            b = b + shift
        d = np.linalg.norm(self._coords(a_ids, a_xy)[:, None, :] - b[None, :, :], axis=2) / self.profile.spacing
        return np.where(np.isnan(d), np.inf, d)

    def _update_velocity(self, pid: int, steps: float) -> None:
        """Follow the estimate's motion (an exponential average of its steps):
        the prediction then moves the belief with the walker instead of
        leaving it where it was, which would make the estimate trail a
        moving walker. A step longer than `reach` (a jump, a switch between
        traversals) does not count; a stop or a turn is followed within a few frames."""
        k = int(np.flatnonzero(self.ids == pid)[0])
        point = self._coords(self.ids[k : k + 1], self.xy[k : k + 1])[0]
        if self.last_point is not None and np.isfinite(point).all() and np.isfinite(self.last_point).all():
            step = (point - self.last_point) / steps
            if np.linalg.norm(step) / self.profile.spacing <= self.settings.reach:
                self.velocity = (1 - VELOCITY_RATE) * self.velocity + VELOCITY_RATE * step
        self.last_point = point


def _lattice_sum(sigma: float) -> float:
    """Sum of the Gaussian kernel over places one spacing apart: the kernel's
    normaliser, so that motion and jump mass compare on one scale."""
    if sigma > 4.0:
        return sigma * math.sqrt(2 * math.pi)
    m = np.arange(-int(8 * sigma) - 1, int(8 * sigma) + 2)
    return float(np.exp(-0.5 * (m / sigma) ** 2).sum())
