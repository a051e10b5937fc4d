#!/usr/bin/env python
"""Per-frame tracker cost against database size (1k, 100k, 1M synthetic places), in one run.

Each database is a route of N places with unit-norm random descriptors and
UTM positions 2 m apart, tracked in the planar `positions` mode (compass
headings: 49 velocities, the costlier one; `--mode route` for the mode such a
route gets by itself, 13 velocities). A
walker moves one place per frame; its query is its place's descriptor plus
noise. Candidates come from THE exact search (`index.knn.exact_knn`, FAISS
Flat, timed separately: it is the index's cost, which grows with N, not the
tracker's); the tracker's `observe`, with the lookup of the candidates'
hubness in a table of every place, is timed per frame.

    .venv/bin/python bench/track_cost.py --out bench/results/track_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from vpr.index.hubness import Hubness, step_pair, step_similarity  # noqa: E402
from vpr.index.knn import exact_knn  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402
from vpr.track.tracker import DatabaseProfile, Tracker  # noqa: E402


def one_size(
    n: int, dim: int, frames: int, rng: np.random.Generator, settings: TrackSettings, mode: str = "positions"
) -> dict:
    db = rng.standard_normal((n, dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    start = int(rng.integers(0, n - frames))
    path = np.arange(start, start + frames)
    q = db[path] + rng.standard_normal((frames, dim), dtype=np.float32) * 0.12
    t = time.perf_counter()
    scores, ids = exact_knn(db, q, settings.candidates)
    search_ms = (time.perf_counter() - t) * 1000 / frames
    metas_of = lambda row: [{"utm_e": 2.0 * float(i), "utm_n": 0.0} for i in row]  # noqa: E731
    rows = metas_of(range(min(n, 4096)))
    # the step similarity an index build records (the tracker compares consecutive frames' cosine with it)
    profile = DatabaseProfile.from_rows(rows, n, step=step_pair(step_similarity(db[: min(n, 4096)])))
    if mode == "positions":
        profile = dataclasses.replace(profile, route=False)  # as if the ids were not a route
    tracker = Tracker(settings, profile)
    # a hubness table of every place, looked up per frame as the server does (values do not matter for time)
    table = Hubness(np.arange(n), rng.uniform(0.1, 0.3, n).astype(np.float32))
    per_frame, right = [], 0
    for f in range(frames):
        metas = metas_of(ids[f])
        t = time.perf_counter()
        fix = tracker.observe(ids[f], scores[f], metas, at=f, hubness=table.of(ids[f]), descriptor=q[f])
        per_frame.append((time.perf_counter() - t) * 1000)
        right += fix is not None and abs(fix.id - path[f]) <= 2
    ms = np.array(per_frame[5:])  # the first frames warm numpy's caches
    return {
        "places": n,
        "mode": profile.mode,
        "dim": dim,
        "frames": frames,
        "tracker_ms_p50": round(float(np.percentile(ms, 50)), 4),
        "tracker_ms_p99": round(float(np.percentile(ms, 99)), 4),
        "tracker_ms_mean": round(float(ms.mean()), 4),
        "search_ms_per_frame": round(search_ms, 3),
        "support_max": settings.support,
        "tracked_right": right / frames,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--dim", type=int, default=32, help="descriptor size (one dot product per frame)")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--mode", choices=["positions", "route"], default="positions")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_cost.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    settings = TrackSettings()
    rows = [one_size(int(s), args.dim, args.frames, rng, settings, args.mode) for s in args.sizes.split(",")]
    for r in rows:
        print(
            f"{r['places']:>9} places: tracker p50 {r['tracker_ms_p50']:.3f} ms, p99 {r['tracker_ms_p99']:.3f} ms "
            f"per frame; exact search {r['search_ms_per_frame']:.2f} ms per frame; "
            f"tracked right {r['tracked_right']:.3f}"
        )
    atomic_write_json(
        args.out,
        {
            "what": f"per-frame tracker cost vs database size (synthetic descriptors, {args.mode} mode)",
            "track_settings": settings.model_dump(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (a 2-core VM shared with other work), "
            f"numpy {np.__version__}",
            "results": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
