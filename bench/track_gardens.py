#!/usr/bin/env python
"""Tracked vs per-frame recall on Gardens Point Walking (`vpr eval --track`'s path).

Database `day_left` described by the teacher at orig; queries `day_right` and
`night_right` (each folder one sequence, sorted by name) described by the
student (and, for the qualities in --teacher-quality, by the teacher beside
it). Video qualities encode each query sequence as ONE H.264 clip (PyAV), so
per-frame `recall` and `track_recall` of a cell see the same pixels. The
tracker's settings are `TrackSettings()` defaults, fixed before this ran
(chosen on bench/track_validate.py's split of `day_left`, checked on the
simulated routes of tests/track, never on these queries).

    .venv/bin/python bench/track_gardens.py --home /tmp/track-home \\
        --out bench/results/track_gardens.json

`--folder` runs the same on a folder dataset with positions instead (one
query folder, the tracker in its positions mode), for example the GoPro walk
as bench/beyond_gardens.py builds it:

    .venv/bin/python bench/track_gardens.py --home var/bench-beyond \\
        --folder var/bench-beyond/data/gopro_s0.5_m320 --radius 1.0 \\
        --teacher gopro-vgg16-k64@1 --student gopro-student@1 \\
        --quality orig,h120-jpeg20,h90-jpeg20,h60-jpeg20,h120-h264-qp40 \\
        --out bench/results/track_gopro.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vpr.data.datasets import open_dataset  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.evaluation.evaluate import evaluate, format_table, plot_series  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.model.registry import Registry  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402

SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))
QUALITIES = "orig,h180-jpeg20,h120-jpeg20,h180-h264-qp40,h180-h264-kbps200"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True, help="state folder with the models and the descriptor cache")
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--teacher", default="gardens-vgg16-k64-ms320-upsample@1")
    p.add_argument("--student", default="gardens-student@1")
    p.add_argument("--quality", default=QUALITIES)
    p.add_argument("--teacher-quality", default=QUALITIES, help="qualities at which the teacher also queries")
    p.add_argument("--query-set", action="append", help="day_right, night_right (default both)")
    p.add_argument("--folder", type=Path, help="a folder dataset with positions instead of Gardens Point")
    p.add_argument("--radius", type=float, default=25.0, help="--folder: a query is right within this many metres")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_gardens.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    registry = Registry(args.home / "models")
    cache = DescriptorCache(args.home / "cache")
    settings = TrackSettings()
    t0 = time.perf_counter()
    reports = {}
    if args.folder:
        sets = {"walk": open_dataset("folder", args.folder, radius=args.radius)}
    else:
        sets = {
            q: open_dataset("traversal", args.gardens, database="day_left", queries=q)
            for q in args.query_set or ["day_right", "night_right"]
        }
    for qset, ds in sets.items():
        runs = [(args.student, args.quality)]
        if args.teacher_quality:
            runs.append((args.teacher, args.teacher_quality))
        results = []
        for model, quals in runs:
            rep = evaluate(
                registry,
                ds,
                args.teacher,
                [model],
                quals,
                cache=cache,
                device="cpu",
                progress=False,
                track=settings,
                work_dir=args.home / "cache" / "sequences",
            )
            results.extend(rep["results"])
            print(format_table(rep), flush=True)
        reports[qset] = {**rep, "results": results}
    out = {
        "what": "per-frame recall vs track_recall (each query folder one sequence, causal tracker)",
        "track_settings": settings.model_dump(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (a 2-core VM shared with other work), torch "
        f"{torch.__version__}, {args.threads} threads",
        "seconds": round(time.perf_counter() - t0, 1),
        "reports": reports,
    }
    atomic_write_json(args.out, out)
    series: dict[str, list[tuple[str, float]]] = {}
    for qset, rep in reports.items():
        for r in rep["results"]:
            name = r["query_model"].split("@")[0].replace("gardens-", "").replace("gopro-", "")
            series.setdefault(f"{qset} {name} frame", []).append((r["quality"], r["recall"]["1"]))
            series.setdefault(f"{qset} {name} tracked", []).append((r["quality"], r["track_recall"]["1"]))
    title = args.folder.name if args.folder else "Gardens Point"
    plot_series(series, args.out.with_suffix(".png"), f"{title}: per-frame vs tracked recall@1")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
