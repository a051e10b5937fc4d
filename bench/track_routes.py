#!/usr/bin/env python
"""The tracker's motion modes on routes of several shapes, on the validation split only.

Gardens Point has no positions, so the tracker's positioned modes never met its
frames. This bench gives the validation split of bench/track_validate.py
(`day_left` even frames: the map, by the teacher; odd frames: a walk, by the
student at each validation quality) made-up positions: the map's places one
metre apart along a route of a chosen shape, the walk's frames between them.
The descriptors are real; only the geometry is made up, so what changes between
shapes is the motion model alone. Shapes:

- `order`: no positions (the database order);
- `line0`, `line30`, `line60`: straight, heading 0, 30 or 60 degrees from east;
- `curve`: the heading turns 4 degrees per place;
- `zigzag`: 90-degree turns every 10 places, legs heading 20 and -70 degrees.

Each shape runs in the tracker's `route` mode (what `DatabaseProfile` picks for
positions along the id order) and in the `positions` mode (compass headings, as
for a photo collection), on the whole 100-place map and on 27-place pieces of
it (a short street: every 9th start, the walk between). Hubness as an index of
that map records it; `TrackSettings()` defaults. Nothing of `day_right` or
`night_right` is read.

    .venv/bin/python bench/track_routes.py --home HOME --out bench/results/track_routes.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from track_validate import add_split_arguments, load_split  # noqa: E402

from vpr.index.hubness import hubness, step_pair, step_similarity  # noqa: E402
from vpr.index.knn import exact_knn  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402
from vpr.track.tracker import DatabaseProfile, Tracker  # noqa: E402

SHAPES = ("order", "line0", "line30", "line60", "curve", "zigzag")
PIECE, PIECE_STEP = 27, 9  # places per short map, places between their starts


def shape(n: int, name: str) -> np.ndarray | None:
    """(n, 2) UTM positions one metre apart along the named shape; None for `order`."""
    if name == "order":
        return None
    k = np.arange(n)
    if name.startswith("line"):
        heading = np.full(n, math.radians(float(name[4:])))
    elif name == "curve":
        heading = np.radians(10.0 + 4.0 * k)
    elif name == "zigzag":
        heading = np.radians(np.where((k // 10) % 2 == 0, 20.0, -70.0))
    else:
        raise ValueError(f"unknown shape {name!r}; one of {', '.join(SHAPES)}")
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)]) + (500_000.0, 6_000_000.0)


def tracked_recall(db: np.ndarray, walk: np.ndarray, xy: np.ndarray | None, planar: bool) -> tuple[float, float]:
    """(tracked, per-frame) recall@1 of the walk (frame k lies between places k and k+1)."""
    s = TrackSettings()
    metas: list[dict[str, float]] = (
        [{} for _ in range(len(db))] if xy is None else [{"utm_e": float(e), "utm_n": float(n)} for e, n in xy]
    )
    x = db / np.linalg.norm(db, axis=1, keepdims=True)
    step = step_pair(step_similarity(x, None if xy is None else [tuple(p) for p in xy]))
    profile = DatabaseProfile.from_rows(metas, len(db), step=step)
    assert profile.mode == ("order" if xy is None else "route"), f"a made-up route profiled as {profile.mode}"
    if planar:
        profile = dataclasses.replace(profile, route=False)
    hub = hubness(x, None if xy is None else [tuple(p) for p in xy])
    scores, ids = exact_knn(db, walk, min(s.candidates, len(db)))
    tracker = Tracker(s, profile)
    right = frame = 0
    for k in range(len(walk)):
        cand = ids[k]
        tracker.observe(
            cand,
            scores[k],
            [metas[j] for j in cand],
            at=k,
            hubness=None if hub is None else hub[cand],
            descriptor=walk[k],
        )
        right += int(tracker.ranking()[0] in (k, k + 1))
        frame += int(cand[0] in (k, k + 1))
    return right / len(walk), frame / len(walk)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_routes.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    db, described, _, per_quality = load_split(args.home, args.gardens, args.teacher, args.student, args.quality)
    rows = []
    for size in (len(db), PIECE):
        starts = [0] if size == len(db) else list(range(0, len(db) - size + 1, PIECE_STEP))
        for name in SHAPES:
            for mode in ("route", "positions") if name != "order" else ("order",):
                by_quality = {}
                for spec, walk in described:
                    runs = [
                        tracked_recall(db[a : a + size], walk[a : a + size - 1], shape(size, name), mode == "positions")
                        for a in starts
                    ]
                    by_quality[spec] = {
                        "tracked": round(float(np.mean([r[0] for r in runs])), 4),
                        "frame": round(float(np.mean([r[1] for r in runs])), 4),
                    }
                mean = float(np.mean([v["tracked"] for v in by_quality.values()]))
                rows.append({"places": size, "maps": len(starts), "shape": name, "mode": mode, "mean": round(mean, 4)})
                rows[-1]["by_quality"] = by_quality
                print(f"{size:>4} places  {name:<7} {mode:<9} mean tracked R@1 {mean:.3f}", flush=True)
    out = {
        "what": __doc__.splitlines()[0],
        "teacher": args.teacher,
        "student": args.student,
        "qualities": per_quality,
        "settings": TrackSettings().model_dump(),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": rows,
    }
    atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
