#!/usr/bin/env python
"""Baseline: how much recall an ImageNet VGG16+NetVLAD teacher loses on
low-quality queries (Gardens Point Walking), under both small-query policies.

Registers (or reuses) a teacher built from ../shared/weights (caffe
preprocessing) with NetVLAD clusters from `day_left`, then evaluates the
database `day_left` at orig against the queries `day_right` and
`night_right` at each quality, for the policies `native` and `upsample`.
Writes a JSON report and a PNG plot of recall@1 against quality.

Cheap runs: `--max-side 320 --limit 50 --cluster-images 50` (the full run is
max side 640, all 200 queries, clusters from all 200 database images).

    .venv/bin/python bench/baseline_gardens.py --home var/bench --max-side 320 --limit 50
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vpr.data.datasets import open_dataset  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.evaluation.evaluate import evaluate, format_table, plot_series  # noqa: E402
from vpr.media.degrade import parse_qualities  # noqa: E402
from vpr.model.clusters import init_clusters  # noqa: E402
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig  # noqa: E402
from vpr.model.extract import default_device  # noqa: E402
from vpr.model.fileio import atomic_write_json, sha256_file  # noqa: E402
from vpr.model.network import build_model  # noqa: E402
from vpr.model.preprocess import list_images  # noqa: E402
from vpr.model.registry import ModelRef, Registry  # noqa: E402
from vpr.model.teacher import load_backbone_weights  # noqa: E402
from vpr.settings import HomeSettings  # noqa: E402

log = logging.getLogger("baseline_gardens")

SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))
QUALITIES = "orig,h360,h240,h180-jpeg20,h120-jpeg20,h180-h264-qp40"
QUERY_SETS = ("day_right", "night_right")
POLICIES = ("native", "upsample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=REPO / "var" / "bench-gardens", help="state folder (models, cache)")
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "vgg16_imagenet_caffe_features.safetensors")
    p.add_argument("--teacher", help="use this registered NAME@VERSION instead of building one")
    p.add_argument("--name", default="gardens-vgg16", help="registry name of the teacher built here")
    p.add_argument("--max-side", type=int, default=640, help="the teacher's input size (longer side)")
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--samples", type=int, default=50_000, help="local features for k-means")
    p.add_argument("--cluster-images", type=int, help="use N day_left images (evenly spread) for k-means")
    p.add_argument("--limit", type=int, help="evaluate N queries per set (evenly spread); default all 200")
    p.add_argument("--qualities", default=QUALITIES)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", type=Path, default=REPO / "bench" / "out" / "baseline_gardens.json")
    p.add_argument("--out-png", type=Path, default=REPO / "bench" / "out" / "baseline_gardens.png")
    args = p.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not policies or any(x not in POLICIES for x in policies):
        p.error(f"--policies: choose from {', '.join(POLICIES)}")
    args.policies = policies
    try:
        parse_qualities(args.qualities)
    except ValueError as e:
        p.error(f"--qualities: {e}")
    for flag in ("limit", "cluster_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def spread(items: list, n: int | None) -> list:
    if not n or n >= len(items):
        return items
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def teacher_config(max_side: int, clusters: int) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=clusters),
        preprocess=PreprocessConfig(mode="caffe", max_side=max_side, small_policy="upsample"),
    )


def find_or_build_teacher(reg: Registry, args: argparse.Namespace, device: torch.device) -> tuple[ModelRef, float]:
    """Reuse a registered teacher made with the same recipe, else build one."""
    if args.teacher:
        return reg.resolve(args.teacher), 0.0
    config = teacher_config(args.max_side, args.clusters)
    images = spread(list_images(args.gardens / "day_left"), args.cluster_images)
    recipe = {
        "bench": "baseline_gardens",
        "weights_sha256": sha256_file(args.weights),
        "cluster_seed": args.seed,
        "cluster_images": len(images),
        "cluster_samples_requested": args.samples,
    }
    for version in reversed(reg.versions(args.name)):
        m = reg.manifest(f"{args.name}@{version}")
        if m["config"] == config.model_dump() and all(m["details"].get(k) == v for k, v in recipe.items()):
            log.info("reusing teacher %s@%d", args.name, version)
            return ModelRef(args.name, version), 0.0
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    net = build_model(config).to(device)
    details = {"source": "init", **load_backbone_weights(net, str(args.weights)), **recipe}
    details |= init_clusters(net, images, samples=args.samples, seed=args.seed, device=device)
    details["cluster_folder"] = str((args.gardens / "day_left").resolve())
    ref = reg.register(args.name, net.cpu(), role="teacher", details=details)
    log.info("registered teacher %s in %.0f s", ref, time.perf_counter() - t0)
    return ref, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    for path in (args.gardens / "day_left", args.weights):
        if not path.exists():
            print(f"baseline_gardens: {path} not found (is ../shared present?)", file=sys.stderr)
            return 2
    t_start = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    home = HomeSettings(home=args.home)
    reg = Registry(home.models_dir)
    cache = DescriptorCache(home.cache_dir)
    teacher, init_s = find_or_build_teacher(reg, args, device)
    runs, series = [], {}
    for policy in args.policies:
        for qset in QUERY_SETS:
            ds = open_dataset(
                "traversal",
                args.gardens,
                database="day_left",
                queries=qset,
                ground_truth=args.gardens / "ground_truth.csv",
            )
            if args.limit:
                ds = ds.subset_queries(args.limit)
            report = evaluate(
                reg,
                ds,
                str(teacher),
                [str(teacher)],
                args.qualities,
                policy=policy,
                cache=cache,
                batch_size=args.batch_size,
                device=device,
            )
            print(f"\n== queries {qset}, policy {policy} ==")
            print(format_table(report))
            runs.append({"queries": qset, "policy": policy, "report": report})
            series[f"{qset} / {policy}"] = [(r["quality"], r["recall"]["1"]) for r in report["results"]]
    summary = [
        {
            "queries": run["queries"],
            "policy": run["policy"],
            "quality": r["quality"],
            "recall": r["recall"],
            "num_queries": r["num_queries"],
            "mean_bytes": r.get("mean_bytes"),
            "mean_bitrate_kbps": r.get("mean_bitrate_kbps"),
        }
        for run in runs
        for r in run["report"]["results"]
    ]
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "teacher": str(teacher),
        "teacher_init_seconds": round(init_s, 1),
        "settings": {
            "max_side": args.max_side,
            "clusters": args.clusters,
            "samples": args.samples,
            "cluster_images": args.cluster_images or 200,
            "limit": args.limit or 200,
            "qualities": args.qualities.split(","),
            "policies": args.policies,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "device": str(device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "runs": runs,
    }
    atomic_write_json(args.out_json, out)
    title = (
        f"Gardens Point: db day_left@orig, {teacher} (VGG16+NetVLAD, max side {args.max_side}), "
        f"{args.limit or 200} queries"
    )
    plot_series(series, args.out_png, title)
    print(f"\nwrote {args.out_json} and {args.out_png} ({out['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
