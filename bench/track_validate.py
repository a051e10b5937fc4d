#!/usr/bin/env python
"""Choosing the tracker's settings on a validation split of the DATABASE traversal only.

Gardens Point `day_left` split in two: the even frames are the database
(described by the teacher at orig), the odd frames a query walk (described by
the student at a degraded quality; a video quality encodes the walk as one
clip). Odd frame 2k+1 lies between database places k and k+1 (its positives).
Neither `day_right` nor `night_right` is read: the settings chosen here are
then fixed for bench/track_gardens.py.

    .venv/bin/python bench/track_validate.py --home /tmp/track-home --out bench/results/track_validate.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import vpr.track.tracker as tr  # noqa: E402
from vpr.data.datasets import Item, PlaceDataset  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.describe.describe import describe  # noqa: E402
from vpr.evaluation.evaluate import first_positive_ranks, recall_from_ranks, tracked_ranks  # noqa: E402
from vpr.media.degrade import degrade_sequence_files, parse_quality  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.model.preprocess import list_images  # noqa: E402
from vpr.model.registry import Registry  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402

SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--teacher", default="gardens-vgg16-k64-ms320-upsample@1")
    p.add_argument("--student", default="gardens-student@1")
    p.add_argument("--quality", default="h180-h264-qp40,h120-jpeg20")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_validate.json")
    args = p.parse_args(argv)
    reg = Registry(args.home / "models")
    cache = DescriptorCache(args.home / "cache")
    frames = list_images(args.gardens / "day_left")
    db_paths, q_paths = frames[0::2], frames[1::2]
    db = describe(reg.load(args.teacher, "cpu"), frames, "orig", cache=cache, device="cpu").desc[0::2]
    student = reg.load(args.student, "cpu")
    items = [Item(p, p.stem) for p in q_paths]
    positives = [np.array([k, k + 1][: 2 if k + 1 < len(db_paths) else 1]) for k in range(len(q_paths))]
    ds = PlaceDataset("day_left split", args.gardens, [Item(p, p.stem) for p in db_paths], items, positives)
    seqs = [np.arange(len(items))]
    grid = {
        "reach": (1.5, 3.0, 6.0),
        "teleport": (0.01, 0.05),
        "temp_scale": (1.0, 1.5, 3.0),
    }
    rows = []
    for spec in args.quality.split(","):
        q = parse_quality(spec)
        paths = q_paths
        quality = spec
        if q.is_video:
            paths, _ = degrade_sequence_files(q_paths, q, args.home / "cache" / "sequences" / f"validate-{q}")
            quality = "orig"
        qd = describe(student, paths, quality, cache=cache, device="cpu").desc
        frame = recall_from_ranks(first_positive_ranks(db, qd, positives, 20), (1, 5))
        print(f"{spec}: per-frame R@1 {frame[1]:.3f} R@5 {frame[5]:.3f}", flush=True)
        for reach, teleport, scale in itertools.product(*grid.values()):
            tr.TEMP_SCALE = scale
            s = TrackSettings(reach=reach, teleport=teleport)
            r = recall_from_ranks(tracked_ranks(db, qd, ds, seqs, s, 5), (1, 5))
            row = {"quality": spec, "reach": reach, "teleport": teleport, "temp_scale": scale, "track_r1": r[1]}
            row["frame_r1"] = frame[1]
            rows.append(row)
            print(row, flush=True)
    atomic_write_json(args.out, {"what": __doc__.splitlines()[0], "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
