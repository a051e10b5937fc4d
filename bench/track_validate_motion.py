#!/usr/bin/env python
"""Standing vs moving from the frames (`TrackSettings.frame_motion`): the validation that adopted it.

Three parts, on validation data only (no `day_right` / `night_right` image is read):
(a) the criterion of bench/track_validate.py on its split of Gardens Point
    `day_left` (even frames the map, odd frames a walk at six qualities; the
    whole walk and spliced walks);
(b) a leave-one-out walk over the GoPro database frames at the map's own
    density (every frame but the two ends, degraded at four JPEG levels,
    described by the student and by the teacher, answered by the map without
    its own place; right: the other places within 1 m);
(c) the split's walk with stops: the walker stands for 8 frames at frames 20,
    50 and 80; a stopped frame is the same frame at the split's other
    qualities in turn (another degradation of the same view).
The rule, fixed before the run: adopt `frame_motion` iff the mean of (a), (b)
and (c) with it exceeds the mean without it by more than 0.002.

    .venv/bin/python bench/track_validate_motion.py --home /tmp/dg320 --gopro-home var/bench-beyond \\
        --out bench/results/track_validate_motion.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import track_validate as tv  # noqa: E402

from vpr.data.datasets import open_dataset  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.describe.describe import describe  # noqa: E402
from vpr.evaluation.evaluate import database_hubness, track_profile  # noqa: E402
from vpr.index.hubness import hubness, step_pair, step_similarity  # noqa: E402
from vpr.index.knn import exact_knn  # noqa: E402
from vpr.index.meta import description_record  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.model.preprocess import database_config, query_config  # noqa: E402
from vpr.model.registry import Registry  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402
from vpr.track.tracker import DatabaseProfile, Tracker  # noqa: E402

STOPS, STOP_FRAMES = (20, 50, 80), 8
GOPRO_LEVELS = ("h120-jpeg20", "h90-jpeg20", "h60-jpeg20", "h45-jpeg20")
MARGIN = 0.002


def gopro_walks(home: Path, folder: Path, teacher: str, student: str) -> tuple[np.ndarray, list[dict], list]:
    """The GoPro map (teacher, orig, at its own size), its rows' metadata, and
    the leave-one-out walks (student and teacher at each level, queries at the map's size)."""
    ds = open_dataset("folder", folder, radius=1.0)
    paths, metas = [i.path for i in ds.database], [i.meta() for i in ds.database]
    reg, cache = Registry(home / "models"), DescriptorCache(home / "cache")
    t, s = reg.load(teacher, "cpu"), reg.load(student, "cpu")
    side = int(description_record(paths, database_config(t.net.config.preprocess))["side"])
    db = describe(t, paths, "orig", cache=cache, resize=database_config).desc
    inner = paths[1:-1]
    rule = functools.partial(query_config, side=side)
    walks = [describe(m, inner, q, cache=cache, resize=rule).desc for m in (s, t) for q in GOPRO_LEVELS]
    return db, metas, walks


def tracked(db, hub, profile, settings, walk, right) -> float:
    """Tracked recall@1 of one walk through THE tracker with each frame's descriptor."""
    scores, ids = exact_knn(db, walk, settings.candidates)
    tracker, ok = Tracker(settings, profile), 0
    for k in range(len(walk)):
        tracker.observe(ids[k], scores[k], None, at=k, hubness=hub[ids[k]], descriptor=walk[k])
        ok += int(tracker.ranking()[0] in right[k])
    return ok / len(walk)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tv.add_split_arguments(p)
    p.add_argument("--gopro-home", type=Path, default=REPO / "var" / "bench-beyond")
    p.add_argument("--gopro-folder", type=Path, help="default: GOPRO_HOME/data/gopro_s0.5_m320")
    p.add_argument("--gopro-teacher", default="gopro-vgg16-k64@1")
    p.add_argument("--gopro-student", default="gopro-student@1")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_validate_motion.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    db, described, ds, per_quality = tv.load_split(args.home, args.gardens, args.teacher, args.student, args.quality)
    hub, profile = database_hubness(db, ds), track_profile(ds, db)
    assert hub is not None and profile.step is not None
    folder = args.gopro_folder or args.gopro_home / "data" / "gopro_s0.5_m320"
    gdb, gmetas, gwalks = gopro_walks(args.gopro_home, folder, args.gopro_teacher, args.gopro_student)
    gxy = np.array([(m["utm_e"], m["utm_n"]) for m in gmetas])
    gx = gdb / np.linalg.norm(gdb, axis=1, keepdims=True)
    ghub = hubness(gx, [tuple(p) for p in gxy])
    gprofile = DatabaseProfile.from_rows(gmetas, len(gdb), step=step_pair(step_similarity(gx, [tuple(p) for p in gxy])))
    assert ghub is not None and gprofile.step is not None
    n = len(gdb)
    rows = {}
    for on in (False, True):
        settings = TrackSettings(frame_motion=on)
        tv._WORK = (db, described, ds, tv.walks(len(ds.queries)), hub)
        split = tv.score({k: getattr(settings, k) for k in tv.GRID} | {"frame_motion": on})["score"]
        loo = []
        for walk in gwalks:  # the map without the frame's own place
            scores, ids = exact_knn(gdb, walk, n)
            tracker, ok = Tracker(settings, gprofile), 0
            for k, pid in enumerate(range(1, n - 1)):
                keep = ids[k] != pid
                c, cs = ids[k][keep][: settings.candidates], scores[k][keep][: settings.candidates]
                tracker.observe(c, cs, [gmetas[j] for j in c], at=k, hubness=ghub[c], descriptor=walk[k])
                right = set(np.flatnonzero(np.linalg.norm(gxy - gxy[pid], axis=1) <= 1.0).tolist()) - {pid}
                ok += int(tracker.ranking()[0] in right)
            loo.append(ok / (n - 2))
        stops = []
        for spec, qd in described:
            others = [o for o, _ in described if o != spec]
            walk, right = [], []
            for j in range(len(qd)):
                walk.append(qd[j])
                right.append(set(ds.positives[j].tolist()))
                if j in STOPS:
                    for r in range(STOP_FRAMES):
                        walk.append(dict(described)[others[r % len(others)]][j])
                        right.append(set(ds.positives[j].tolist()))
            stops.append(tracked(db, hub, profile, settings, np.array(walk), right))
        parts = {"split": split, "gopro_loo": float(np.mean(loo)), "stops": float(np.mean(stops))}
        rows["on" if on else "off"] = {
            **parts,
            "mean": float(np.mean(list(parts.values()))),
            "gopro_loo_walks": loo,
            "stops_by_quality": dict(zip([s for s, _ in described], stops)),
        }
        print(
            ("frame_motion on " if on else "frame_motion off"), {k: round(v, 4) for k, v in parts.items()}, flush=True
        )
    adopt = rows["on"]["mean"] > rows["off"]["mean"] + MARGIN
    out = {
        "what": __doc__.splitlines()[0],
        "rule": f"adopt frame_motion iff mean(split, gopro_loo, stops) with it > without it + {MARGIN}",
        "split_qualities": per_quality,
        "split_step_similarity": profile.step,
        "gopro_step_similarity": gprofile.step,
        "results": rows,
        "adopt": adopt,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(args.out, out)
    print("adopt" if adopt else "keep it off", round(rows["on"]["mean"], 4), "vs", round(rows["off"]["mean"], 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
