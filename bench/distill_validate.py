"""Choose the distillation recipe on a validation split, never on test queries (issue 12).

The validation data is the database traversal only: Gardens Point `day_left`,
either small (`--size small`, the default: 160x90, as `beyond_gardens.py
--dataset small-gardens` makes it, at the small set's levels) or as it is
(`--size full`: 960x540, which the teacher describes at 640 px, at the 640 px
headline's levels, where small queries are upsampled 3x as in the test).
Its even frames are the training images and the database, its odd frames the
queries; a query is right when its first match is within +-2 frames (the
dataset's own tolerance). No `day_right` or `night_right` image is read.

Per candidate recipe (one change from the `DistillConfig` defaults) and seed:
a student is distilled label-free from a teacher clustered on the even frames
only, exactly as `vpr train distill` would (held-out validation inside the run,
early stop); then recall@1 of teacher and student on the odd frames at each
level, through THE description path and THE recall function, with the size
rule an index applies. The candidates and the adoption rule were written down
before the first run (docs/PREREGISTRATIONS.md).

    nice -n 5 .venv/bin/python bench/distill_validate.py --threads 2 --json bench/results/distill_validate.json
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beyond_gardens import SMALL_LEVELS, get_teacher, loadavg, setup, small_gardens
from distill_gardens import QUALITIES as FULL_LEVELS

from vpr.describe.cache import DescriptorCache
from vpr.describe.describe import describe, describe_many
from vpr.evaluation.evaluate import first_positive_ranks, recall_from_ranks
from vpr.index.meta import description_record
from vpr.media.degrade import codec_versions, in_condition, parse_qualities
from vpr.model.extract import cpu_name
from vpr.model.fileio import atomic_write_json
from vpr.model.preprocess import database_config, list_images, query_config
from vpr.model.registry import Registry
from vpr.settings import HomeSettings
from vpr.train.distill import DistillConfig, run_distill

log = logging.getLogger("distill_validate")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOLERANCE = 2  # frames, as Gardens Point's ground truth
# Fixed before the first run (the pre-registration): one change each from the defaults.
# Each candidate pins the defaults of its time that have changed since, so that it reproduces:
# the learning rate and the early stop (until entries 14 and 15) for all of them; the 5 epochs
# and `exact` epoch choice of the first ones; and dim_share 0 for all but the last before
# `-dim` existed.
UNTIL_14 = {"lr": 1e-4, "patience": 2}
BEFORE_DIM = {"dim_share": 0.0, **UNTIL_14}
FIRST = {"epochs": 5, "epoch_choice": "exact", **BEFORE_DIM}
# From the sixth on: the defaults of that time.
AFTER_DIM = {
    "epoch_choice": "within-noise",
    "dim_share": 0.25,
    "level_weights": "uniform",
    "crop_share": 0.0,
    **UNTIL_14,
}
CANDIDATES: dict[str, dict[str, Any]] = {
    "base": FIRST,
    "e15": {**FIRST, "epochs": 15},
    "lr3e-4": {**FIRST, "lr": 3e-4},
    "const": {**FIRST, "schedule": "constant"},
    # the second pre-registration: the epoch choice
    "exact": FIRST,
    "within-noise": {**FIRST, "epoch_choice": "within-noise"},
    # the third: longer training under the adopted epoch choice
    "e10": {**BEFORE_DIM, "epochs": 10, "epoch_choice": "within-noise"},
    # the fourth: monochrome copies in the mix (scored with --twins grey as well)
    "grey": {**BEFORE_DIM, "epochs": 10, "epoch_choice": "within-noise", "grey_share": 0.25},
    # the fifth: each training image's mirror as a second label-free view
    "mirror": {**BEFORE_DIM, "epochs": 10, "epoch_choice": "within-noise", "mirror": True},
    # the sixth: underexposed copies (-dim8) in the mix (scored with --twins dim8 as well); adopted
    "dim": {"epochs": 10, **AFTER_DIM},
    # pre-registration 7 (docs/PREREGISTRATIONS.md): the degraded levels drawn by the baseline's held-out loss
    "gap": {"epochs": 10, **AFTER_DIM, "level_weights": "baseline-loss"},
    # pre-registration 8: half the degraded samples seen through a shifted crop of 0.8 of each side
    "crop": {"epochs": 10, **AFTER_DIM, "crop_share": 0.5},
    # pre-registration 9: a regional feature term beside the descriptor and the channel correlations
    "regions": {"epochs": 10, **AFTER_DIM, "loss": "mse+ickd+regions"},
    # pre-registration 11: a schedule twice as long (scored on the full split, dark twins first); adopted
    "e20": {"epochs": 20, **AFTER_DIM},
    # pre-registration 12: twice as long again
    "e40": {"epochs": 40, **AFTER_DIM},
    # pre-registration 13: half the degraded samples underexposed
    "dim50": {"epochs": 20, **AFTER_DIM, "dim_share": 0.5},
    # pre-registration 14: twice the learning rate over the same 20-epoch cosine
    "lr2e-4": {"epochs": 20, **AFTER_DIM, "lr": 2e-4},
    # pre-registration 15: the whole schedule, the best epoch registered (scored on the small split)
    "p-none": {"epochs": 20, **AFTER_DIM, "lr": 2e-4, "patience": None},
}


def split(day_left: Path, out: Path) -> tuple[Path, Path]:
    """Even frames -> train/ (training images and database), odd frames -> val/ (queries)."""
    root = out / f"{day_left.parent.name}_day_left_split"
    if not root.exists():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("train", "val"):
            (tmp / part).mkdir(parents=True)
        for i, p in enumerate(list_images(day_left)):
            shutil.copy(p, tmp / ("train" if i % 2 == 0 else "val") / p.name)
        tmp.rename(root)
    return root / "train", root / "val"


def positives(n_train: int, n_val: int) -> list[np.ndarray]:
    """Odd frame 2k+1 against even frames 2j: right when |2k+1 - 2j| <= TOLERANCE."""
    frames = 2 * np.arange(n_train)
    return [np.flatnonzero(np.abs(frames - (2 * k + 1)) <= TOLERANCE) for k in range(n_val)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "vgg16_imagenet_caffe_features.safetensors")
    p.add_argument(
        "--size",
        choices=["small", "full"],
        default="small",
        help="small: day_left at 160x90 and the small set's levels; full: day_left as it is (the teacher "
        "describes it at 640 px) and the 640 px headline's levels",
    )
    p.add_argument("--home", type=Path, help="default: var/bench-validate (small) or var/bench-validate-full")
    p.add_argument("--samples", type=int, default=50_000, help="local features for k-means")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="names from CANDIDATES, or a+b combinations")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--twins", help="also score each level under this capture condition (grey, dim8, dark32)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    setup(args)
    args.home = args.home or REPO / "var" / ("bench-validate" if args.size == "small" else "bench-validate-full")
    home = HomeSettings(home=args.home)
    reg = Registry(home.models_dir)
    if args.size == "small":
        day_left = Path(small_gardens(args.gardens, args.home / "data", (160, 90))["day_right"].database[0].path).parent
    else:
        day_left = args.gardens / "day_left"
    train_dir, val_dir = split(day_left, args.home / "data")
    train, val = list_images(train_dir), list_images(val_dir)
    pos = positives(len(train), len(val))
    listed = parse_qualities(SMALL_LEVELS if args.size == "small" else FULL_LEVELS)
    levels = [str(q) for q in listed if str(q) != "orig"]
    twins = [str(in_condition(q, args.twins)) for q in levels] if args.twins else []
    qualities = ["orig", *levels, *twins]
    report: dict[str, Any] = {
        "argv": sys.argv,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "codecs": codec_versions(),
        "loadavg_start": loadavg(),
        "size": args.size,
        "train_images": len(train),
        "val_queries": len(val),
        "qualities": qualities,
        "candidates": {},
    }

    def save() -> None:
        if args.json:
            atomic_write_json(args.json, report)

    t0 = time.perf_counter()
    teacher_ref = get_teacher(reg, "split-vgg16-k64", args, train_dir)
    teacher = reg.load(teacher_ref, "cpu")
    report["teacher"] = teacher_ref
    cache = DescriptorCache(home.cache_dir)
    record = description_record(train, database_config(teacher.net.config.preprocess))
    assert record is not None
    rule = functools.partial(query_config, side=int(record["side"]))
    db = describe(teacher, train, "orig", cache=cache, resize=database_config, progress="database").desc

    def recall1(q: np.ndarray) -> float:
        ranks = first_positive_ranks(db, q, pos, 1)
        return round(float(recall_from_ranks(ranks, (1,))[1]), 4)

    report["teacher_recall"] = {
        q: recall1(describe(teacher, val, q, cache=cache, resize=rule, progress=f"teacher {q}").desc) for q in qualities
    }
    save()
    for name in args.candidates.split(","):
        change: dict[str, Any] = {}
        for part in name.split("+"):
            change.update(CANDIDATES[part])
        runs: dict[str, Any] = {"change": change, "seeds": {}}
        report["candidates"][name] = runs
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = DistillConfig(
                teacher=teacher_ref,
                name=f"split-{name.replace('+', '-')}-s{seed}",
                qualities=levels,
                images=train_dir,
                seed=seed,
                run_dir=home.home / "runs" / f"{name}-s{seed}",
                **change,
            )
            t = time.perf_counter()
            result = run_distill(cfg, home, resume=(cfg.run_dir / "state.json").exists())  # type: ignore[operator]
            student = reg.load(result.ref, "cpu")
            rec = {}
            for q in qualities:
                (d,) = describe_many([student], val, q, cache=cache, resize=rule, progress=f"{name} s{seed} {q}")
                rec[q] = recall1(d.desc)
            runs["seeds"][str(seed)] = {
                "student": str(result.ref),
                "best_epoch": result.best_epoch,
                "recall": rec,
                "score": round(float(np.mean([rec[q] for q in levels])), 4),
                **({"twin_score": round(float(np.mean([rec[q] for q in twins])), 4)} if twins else {}),
                "wall_s": round(time.perf_counter() - t, 1),
            }
            save()
        runs["score"] = round(float(np.mean([s["score"] for s in runs["seeds"].values()])), 4)
        if twins:
            runs["twin_score"] = round(float(np.mean([s["twin_score"] for s in runs["seeds"].values()])), 4)
        save()
    report["teacher_score"] = round(float(np.mean([report["teacher_recall"][q] for q in levels])), 4)
    if twins:
        report["teacher_twin_score"] = round(float(np.mean([report["teacher_recall"][q] for q in twins])), 4)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["loadavg_end"] = loadavg()
    save()
    t = report["teacher_recall"]
    print(f"\n{'':<14}" + "".join(f"{q:>15}" for q in qualities) + f"{'score':>8}")
    print(f"{'teacher':<14}" + "".join(f"{t[q]:>15.3f}" for q in qualities) + f"{report['teacher_score']:>8.3f}")
    for name, runs in report["candidates"].items():
        for seed, r in runs["seeds"].items():
            row = "".join(f"{r['recall'][q]:>15.3f}" for q in qualities)
            print(f"{name + ' s' + seed:<14}{row}{r['score']:>8.3f}  (epoch {r['best_epoch']})")
        print(f"{name + ' mean':<14}{'':>{15 * len(qualities)}}{runs['score']:>8.3f}", runs.get("twin_score", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
