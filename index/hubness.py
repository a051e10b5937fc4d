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

Computed once per index build from the descriptors in hand (exact, batched
inner products), stored beside the index (`HUB_FILE`, read without pickle)
and recorded in its manifest. The exact computation costs N x N x D
multiply-adds; beyond `HUB_MAX_WORK` it is skipped (logged, and the manifest
says so), and the tracker then uses the raw scores. Edits (add/remove) change
other places' neighbourhoods and do not carry it over: a rebuild restores it.

The defaults were chosen on bench/track_validate.py's validation split
(`day_left` only; docs/BENCHMARKS.md), never on test queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HUB_FILE = "hubness.npz"  # ids and hubness, in id order
HUB_KEY = "hubness"  # the manifest's record of it
HUB_K = 10  # most similar places elsewhere whose similarity is averaged
HUB_EXCLUDE = 3.0  # database spacings around a place that are "the same place"
HUB_MAX_WORK = 2e13  # N x N x D multiply-adds at most (a few minutes on 2 cores)
BATCH_FLOATS = 1 << 25  # similarity rows computed at once (128 MB of float32)


def hubness(x: np.ndarray, positions: Sequence[tuple[float, float] | None] | None = None) -> np.ndarray | None:
    """Per row of `x` (L2-normalised descriptors in id order), the mean cosine
    to its `HUB_K` most similar rows farther than `HUB_EXCLUDE` spacings away;
    None when the database is too large to compute it exactly (or has no
    place outside any neighbourhood).

    `positions`: UTM (easting, northing) per row. When every row has one, the
    neighbourhood is metric (spacing: the median non-zero step between
    consecutive rows); otherwise it is the row order (a traversal or a video)."""
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
    xy = _positions(positions, n)
    radius = 0.0
    if xy is not None:
        steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        steps = steps[steps > 1e-6]
        if steps.size == 0:
            xy = None
        else:
            radius = HUB_EXCLUDE * float(np.median(steps))
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(n, np.float32)
    rows = max(1, BATCH_FLOATS // max(1, n))
    order = np.arange(n)
    k = min(HUB_K, n)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        sim = x[a:b] @ x.T
        if xy is None:
            near = np.abs(order[a:b, None] - order[None, :]) <= HUB_EXCLUDE
        else:
            near = np.linalg.norm(xy[a:b, None, :] - xy[None, :, :], axis=2) <= radius
        sim[near] = -np.inf
        top = -np.partition(-sim, k - 1, axis=1)[:, :k]
        finite = np.isfinite(top)
        count = finite.sum(axis=1)
        out[a:b] = np.where(count > 0, np.where(finite, top, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    if np.isnan(out).all():
        return None
    return np.nan_to_num(out, nan=float(np.nanmean(out)))  # a place with nothing elsewhere: the average


def _positions(positions: Sequence[tuple[float, float] | None] | None, n: int) -> np.ndarray | None:
    if positions is None or len(positions) != n or any(p is None for p in positions):
        return None
    return np.asarray(positions, dtype=np.float64).reshape(n, 2)


def save(folder: Path, ids: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """Write `HUB_FILE` into a (staged) index folder; the manifest's record."""
    np.savez(folder / HUB_FILE, ids=np.asarray(ids, np.int64), hub=np.asarray(values, np.float32))
    return {"file": HUB_FILE, "k": HUB_K, "exclude_spacings": HUB_EXCLUDE, "mean": round(float(np.mean(values)), 6)}


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
