"""How generic each database place looks: its hubness among the database itself.

A degraded query (a dark, blocky, compressed frame) tends to land near a few
database places whose descriptors look like "anything": they are the
per-frame answer to many frames scattered along a walk, and a tracker that
may stand still settles on them. A place's hubness is the mean cosine
similarity of its descriptor to its `HUB_K` most similar database places
*elsewhere* on the map (farther than `HUB_EXCLUDE` database spacings: its own
neighbours along the route, and the same spot in other traversals, do not
count). Subtracting a share of it from a candidate's score (`TrackSettings.hub_weight`;
the cross-domain similarity local scaling of Conneau et al. 2018, with the database
as its own reference set) makes generic places compete on equal terms.

Computed once per index build from the descriptors in hand, stored beside
the index (`HUB_FILE`, read without pickle) and recorded in its manifest with
the method (`method_for`). Exactly (batched inner products, N x N x D
multiply-adds) while that is within `HUB_MAX_WORK`; above it, approximately,
through an inverted-file search of the database itself (FAISS IVF with 8-bit
scalar quantisation: about sqrt(N) lists, as many probed as `HUB_MAX_APPROX_WORK`
allows, `HUB_DEPTH` neighbours per place before the exclusion), as long as that
budget is at least `HUB_MIN_SHARE` of the exact work (below it the values
follow the exact ones too loosely to be worth weighing): at 4096-d, exactly up
to about 70,000 places, approximately up to about 440,000. Larger databases
are skipped (logged), and the tracker then uses the raw scores. Edits (add/remove) change
other places' neighbourhoods and do not carry it over: a rebuild restores it.

The defaults were chosen on bench/track_validate.py's validation split
(`day_left` only; docs/BENCHMARKS.md), never on test queries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HUB_FILE = "hubness.npz"  # ids and hubness, in id order
HUB_KEY = "hubness"  # the manifest's record of it
HUB_K = 10  # most similar places elsewhere whose similarity is averaged
HUB_EXCLUDE = 3.0  # database spacings around a place that are "the same place"
HUB_MAX_WORK = 2e13  # exact: N x N x D multiply-adds at most (a few minutes on 2 cores)
HUB_MAX_APPROX_WORK = 2e14  # approximate: multiply-adds at most (about half an hour on 2 cores: a
# database that large took days to describe on them)
HUB_MIN_SHARE = 0.25  # approximate: only when that budget is at least this share of the exact work
# (bench/hubness_scale.py: at a quarter, the values follow the exact ones with r 0.94; at a tenth, 0.81-0.84)
BATCH_FLOATS = 1 << 25  # similarity rows computed at once (128 MB of float32)
HUB_DEPTH = 4 * HUB_K + 8  # approximate path: neighbours searched per place (room for its excluded ones)
IVF_TRAIN_PER_LIST = 40  # approximate path: training rows per inverted list (FAISS asks for 39 or more)
SEARCH_ROWS = 4096  # approximate path: places searched at once


def hubness(x: np.ndarray, positions: Sequence[tuple[float, float] | None] | None = None) -> np.ndarray | None:
    """Per row of `x` (L2-normalised descriptors in id order), the mean cosine
    to its `HUB_K` most similar rows farther than `HUB_EXCLUDE` spacings away;
    None when the database is too large even for the approximate path (or has
    no place outside any neighbourhood).

    `positions`: UTM (easting, northing) per row. When every row has one, the
    neighbourhood is metric (spacing: the median non-zero step between
    consecutive rows); otherwise it is the row order (a traversal or a video)."""
    n, dim = x.shape
    method = method_for(n, dim)
    if method is None:
        log.warning(
            "hubness skipped: %d places x %d-d is too large even for an approximate search within %.0e "
            "multiply-adds (the tracker uses raw scores)",
            n,
            dim,
            HUB_MAX_APPROX_WORK,
        )
        return None
    log.info("hubness of %d places (%d-d): %s", n, dim, method)
    near = _near(positions, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if method == "exact":
        out = _exact(x, near)
    else:
        out = _approximate(x, near)
    if np.isnan(out).all():
        return None
    return np.nan_to_num(out, nan=float(np.nanmean(out)))  # a place with nothing elsewhere: the average


def method_for(n: int, dim: int) -> str | None:
    """How the hubness of `n` places of `dim` dimensions is computed: "exact"
    (within `HUB_MAX_WORK`), "ivf<lists>-sq8-probe<p>" (within
    `HUB_MAX_APPROX_WORK`), or None (skipped)."""
    work = float(n) * n * dim
    if work <= HUB_MAX_WORK:
        return "exact"
    if HUB_MIN_SHARE * work > HUB_MAX_APPROX_WORK:
        return None
    lists, probe = _ivf_plan(n, dim)
    return None if probe < 1 else f"ivf{lists}-sq8-probe{probe}"


def _ivf_plan(n: int, dim: int) -> tuple[int, int]:
    """(lists, probed lists) whose search (the coarse step over every list, then
    `probe` lists of about n/lists places, per place) fits `HUB_MAX_APPROX_WORK`."""
    lists = int(min(max(16, round(math.sqrt(n))), max(1, n // IVF_TRAIN_PER_LIST)))
    per_place = HUB_MAX_APPROX_WORK / (float(n) * dim) - lists  # multiply-adds per place left after the coarse step
    return lists, int(min(lists, per_place * lists / n)) if per_place > 0 else 0


NearFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _near(positions: Sequence[tuple[float, float] | None] | None, n: int) -> NearFn:
    """near(rows, cols) -> bool mask: the pairs that are the same place (within
    `HUB_EXCLUDE` spacings: metric with positions for every row, else in row order)."""
    xy = _positions(positions, n)
    if xy is not None:
        steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        steps = steps[steps > 1e-6]
        if steps.size:
            radius = HUB_EXCLUDE * float(np.median(steps))
            pts = xy
            return lambda a, b: np.linalg.norm(pts[a][..., None, :] - pts[b], axis=-1) <= radius
    return lambda a, b: np.abs(a[..., None] - b) <= HUB_EXCLUDE


def _mean_top(sim: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's `k` largest finite values (NaN for a row with none)."""
    k = min(k, sim.shape[1])
    top = -np.partition(-sim, k - 1, axis=1)[:, :k]
    finite = np.isfinite(top)
    count = finite.sum(axis=1)
    return np.where(count > 0, np.where(finite, top, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def _exact(x: np.ndarray, near: NearFn) -> np.ndarray:
    n = len(x)
    out = np.empty(n, np.float32)
    rows = max(1, BATCH_FLOATS // max(1, n))
    every = np.arange(n)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        sim = x[a:b] @ x.T
        sim[near(np.arange(a, b), every)] = -np.inf
        out[a:b] = _mean_top(sim, HUB_K)
    return out


def _approximate(x: np.ndarray, near: NearFn) -> np.ndarray:
    """The same mean over the neighbours an inverted-file search of the
    database finds (`HUB_DEPTH` per place, then the exclusion)."""
    import faiss

    n, dim = x.shape
    lists, probe = _ivf_plan(n, dim)
    index = faiss.index_factory(dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    train = x[np.sort(rng.choice(n, min(n, IVF_TRAIN_PER_LIST * lists), replace=False))]
    t0 = time.perf_counter()
    index.train(train)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = probe
    depth = min(n, HUB_DEPTH)
    out = np.empty(n, np.float32)
    for a in range(0, n, SEARCH_ROWS):
        b = min(n, a + SEARCH_ROWS)
        sim, ids = index.search(x[a:b], depth)
        found = ids >= 0
        sim[~found] = -np.inf
        sim[near(np.arange(a, b), np.where(found, ids, 0)).reshape(sim.shape) & found] = -np.inf
        out[a:b] = _mean_top(sim, HUB_K)
        if b == n or (a // SEARCH_ROWS) % 64 == 63:
            log.info("hubness: %d of %d places searched (%.0f s)", b, n, time.perf_counter() - t0)
    return out


def _positions(positions: Sequence[tuple[float, float] | None] | None, n: int) -> np.ndarray | None:
    if positions is None or len(positions) != n or any(p is None for p in positions):
        return None
    return np.asarray(positions, dtype=np.float64).reshape(n, 2)


def save(folder: Path, ids: np.ndarray, values: np.ndarray, method: str = "exact") -> dict[str, Any]:
    """Write `HUB_FILE` into a (staged) index folder; the manifest's record."""
    np.savez(folder / HUB_FILE, ids=np.asarray(ids, np.int64), hub=np.asarray(values, np.float32))
    return {
        "file": HUB_FILE,
        "k": HUB_K,
        "exclude_spacings": HUB_EXCLUDE,
        "method": method,
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
