"""Teacher and student beyond full-size Gardens Point: the size rule, full quality, the label-free epoch.

Two datasets that no default was chosen on (issue 12):

- `small-gardens`: Gardens Point Walking with database (`day_left`) and query
  sets (`day_right`, `night_right`) downsampled to 160x90 (bicubic, JPEG 95)
  before anything else, the small-image condition of the issue; positives
  from `ground_truth.csv` (+-2 frames).
- `gopro`: the GoPro walk of ../shared/videos/gopro_walk with its GPS track,
  through `data.video_dataset.video_to_dataset`: database frames every
  --spacing metres, queries half-way between them (`split_queries`), frames
  stored at --frame-side px; a query is right within --radius metres.

Per dataset, with the project's defaults and nothing chosen on test queries:

1. teacher: VGG16 (../shared/weights, caffe) + NetVLAD K=64 by k-means on the
   database images (`model.teacher.init_teacher`, `vpr model init`), with the
   default preprocessing (max side 640, small_policy `database`);
2. the same weights under the old default (`upsample` to 640), for the
   side-by-side of the size rules (`old default` column);
3. student: `train.distill.run_distill` (`vpr train distill`) label-free on the
   database images with the default loss, full-quality share, held-out
   validation (which picks the registered epoch and stops early) and
   --train-qualities (the degraded levels of the table);
4. recall@N: the database described by the teacher at `orig` under each rule
   (the new rule: at its own size, and the side recorded as an index would;
   queries resized to that side), queries by teacher and student at each
   quality through THE description path (`describe.describe_many`) and THE
   recall function (`evaluation.evaluate.first_positive_ranks`).

The old default runs the network at 640 px, 20 times the pixels of 160x90:
on a CPU it is evaluated on --old-query-limit queries per set (evenly spread),
and the new rule's teacher on the same queries beside it.

    .venv/bin/python bench/beyond_gardens.py --dataset small-gardens --threads 2 \\
        --json bench/results/beyond_gardens_small.json
    .venv/bin/python bench/beyond_gardens.py --dataset gopro --json bench/results/beyond_gardens_gopro.json
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpr.data.datasets import PlaceDataset, open_dataset
from vpr.describe.cache import DescriptorCache
from vpr.describe.describe import describe, describe_many
from vpr.evaluation.evaluate import NO_POSITIVE, first_positive_ranks, recall_from_ranks
from vpr.index.meta import description_record
from vpr.media.degrade import codec_versions, parse_qualities
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.extract import cpu_name
from vpr.model.fileio import atomic_write_json, sha256_file
from vpr.model.network import build_model
from vpr.model.preprocess import database_config, query_config
from vpr.model.registry import LoadedModel, Registry
from vpr.model.teacher import init_teacher
from vpr.settings import HomeSettings
from vpr.train.distill import DistillConfig, run_distill

log = logging.getLogger("beyond_gardens")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NS = (1, 5, 10)
# The degraded levels, fixed before any run: for 90 px high images, the same
# kinds of level as the small-image probe (h90/h60 JPEG 20, H.264 QP 40 at
# full size) plus a 45 px level (a query about a quarter of the database's pixels).
SMALL_LEVELS = "h90-jpeg20,h60-jpeg20,h45-jpeg20,h90-h264-qp40"
# GoPro frames stored at 320x181: the headline's levels scaled to that height.
GOPRO_LEVELS = "h120-jpeg20,h90-jpeg20,h60-jpeg20,h120-h264-qp40"


def setup(args: argparse.Namespace) -> None:
    """Log lines with their times, and the torch threads asked for (--threads)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)


def recipe_options(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The recipe settings given on the command line (--low-light-share, --grey-share,
    --dim-share, --crop-share, --level-weights; the others stay DistillConfig's) and
    their part of a run's name: each named when it differs from what runs had before it
    existed (a share 0, levels drawn uniformly), so that those runs keep their names."""
    given: dict[str, Any] = {}
    name = ""
    shares = (("low_light_share", "ll"), ("grey_share", "g"), ("dim_share", "dim"), ("crop_share", "cr"))
    for field, short in shares:
        value = getattr(args, field)
        if value is not None:
            given[field] = value
        share = DistillConfig.model_fields[field].default if value is None else value
        name += f"{short}{share:g}-" if share else ""
    if args.level_weights is not None:
        given["level_weights"] = args.level_weights
    draw = args.level_weights or DistillConfig.model_fields["level_weights"].default
    name += f"lw{draw}-" if draw != "uniform" else ""
    return given, name


LEVEL_WEIGHTS = typing.get_args(DistillConfig.model_fields["level_weights"].annotation)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- data -----------------------------------------------------------------------------------
def small_gardens(src: Path, out: Path, size: tuple[int, int]) -> dict[str, PlaceDataset]:
    """Gardens Point with every image downsampled to `size` (written once)."""
    root = out / f"gardens_{size[0]}x{size[1]}"
    if not (root / "ground_truth.csv").exists():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("day_left", "day_right", "night_right"):
            (tmp / part).mkdir(parents=True)
            for p in sorted((src / part).glob("*.jpg")):
                Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                    tmp / part / p.name, quality=95
                )
        shutil.copy(src / "ground_truth.csv", tmp / "ground_truth.csv")
        tmp.rename(root)
    return {
        q: open_dataset("traversal", root, database="day_left", queries=q, ground_truth=root / "ground_truth.csv")
        for q in ("day_right", "night_right")
    }


def gopro(src: Path, out: Path, spacing: float, frame_side: int, radius: float) -> dict[str, PlaceDataset]:
    from vpr.data.video_dataset import video_to_dataset

    root = out / f"gopro_s{spacing:g}_m{frame_side}"
    if not root.exists():
        video_to_dataset(
            src / "walk.mp4", src / "gps.csv", root, spacing=spacing, split_queries=True, max_side=frame_side
        )
    return {"walk": open_dataset("folder", root, radius=radius)}


# ---- models ---------------------------------------------------------------------------------
def get_teacher(reg: Registry, name: str, args: argparse.Namespace, db_dir: Path) -> str:
    weights_sha = sha256_file(args.weights)
    for v in reversed(reg.versions(name)):
        if reg.manifest(f"{name}@{v}")["details"].get("weights_sha256") == weights_sha:
            return f"{name}@{v}"
    config = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=64),
        preprocess=PreprocessConfig(mode="caffe"),  # the defaults: max side 640, policy `database`
    )
    return str(init_teacher(reg, name, config, str(args.weights), db_dir, samples=args.samples, seed=0, device="cpu"))


def old_default(reg: Registry, teacher: LoadedModel) -> str:
    """The same weights under the old default preprocessing (`upsample` to max_side)."""
    name = f"{teacher.ref.name}-old-default"
    for v in reversed(reg.versions(name)):
        if reg.manifest(f"{name}@{v}")["details"].get("teacher_sha256") == teacher.sha256:
            return f"{name}@{v}"
    pre = teacher.net.config.preprocess.model_copy(update={"small_policy": "upsample"})
    net = build_model(teacher.net.config.model_copy(update={"preprocess": pre}))
    net.load_state_dict(teacher.net.state_dict())
    return str(reg.register(name, net.eval(), role="teacher", details={"teacher_sha256": teacher.sha256}))


def get_student(home: HomeSettings, teacher: str, args: argparse.Namespace, db_dir: Path, tag: str) -> dict:
    recipe, named = recipe_options(args)
    trainable = {} if args.trainable is None else {"trainable": args.trainable.split(",")}
    parts = f"t{args.trainable}-" if args.trainable else ""  # default parts: the name runs always had
    parts += f"v{args.val_rule}-" if args.val_rule else ""
    # the epoch choice: named when it is not the one runs had before it existed ("exact")
    choice = DistillConfig.model_fields["epoch_choice"].default
    parts += f"c{choice}-" if choice != "exact" else ""
    # the learning rate: named when it is not the one runs had before it changed (1e-4)
    lr = DistillConfig.model_fields["lr"].default
    parts += f"lr{lr:g}-" if lr != 1e-4 else ""
    # the early stop: named when it is not the one runs had before it changed (patience 2)
    patience = DistillConfig.model_fields["patience"].default
    parts += f"p{patience}-" if patience != 2 else ""
    rule = {} if args.val_rule is None else {"val_rule": args.val_rule}
    run = f"{tag}-e{args.epochs}-{named}{parts}q{args.train_qualities}".replace(",", "_")
    cfg = DistillConfig(
        teacher=teacher,
        name=f"{tag}-student",
        qualities=args.train_qualities.split(","),
        images=db_dir,
        epochs=args.epochs,
        seed=0,
        progress=True,
        run_dir=home.home / "runs" / run,
        **recipe,
        **trainable,
        **rule,
    )
    t0 = time.perf_counter()
    result = run_distill(cfg, home, resume=cfg.run_dir is not None and (cfg.run_dir / "state.json").exists())
    details = Registry(home.models_dir).manifest(result.ref)["details"]
    return {
        "student": str(result.ref),
        "wall_s": round(time.perf_counter() - t0, 1),
        "best_epoch": result.best_epoch,
        "stopped": details.get("stopped"),
        "validation_baseline": details.get("validation_baseline"),
        "history": details["history"],
        "orig_share": details.get("orig_share"),
        "low_light": details.get("low_light"),
        "grey_share": details.get("grey_share", 0.0),
        "dim": details.get("dim"),
        "level_weights": details.get("level_weights"),
        "crop": details.get("crop"),
        "trainable": details.get("trainable"),
        "validation": details.get("validation"),
        "student_input_side": details.get("student_input_side"),
        "train_images": details.get("train_images"),
        "val_images": details.get("val_images"),
    }


# ---- evaluation -----------------------------------------------------------------------------
def recalls(db: np.ndarray, q: np.ndarray, positives: list[np.ndarray]) -> dict[str, float]:
    ranks = first_positive_ranks(db, q, positives, max(NS))
    assert (ranks != NO_POSITIVE).all(), "every query has a positive in these sets"
    return {str(n): round(v, 4) for n, v in recall_from_ranks(ranks, NS).items()}


def evaluate_set(
    teacher: LoadedModel,
    student: LoadedModel,
    ds: PlaceDataset,
    qualities: list[str],
    cache: DescriptorCache,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Recall of teacher and student at each quality under the size rule, as an index and
    the server apply it (all queries)."""
    db_paths = [i.path for i in ds.database]
    record = description_record(db_paths, database_config(teacher.net.config.preprocess))
    assert record is not None
    side = int(record["side"])
    rule = functools.partial(query_config, side=side)
    db_new = describe(teacher, db_paths, "orig", cache=cache, resize=database_config, progress="db (new rule)").desc
    rows: dict[str, Any] = {}
    out.update(description=record, queries=len(ds.queries), recall=rows)
    for q in qualities:
        new_t, new_s = describe_many(
            [teacher, student], [i.path for i in ds.queries], q, cache=cache, resize=rule, progress=f"queries {q}"
        )
        rows[q] = {
            "teacher": recalls(db_new, new_t.desc, ds.positives),
            "student": recalls(db_new, new_s.desc, ds.positives),
            **new_t.cost(),
        }
    out["won_back"] = won_back(rows)
    save()


def evaluate_old(
    teacher: LoadedModel,
    old: LoadedModel,
    ds: PlaceDataset,
    qualities: list[str],
    old_limit: int,
    cache: DescriptorCache,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """The old default (upsample to 640) beside the new rule's teacher, on `old_limit` queries."""
    db_paths = [i.path for i in ds.database]
    side = int(out["description"]["side"])
    rule = functools.partial(query_config, side=side)
    db_new = describe(teacher, db_paths, "orig", cache=cache, resize=database_config).desc
    sub = ds.subset_queries(old_limit)
    rows = out["recall"]
    out["old_default_queries"] = len(sub.queries)
    db_old = describe(old, db_paths, "orig", cache=cache, progress="db (old default)").desc
    for q in qualities:
        sub_new = describe(teacher, [i.path for i in sub.queries], q, cache=cache, resize=rule).desc
        sub_old = describe(old, [i.path for i in sub.queries], q, cache=cache, progress=f"old {q}").desc
        rows[q]["subset_teacher_new_rule"] = recalls(db_new, sub_new, sub.positives)
        rows[q]["subset_teacher_old_default"] = recalls(db_old, sub_old, sub.positives)
        save()


def won_back(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Per degraded level: the teacher's loss of recall@1 against orig, the share the student wins back."""
    t_orig = rows["orig"]["teacher"]["1"]
    out = []
    for q, r in rows.items():
        t, s = r["teacher"]["1"], r["student"]["1"]
        row: dict[str, Any] = {"quality": q, "teacher": t, "student": s, "delta_points": round(100 * (s - t), 1)}
        if q == "orig":
            row["ok"] = s >= t - 0.01
        else:
            lost = t_orig - t
            row["share_won_back"] = round((s - t) / lost, 3) if lost > 0 else None
            row["ok"] = (s - t) >= 0.5 * lost if lost > 0 else s >= t
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["small-gardens", "gopro"])
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--video", type=Path, default=SHARED / "videos" / "gopro_walk")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "vgg16_imagenet_caffe_features.safetensors")
    p.add_argument("--home", type=Path, default=REPO / "var" / "bench-beyond")
    p.add_argument("--samples", type=int, default=50_000, help="local features for k-means")
    p.add_argument("--train-qualities", help="default: the degraded levels of the dataset")
    p.add_argument("--epochs", type=int, default=DistillConfig.model_fields["epochs"].default)
    p.add_argument("--low-light-share", type=float, help="default: DistillConfig's")
    p.add_argument("--grey-share", type=float, help="default: DistillConfig's")
    p.add_argument("--dim-share", type=float, help="default: DistillConfig's")
    p.add_argument("--level-weights", choices=LEVEL_WEIGHTS, help="default: DistillConfig's")
    p.add_argument("--crop-share", type=float, help="default: DistillConfig's")
    p.add_argument("--trainable", help="parts the student trains, e.g. conv4,conv5,netvlad; default: DistillConfig's")
    p.add_argument("--val-rule", choices=["self", "neighbours"], help="default: DistillConfig's")
    p.add_argument("--old-query-limit", type=int, default=50, help="queries per set for the old-default column")
    p.add_argument("--spacing", type=float, default=0.5, help="gopro: metres between database frames")
    p.add_argument("--frame-side", type=int, default=320, help="gopro: longer side of the stored frames")
    p.add_argument("--radius", type=float, default=1.0, help="gopro: a query is right within this many metres")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    setup(args)
    levels = SMALL_LEVELS if args.dataset == "small-gardens" else GOPRO_LEVELS
    args.train_qualities = args.train_qualities or levels
    qualities = ["orig", *[str(q) for q in parse_qualities(levels)]]
    home = HomeSettings(home=args.home)
    reg = Registry(home.models_dir)
    data = args.home / "data"
    t0 = time.perf_counter()
    if args.dataset == "small-gardens":
        sets = small_gardens(args.gardens, data, (160, 90))
        tag = "small-gardens"
    else:
        sets = gopro(args.video, data, args.spacing, args.frame_side, args.radius)
        tag = "gopro"
    db_dir = Path(next(iter(sets.values())).database[0].path).parent
    report: dict[str, Any] = {
        "argv": sys.argv,
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "codecs": codec_versions(),
        "loadavg_start": loadavg(),
        "qualities": qualities,
    }
    t_init = time.perf_counter()
    teacher_ref = get_teacher(reg, f"{tag}-vgg16-k64", args, db_dir)
    report["teacher_init_s"] = round(time.perf_counter() - t_init, 1)
    teacher = reg.load(teacher_ref, "cpu")
    old = reg.load(old_default(reg, teacher), "cpu")
    report["training"] = get_student(home, teacher_ref, args, db_dir, tag)
    student = reg.load(report["training"]["student"], "cpu")
    report.update(teacher=teacher_ref, old_default=str(old.ref), student=str(student.ref))
    cache = DescriptorCache(home.cache_dir)
    t_eval = time.perf_counter()
    report["sets"] = {}

    def save() -> None:  # partial results, in case the old-default column does not finish
        if args.json:
            atomic_write_json(args.json, report)

    for name, ds in sets.items():
        report["sets"][name] = {}
        evaluate_set(teacher, student, ds, qualities, cache, report["sets"][name], save)
    for name, ds in sets.items():  # the old default last: 640 px inputs are the expensive part on a CPU
        evaluate_old(teacher, old, ds, qualities, args.old_query_limit, cache, report["sets"][name], save)
    report["evaluation_s"] = round(time.perf_counter() - t_eval, 1)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["all_ok"] = all(r["ok"] for s in report["sets"].values() for r in s["won_back"])
    report["loadavg_end"] = loadavg()
    for name, res in report["sets"].items():
        print(f"\n{tag} / {name}: database side {res['description']['side']} px")
        print(f"{'quality':<16}{'old teacher*':>13}{'new teacher*':>13}{'teacher':>9}{'student':>9}{'won back':>10}")
        for row in res["won_back"]:
            r = res["recall"][row["quality"]]
            share = row.get("share_won_back")
            print(
                f"{row['quality']:<16}{r['subset_teacher_old_default']['1']:>13.3f}"
                f"{r['subset_teacher_new_rule']['1']:>13.3f}{row['teacher']:>9.3f}{row['student']:>9.3f}"
                f"{'' if share is None else f'{100 * share:.0f}%':>10}{'' if row['ok'] else '  (bar not met)'}"
            )
    subsets = {n: s.get("old_default_queries") for n, s in report["sets"].items()}
    print(f"\n* on {subsets} queries (evenly spread); all bars met: {report['all_ok']}")
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
