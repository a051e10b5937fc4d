"""Headline experiment: does a distilled student beat its teacher on low-quality queries?

Gardens Point Walking (../shared/datasets/gardens_point_walking):
- teacher: VGG16 (../shared/weights, caffe preprocessing) + NetVLAD K=64,
  clusters by k-means on `day_left` (`model.teacher.init_teacher`, what
  `vpr model init` runs); reused when the same teacher is already registered;
- student: distilled label-free on `day_left` only (`train.distill.run_distill`,
  what `vpr train distill` runs), qualities drawn from --train-qualities;
- database: `day_left` described by the teacher at `orig`;
- queries: `day_right` and `night_right` at every --eval-qualities, described
  by the teacher and by the student under the same small-image policy;
  positives from `ground_truth.csv` (+-2 frames); recall through
  `evaluation.evaluate.recall_at_n`.

Evaluation: `evaluation.evaluate.evaluate` per query set, i.e. THE
description path (`describe.describe`: every query through each whole
network, one decode-and-degrade pass shared by teacher and student) with
THE descriptor cache in the bench's home, so the database and unchanged
models are described once across sets and runs. `--eval fast` is kept as an
alias of `full` (it used to run the frozen prefix shared by teacher and
student once per query; that second description loop is gone).

Reports recalls, training wall/CPU time, the CPU and the load; writes JSON
and a PNG (recall@1 per quality, teacher vs student).

    .venv/bin/python bench/distill_gardens.py --max-side 640 --epochs 5 \\
        --json bench/out/distill_gardens.json --plot bench/out/distill_gardens.png
    # cheap cost probe
    .venv/bin/python bench/distill_gardens.py --max-side 320 --epochs 1 --limit 20 --query-limit 20
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import time
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beyond_gardens import LEVEL_WEIGHTS, recipe_options

from vpr.data.datasets import PlaceDataset, open_dataset
from vpr.describe.cache import DescriptorCache
from vpr.evaluation.evaluate import evaluate
from vpr.media.degrade import codec_versions, parse_qualities
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.extract import cpu_name
from vpr.model.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from vpr.model.registry import Registry, RegistryError
from vpr.model.teacher import init_teacher
from vpr.settings import HomeSettings
from vpr.train.distill import QUALITY_PLAN, DistillConfig, run_distill
from vpr.train.losses import parse_loss

log = logging.getLogger("distill_gardens")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QUALITIES = "orig,h240,h180-jpeg20,h120-jpeg20,h180-h264-qp40"
NS = (1, 5, 10, 20)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Clock:
    """Wall and CPU seconds (this process and its children) of a phase."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def done(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.t0, 1), "cpu_s": round(self._cpu() - self.c0, 1)}


# ---- teacher -------------------------------------------------------------------------
def get_teacher(reg: Registry, args: argparse.Namespace, gardens: Path) -> tuple[str, dict]:
    """The registered teacher for these settings, initialising it when missing."""
    name = f"gardens-vgg16-k{args.clusters}-ms{args.max_side}-{args.policy}"
    weights_sha = sha256_file(args.weights)
    for v in reversed(reg.versions(name)):
        m = reg.manifest(f"{name}@{v}")
        if m["details"].get("weights_sha256") == weights_sha and m["details"].get("cluster_seed") == args.teacher_seed:
            log.info("reusing teacher %s@%d", name, v)
            return f"{name}@{v}", {"reused": True}
    config = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=args.clusters),
        preprocess=PreprocessConfig(mode="caffe", max_side=args.max_side, small_policy=args.policy),
    )
    clock = Clock()
    ref = init_teacher(
        reg,
        name,
        config,
        str(args.weights),
        gardens / "day_left",
        samples=args.samples,
        seed=args.teacher_seed,
        activate=True,
        device=args.device or "cpu",
    )
    return str(ref), {"reused": False, **clock.done()}


# ---- student -------------------------------------------------------------------------
def run_tag(args: argparse.Namespace) -> str:
    share = "d" if args.orig_share is None else f"{args.orig_share:g}"  # d: DistillConfig's default
    # the quality plan's version: under plan 2 a listed `orig` no longer adds to the share
    share += f"p{QUALITY_PLAN}" if "orig" in args.train_qualities.split(",") else ""
    # the epoch choice: named when it is not the one runs had before it existed ("exact")
    choice = DistillConfig.model_fields["epoch_choice"].default
    share += f"-c{choice}" if choice != "exact" else ""
    # the early stop: named when it is not the one runs had before it changed (patience 2)
    patience = DistillConfig.model_fields["patience"].default
    share += f"-p{patience}" if patience != 2 else ""
    val = "d" if args.val_fraction is None else f"{args.val_fraction:g}"
    named = recipe_options(args)[1]  # the capture conditions in the mix and the levels' draw, named when on
    tag = (
        f"ms{args.max_side}-{args.policy}-o{share}-v{val}-{named}"
        f"{args.loss}-w{args.loss_weights or '1'}-lr{args.lr:g}-{args.trainable}-"
        f"e{args.epochs}-{args.schedule}-b{args.batch_size}-s{args.seed}-l{args.limit or 'all'}-q{args.train_qualities}"
    )
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", tag)[:180]


def get_student(home: HomeSettings, teacher: str, args: argparse.Namespace, gardens: Path) -> tuple[str, dict]:
    cfg = DistillConfig(
        teacher=teacher,
        name=args.name,
        qualities=args.train_qualities.split(","),
        images=gardens / "day_left",
        limit=args.limit,
        loss=args.loss,
        loss_weights=parse_loss(args.loss, args.loss_weights).weights,
        trainable=args.trainable.split(","),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        seed=args.seed,
        device=args.device,
        progress=True,
        run_dir=home.home / "runs" / run_tag(args),
        **{
            k: v
            for k, v in (
                ("orig_share", args.orig_share),
                ("val_fraction", args.val_fraction),
            )
            if v is not None
        },
        **recipe_options(args)[0],
    )
    clock = Clock()
    result = run_distill(cfg, home, resume=cfg.run_dir.joinpath("state.json").exists())
    reg = Registry(home.models_dir)
    details = reg.manifest(result.ref)["details"]
    return str(result.ref), {
        **clock.done(),
        "train_seconds": details["train_seconds"],
        "best_epoch": result.best_epoch,
        "chosen_by": details.get("validation"),  # the label-free validation (train.validation), not the test
        "stopped": details.get("stopped"),
        "low_light": details.get("low_light"),
        "grey_share": details.get("grey_share", 0.0),
        "dim": details.get("dim"),
        "level_weights": details.get("level_weights"),
        "crop": details.get("crop"),
        "history": details["history"],
        "run_dir": str(result.run_dir),
    }


# ---- evaluation -------------------------------------------------------------------------
def query_sets(gardens: Path, limit: int | None) -> dict[str, PlaceDataset]:
    out = {}
    for q in ("day_right", "night_right"):
        ds = open_dataset(
            "traversal", gardens, database="day_left", queries=q, ground_truth=gardens / "ground_truth.csv"
        )
        out[q] = ds.subset_queries(limit) if limit else ds
    return out


def evaluate_sets(
    reg: Registry,
    teacher: str,
    student: str,
    sets: dict[str, PlaceDataset],
    qualities: list[str],
    home: HomeSettings,
    device: torch.device,
) -> tuple[dict, dict]:
    """Recall of teacher and student per set and quality (the database is described once: cached)."""
    cache = DescriptorCache(home.cache_dir)
    results: dict = {}
    for name, ds in sets.items():
        report = evaluate(reg, ds, teacher, [teacher, student], qualities, cache=cache, ns=NS, device=device)
        for r in report["results"]:
            who = "teacher" if r["query_model"] == teacher else "student"
            results.setdefault(name, {}).setdefault(r["quality"], {})[who] = {
                k: round(float(v), 4) for k, v in r["recall"].items()
            }
    return results, {"mode": "full", "cache": str(cache.root)}


def verdict(results: dict) -> dict:
    """The issue's acceptance: student R@1 > teacher R@1 at every degraded quality, >= teacher - 1 point at orig."""
    rows = []
    for name, per_q in results.items():
        for q, r in per_q.items():
            t, s = r["teacher"]["1"], r["student"]["1"]
            ok = s >= t - 0.01 if q == "orig" else s > t
            rows.append(
                {
                    "set": name,
                    "quality": q,
                    "teacher_r1": t,
                    "student_r1": s,
                    "delta_points": round(100 * (s - t), 1),
                    "ok": ok,
                }
            )
    return {"all_ok": all(r["ok"] for r in rows), "rows": rows}


def plot(results: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, per_q) in zip(axes[0], results.items()):
        qs = list(per_q)
        for who, style in (("teacher", "o--"), ("student", "s-")):
            ax.plot(qs, [100 * per_q[q][who]["1"] for q in qs], style, label=who)
        ax.set(title=f"queries {name}", ylabel="recall@1 (%)", ylim=(0, 100))
        ax.tick_params(axis="x", rotation=20)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "vgg16_imagenet_caffe_features.safetensors")
    p.add_argument("--home", type=Path, default=REPO / "var" / "bench-distill")
    p.add_argument("--max-side", type=int, default=640)
    # `database` (the default size rule) equals `upsample` on these 960x540 / 640x360 frames
    # at any --max-side up to 640: the database is capped at max_side, so its recorded side
    # is max_side and queries are upsampled to it; `evaluate` (no index) prepares them so.
    p.add_argument("--policy", default="database", choices=["database", "native", "upsample"])
    p.add_argument("--orig-share", type=float, help="full-quality share of training samples (default: DistillConfig's)")
    p.add_argument("--val-fraction", type=float, help="held-out share for the label-free validation (default: its)")
    p.add_argument("--low-light-share", type=float, help="share of degraded samples also in low light (default: off)")
    p.add_argument("--grey-share", type=float, help="share of degraded samples also in grey (default: DistillConfig's)")
    p.add_argument("--dim-share", type=float, help="share of degraded samples also underexposed (DistillConfig's)")
    p.add_argument("--level-weights", choices=LEVEL_WEIGHTS, help="how degraded levels are drawn (DistillConfig's)")
    p.add_argument("--crop-share", type=float, help="share of degraded samples seen through a crop (DistillConfig's)")
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--samples", type=int, default=50_000, help="local features for k-means")
    p.add_argument("--name", default="gardens-student")
    p.add_argument("--train-qualities", default=QUALITIES)
    p.add_argument("--eval-qualities", default=QUALITIES)
    p.add_argument("--loss", default=DistillConfig.model_fields["loss"].default)
    p.add_argument("--loss-weights", help="name=value,...")
    p.add_argument("--trainable", default="conv5,netvlad")
    p.add_argument("--epochs", type=int, default=DistillConfig.model_fields["epochs"].default)
    p.add_argument("--lr", type=float, default=DistillConfig.model_fields["lr"].default)
    schedule = DistillConfig.model_fields["schedule"]
    p.add_argument("--schedule", default=schedule.default, choices=typing.get_args(schedule.annotation))
    p.add_argument("--batch-size", type=int, default=DistillConfig.model_fields["batch_size"].default)
    p.add_argument("--seed", type=int, default=0, help="training seed (quality draws, order)")
    p.add_argument("--teacher-seed", type=int, default=0, help="k-means seed of the teacher's clusters")
    p.add_argument("--limit", type=int, help="train on this many day_left images (evenly spread)")
    p.add_argument("--query-limit", type=int, help="evaluate this many queries per set (evenly spread)")
    p.add_argument(
        "--eval", default="full", choices=["fast", "full"], help="fast: an alias of full (old command lines)"
    )
    p.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (on a shared, loaded CPU 1 can beat 2)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write recall@1 per quality here (PNG)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    gardens = args.gardens
    for need in (gardens / "day_left", gardens / "ground_truth.csv", args.weights):
        if not need.exists():
            raise SystemExit(f"{need}: missing (see ../shared/README.md)")
    parse_qualities(args.train_qualities)
    quals = [str(q) for q in parse_qualities(args.eval_qualities)]
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = HomeSettings(home=args.home)
    reg = Registry(home.models_dir)
    report: dict = {
        "argv": sys.argv,
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "codecs": codec_versions(),
        "device": str(device),
        "loadavg_start": loadavg(),
    }
    teacher, report["teacher_init"] = get_teacher(reg, args, gardens)
    student, report["training"] = get_student(home, teacher, args, gardens)
    report.update(teacher=teacher, student=student)
    clock = Clock()
    sets = query_sets(gardens, args.query_limit)
    try:
        results, report["evaluation"] = evaluate_sets(reg, teacher, student, sets, quals, home, device)
    except RegistryError as e:
        raise SystemExit(str(e)) from e
    report["evaluation"].update(clock.done())
    report["recall"] = results
    report["verdict"] = verdict(results)
    report["loadavg_end"] = loadavg()
    print(
        f"\nteacher {teacher}  student {student}  ({args.loss}, lr {args.lr:g}, {args.trainable}, "
        f"{args.epochs} epochs, max side {args.max_side})"
    )
    print(f"{'set':<12} {'quality':<16} {'teacher R@1':>11} {'student R@1':>11} {'delta':>7}")
    for r in report["verdict"]["rows"]:
        print(
            f"{r['set']:<12} {r['quality']:<16} {100 * r['teacher_r1']:>10.1f}% {100 * r['student_r1']:>10.1f}% "
            f"{r['delta_points']:>+6.1f}{'' if r['ok'] else '  (criterion not met)'}"
        )
    print(
        f"training: {report['training']['wall_s']} s wall, {report['training']['cpu_s']} s CPU; "
        f"evaluation {report['evaluation']['wall_s']} s; all criteria met: {report['verdict']['all_ok']}"
    )
    if args.json:
        atomic_write_json(args.json, report)
    if args.plot:
        plot(
            results,
            args.plot,
            f"{teacher} vs {student}: {args.loss}, lr {args.lr:g}, {args.trainable}, "
            f"{args.epochs} ep, max side {args.max_side}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
