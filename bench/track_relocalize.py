#!/usr/bin/env python
"""Re-localization on Gardens Point: query sequences spliced from two distant
parts of the route (a kidnapped walker), and sequences that turn back.

For every splice (40 frames before it, 40 after), the measure is the number
of frames after the splice until the tracked place is right (a positive of
that frame: i +- 2) and stays right for 5 frames. Frames come from the query
folders described by the student (THE description path with its cache);
splices are every pair of start points 60+ frames apart on a grid, turns
every 10th frame from 40 to 160. Tracker settings: `TrackSettings()` defaults.

    .venv/bin/python bench/track_relocalize.py --home /tmp/track-home --out bench/results/track_relocalize.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from vpr.data.datasets import open_dataset  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.describe.describe import describe  # noqa: E402
from vpr.evaluation.evaluate import database_hubness, track_profile  # noqa: E402
from vpr.index.knn import exact_knn  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.model.registry import Registry  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402
from vpr.track.tracker import DatabaseProfile, Tracker  # noqa: E402

SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))
SIDE = 40  # frames before and after a splice or a turn
STAY = 5  # right for this many frames in a row counts as re-localized


def frames_to_relocalize(order: list[int], splice: int, ids, scores, hub, positives, settings, step, qd) -> int:
    """Frames after position `splice` of `order` until the track is right for STAY frames."""
    tracker = Tracker(settings, DatabaseProfile(len(hub), False, 1.0, step=step))
    right = []
    for t, qi in enumerate(order):
        fix = tracker.observe(ids[qi], scores[qi], at=t, hubness=hub[ids[qi]], descriptor=qd[qi])
        right.append(fix is not None and fix.id in positives[qi])
    for t in range(splice, len(order) - STAY + 1):
        if all(right[t : t + STAY]):
            return t - splice
    return len(order) - splice  # never (within the frames after it)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--teacher", default="gardens-vgg16-k64-ms320-upsample@1")
    p.add_argument("--student", default="gardens-student@1")
    p.add_argument("--quality", default="orig,h180-jpeg20,h120-jpeg20")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_relocalize.json")
    args = p.parse_args(argv)
    reg = Registry(args.home / "models")
    cache = DescriptorCache(args.home / "cache")
    settings = TrackSettings()
    teacher, student = reg.load(args.teacher, "cpu"), reg.load(args.student, "cpu")
    rows = []
    for qset in ("day_right", "night_right"):
        ds = open_dataset("traversal", args.gardens, database="day_left", queries=qset)
        db = describe(teacher, [i.path for i in ds.database], "orig", cache=cache, device="cpu").desc
        hub = database_hubness(db, ds)  # as an index build of this database records it
        assert hub is not None
        step = track_profile(ds, db).step  # and its step similarity (standing vs moving from frames)
        pos = [set(p.tolist()) for p in ds.positives]
        n = len(ds.queries)
        for q in args.quality.split(","):
            qd = describe(student, [i.path for i in ds.queries], q, cache=cache, device="cpu").desc
            scores, ids = exact_knn(db, qd, settings.candidates)
            splices = []
            for a in range(SIDE, n - SIDE + 1, 20):
                for b in range(0, n - SIDE + 1, 20):
                    if abs(a - b) >= 60:
                        order = list(range(a - SIDE, a)) + list(range(b, b + SIDE))
                        splices.append(frames_to_relocalize(order, SIDE, ids, scores, hub, pos, settings, step, qd))
            turns = []
            for s in range(SIDE, n - 39, 10):
                order = list(range(s - SIDE, s)) + list(range(s - 2, s - 2 - SIDE, -1))
                turns.append(frames_to_relocalize(order, SIDE, ids, scores, hub, pos, settings, step, qd))
            row = {
                "query_set": qset,
                "quality": q,
                "splices": len(splices),
                "splice_frames_max": int(max(splices)),
                "splice_frames_median": float(np.median(splices)),
                "splice_frames_p90": float(np.percentile(splices, 90)),
                "turns": len(turns),
                "turn_frames_max": int(max(turns)),
                "turn_frames_median": float(np.median(turns)),
            }
            rows.append(row)
            print(row, flush=True)
    atomic_write_json(
        args.out,
        {
            "what": f"frames after a splice / a turn until the track is right for {STAY} frames in a row",
            "student": args.student,
            "track_settings": settings.model_dump(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (a 2-core VM shared with other work)",
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
