"""How generic each database place looks: its hubness among the database itself.

A degraded query (a dark, blocky, compressed frame) tends to land near a few
database places whose descriptors look like "anything": they are the
per-frame answer to many frames scattered along a walk, and a tracker that
may stand still settles on them. A place's hubness is how much more similar
it is to its `HUB_K` most similar database places *elsewhere* on the map
(farther than `HUB_EXCLUDE` database spacings: its own neighbours along the
route, and the same spot in other traversals, do not count) than places that
far apart usually are. Subtracting a share of it from a candidate's score
(`TrackSettings.hub_weight`; the cross-domain similarity local scaling of
Conneau et al. 2018, with the database as its own reference set) makes generic
places compete on equal terms.

"Usually" is the map's own similarity profile: the mean cosine of two places
at each distance (whole spacings along the id order, or metric with positions),
made non-increasing with distance, taken off each pair's cosine before the
top-`HUB_K` mean. On a map of distinct scenes the profile is flat beyond a few
spacings and changes nothing; on a short street whose look changes slowly it
is what keeps the middle of the street (with more of the street within a few
spacings) from looking generic and its ends distinctive. Without it, on a
27-place street sampled every 0.5 m, a leave-one-out walk over the database's
own frames tracked 0.735 with hubness and 0.775 without; with it, 0.88
(docs/BENCHMARKS.md).

Computed once per index build from the descriptors in hand (exact, batched
inner products; the profile from up to `PROFILE_ROWS` rows), stored beside the
index (`HUB_FILE`, read without pickle) and recorded in its manifest. The
exact computation costs N x N x D multiply-adds; beyond `HUB_MAX_WORK` it is
skipped (logged, and the manifest says so), and the tracker then uses the raw
scores. Edits (add/remove) change other places' neighbourhoods and do not
carry it over: a rebuild restores it.

The build also records one more statistic of the map (`step_similarity`,
`STEP_KEY` in the manifest): the mean and spread of the cosine between two
places one spacing apart. The tracker holds two consecutive frames' cosine
against it to tell a walker who stands (frames nearly alike) from one who
moves (frames as different as places a spacing apart, or more). It is cheap
(at most `STEP_PAIRS` dot products of consecutive places), so it is recorded at
any size, and an edit keeps it (a few places more or less hardly move a mean).

The defaults were chosen on validation data only (bench/track_validate.py's
split of `day_left`, and walks over database frames; docs/BENCHMARKS.md),
never on test queries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HUB_FILE = "hubness.npz"  # ids and hubness, in id order
HUB_KEY = "hubness"  # the manifest's record of it
HUB_RELATIVE_TO = "distance profile"  # what the record says each cosine is taken relative to (absent: raw cosines)
HUB_K = 10  # most similar places elsewhere whose similarity is averaged
HUB_EXCLUDE = 3.0  # database spacings around a place that are "the same place"
HUB_MAX_WORK = 2e13  # N x N x D multiply-adds at most (a few minutes on 2 cores)
BATCH_FLOATS = 1 << 25  # similarity entries per batch (128 MB of float32; with positions the
# batch's distances take about four times that)
PROFILE_ROWS = 2048  # rows (evenly spread) whose similarities to every place give the distance profile
PROFILE_MIN_BINS = 64  # the profile runs to max(this, N) spacings; farther counts as that far
STEP_KEY = "step_similarity"  # the manifest's record of how alike places one spacing apart are
STEP_PAIRS = 4096  # consecutive places (evenly spread) whose cosine gives the step similarity


def hubness(x: np.ndarray, positions: Sequence[tuple[float, float] | None] | None = None) -> np.ndarray | None:
    """Per row of `x` (L2-normalised descriptors in id order), the mean over its
    `HUB_K` most similar rows farther than `HUB_EXCLUDE` spacings away of their
    cosine minus the map's usual cosine at that distance (`distance_profile`);
    None when the database is too large to compute it exactly (or has no
    place outside any neighbourhood).

    `positions`: UTM (easting, northing) per row. When every row has one, the
    distances are metric, in spacings (the median non-zero step between
    consecutive rows); otherwise they are the row order (a traversal or a video)."""
    n, dim = x.shape
    if float(n) * n * dim > HUB_MAX_WORK:
        log.warning(
            "hubness skipped: %d places x %d-d exceeds %.0e multiply-adds (the tracker uses raw scores)",
            n,
            dim,
            HUB_MAX_WORK,
        )
        return None
    log.info("hubness of %d places (%d-d, %.1e multiply-adds)", n, dim, float(n) * n * dim)
    distance = _distances(positions, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    profile = distance_profile(x, distance)
    out = np.empty(n, np.float32)
    rows = max(1, BATCH_FLOATS // max(1, n))
    k = min(HUB_K, n)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        d = distance(np.arange(a, b))
        sim = x[a:b] @ x.T
        sim -= profile[_bins(d, profile.size - 1)]
        sim[d <= HUB_EXCLUDE] = -np.inf
        top = -np.partition(-sim, k - 1, axis=1)[:, :k]
        finite = np.isfinite(top)
        count = finite.sum(axis=1)
        out[a:b] = np.where(count > 0, np.where(finite, top, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    if np.isnan(out).all():
        return None
    return np.nan_to_num(out, nan=float(np.nanmean(out)))  # a place with nothing elsewhere: the average


def distance_profile(x: np.ndarray, distance: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The map's mean cosine between two places per whole number of spacings
    between them (index: the distance), from up to `PROFILE_ROWS` evenly spread
    rows against every row, made non-increasing with distance (a distance with
    no pair, or a rise such as the same spot in a second traversal far along
    the id order, takes the value before it)."""
    n = len(x)
    cap = max(PROFILE_MIN_BINS, n)  # farther than this many spacings counts as this far (flat out there)
    rows = np.unique(np.linspace(0, n - 1, min(n, PROFILE_ROWS)).astype(np.int64))
    total, count = np.zeros(cap + 1), np.zeros(cap + 1)
    step = max(1, BATCH_FLOATS // max(1, n))
    for a in range(0, rows.size, step):
        part = rows[a : a + step]
        bins = _bins(distance(part), cap).ravel()
        total += np.bincount(bins, weights=(x[part] @ x.T).ravel(), minlength=cap + 1)
        count += np.bincount(bins, minlength=cap + 1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return np.minimum.accumulate(mean).astype(np.float32)


def _bins(d: np.ndarray, cap: int) -> np.ndarray:
    """Whole spacings of distances `d` (int32), at most `cap` (also for a non-finite distance)."""
    if d.dtype.kind in "iu":
        return np.minimum(d, cap).astype(np.int32, copy=False)
    return np.rint(np.minimum(np.nan_to_num(d, nan=cap, posinf=cap), cap)).astype(np.int32)


def _distances(positions: Sequence[tuple[float, float] | None] | None, n: int) -> Callable[[np.ndarray], np.ndarray]:
    """distance(rows) -> (len(rows), n) distances in spacings: metric (float) when
    every row has a position (and they are not all at one point), else in row
    order (int32)."""
    xy = _positions(positions, n)
    walked = _steps(xy) if xy is not None else None
    if xy is not None and walked is not None:
        scaled = xy / walked[1]
        return lambda rows: np.linalg.norm(scaled[rows][:, None, :] - scaled[None, :, :], axis=2)
    order = np.arange(n, dtype=np.int32)
    return lambda rows: np.abs(order[rows][:, None] - order[None, :])


def _steps(xy: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The steps between consecutive positions and the spacing (their median
    non-zero step); None when they are all at one point."""
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    moving = steps[steps > 1e-6]
    return (steps, float(np.median(moving))) if moving.size else None


def _positions(positions: Sequence[tuple[float, float] | None] | None, n: int) -> np.ndarray | None:
    if positions is None or len(positions) != n or any(p is None for p in positions):
        return None
    return np.asarray(positions, dtype=np.float64).reshape(n, 2)


def step_similarity(
    x: np.ndarray, positions: Sequence[tuple[float, float] | None] | None = None
) -> dict[str, Any] | None:
    """How alike two places one spacing apart are: the mean and standard
    deviation of the cosine between consecutive rows of `x` (L2-normalised, in
    id order: the steps of a traversal), from up to `STEP_PAIRS` evenly spread
    steps. With positions (every row has one), only steps of about one spacing
    count (0.5 to 1.5 times the median non-zero step): a jump between
    traversals, or another view at the same spot, is not a walker's step. None
    with fewer than two such steps, or when they are all alike (no spread).
    The tracker compares two consecutive frames' cosine with it to tell a
    walker standing from one moving (track/tracker.py). Cheap at any size:
    `STEP_PAIRS` dot products."""
    n = len(x)
    if n < 2:
        return None
    first = np.unique(np.linspace(0, n - 2, min(n - 1, STEP_PAIRS)).astype(np.int64))
    xy = _positions(positions, n)
    walked = _steps(xy) if xy is not None else None
    if walked is not None:
        d = walked[0][first] / walked[1]
        first = first[(d > 0.5) & (d < 1.5)]
    s = np.einsum("ij,ij->i", x[first], x[first + 1], dtype=np.float64)
    if s.size < 2 or not np.isfinite(s).all() or float(s.std()) <= 0:
        return None
    return {"mean": round(float(s.mean()), 6), "spread": round(float(s.std()), 6), "pairs": int(s.size)}


def step_of(manifest: dict[str, Any], where: Path | str = "index") -> tuple[float, float] | None:
    """(mean, spread) of a manifest's step similarity record; None when it has
    none (an index built before it was recorded: logged, with the fix) or an
    unusable one (logged)."""
    if STEP_KEY not in manifest:
        log.info(
            "%s: no %s record (an index built before it existed): the tracker reads no motion from the frames; "
            "rebuild the index to record it",
            where,
            STEP_KEY,
        )
        return None
    return step_pair(manifest[STEP_KEY], where)


def step_pair(record: dict[str, Any] | None, where: Path | str = "index") -> tuple[float, float] | None:
    """(mean, spread) of a step similarity record (`step_similarity`); None for
    none, or for an unusable one (logged: a map whose neighbours all look
    exactly alike, a damaged manifest)."""
    if not record:
        return None
    try:
        mean, spread = float(record["mean"]), float(record["spread"])
    except (KeyError, TypeError, ValueError):
        mean = spread = float("nan")
    if not (np.isfinite(mean) and np.isfinite(spread) and spread > 0 and -1.0 <= mean <= 1.0):
        log.warning("%s: unusable %s record %r; the tracker reads no motion from frames", where, STEP_KEY, record)
        return None
    return mean, spread


def save(folder: Path, ids: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """Write `HUB_FILE` into a (staged) index folder; the manifest's record."""
    np.savez(folder / HUB_FILE, ids=np.asarray(ids, np.int64), hub=np.asarray(values, np.float32))
    return {
        "file": HUB_FILE,
        "k": HUB_K,
        "exclude_spacings": HUB_EXCLUDE,
        "relative_to": HUB_RELATIVE_TO,
        "mean": round(float(np.mean(values)), 6),
    }


class Hubness:
    """A published index's hubness, looked up by place id (None for unknown ids)."""

    def __init__(self, ids: np.ndarray, values: np.ndarray) -> None:
        if ids.size == 0:
            raise ValueError("an empty hubness table")
        order = np.argsort(ids, kind="stable")
        self.ids, self.values = ids[order], values[order]
        self.mean = float(values.mean())

    @classmethod
    def open(cls, folder: Path, manifest: dict[str, Any]) -> Hubness | None:
        """The index's hubness, or None when its manifest records none."""
        record = manifest.get(HUB_KEY)
        if not record:
            return None
        if record.get("relative_to") != HUB_RELATIVE_TO:
            log.info(
                "%s: hubness of raw cosines (an index built before the distance profile); it is used as it is, "
                "and a rebuild of the index computes the current one",
                folder,
            )
        path = folder / str(record["file"])
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, values = np.asarray(z["ids"], np.int64), np.asarray(z["hub"], np.float32)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: unreadable hubness file ({e}); rebuild the index") from None
        if ids.shape != values.shape or ids.ndim != 1 or ids.size == 0 or not np.isfinite(values).all():
            raise ValueError(
                f"{path}: {ids.size} ids for {values.size} values, or values not finite; rebuild the index"
            )
        return cls(ids, values)

    def of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Hubness of each id; the average for an id the file does not hold
        (a constant shift of every candidate changes nothing)."""
        q = np.asarray(ids, np.int64).ravel()
        pos = np.clip(np.searchsorted(self.ids, q), 0, self.ids.size - 1)
        return np.where(self.ids[pos] == q, self.values[pos], self.mean)
