"""`vpr train distill ...` and `vpr explain ...`.

Multi-GPU (or multi-process CPU) training runs the same command under
torchrun: `torchrun --nproc-per-node 4 -m vpr.cli.main train distill ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from vpr.cli.common import home_from, key_values


def _config_error(e: ValidationError) -> str:
    """pydantic's multi-line report -> one line (ValueError, so `python -m vpr.cli.main` and
    torchrun, where cli.main is imported twice, report it the same way)."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def main_distill(args: argparse.Namespace) -> int:
    from vpr.train.distill import DistillConfig, TripletConfig, run_distill

    try:
        cfg = DistillConfig(
            teacher=args.teacher,
            name=args.register,
            qualities=args.quality.split(","),
            images=Path(args.images) if args.images else None,
            dataset=args.dataset,
            dataset_options=key_values(args.dataset_option, "--dataset-option"),
            limit=args.limit,
            loss=args.loss,
            loss_weights=_weights(args),
            trainable=args.trainable.split(",") if args.trainable else None,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip or None,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            step_gamma=args.step_gamma,
            seed=args.seed,
            val_fraction=args.val_fraction,
            val_radius=args.val_radius,
            triplet=TripletConfig(
                margin=args.margin,
                pos_dist=args.pos_dist,
                neg_dist=args.neg_dist,
                negatives=args.negatives,
                refresh_every=args.neg_refresh,
            ),
            prefix_cache=args.prefix_cache,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            cache_memory_mb=args.cache_memory_mb,
            run_dir=Path(args.run_dir) if args.run_dir else None,
            activate=args.activate,
            device=args.device,
            log_every=args.log_every,
            progress=not args.no_progress,
        )
    except ValidationError as e:
        raise ValueError(_config_error(e)) from None
    result = run_distill(cfg, home_from(args), resume=args.resume)
    print(result.ref)
    return 0


def _weights(args: argparse.Namespace) -> dict[str, float] | None:
    if not args.loss_weights:
        return None
    from vpr.train.losses import parse_loss

    return parse_loss(args.loss, args.loss_weights).weights


def main_explain(args: argparse.Namespace) -> int:
    from vpr.evaluation.explain import explain_images
    from vpr.model.registry import Registry

    written = explain_images(
        Registry(home_from(args).models_dir),
        args.model,
        [Path(p) for p in args.images],
        Path(args.out),
        quality=args.quality,
        device=args.device,
    )
    for path in written:
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distil a teacher into a student for low-quality queries")
    tsub = p.add_subparsers(dest="train_command", metavar="ACTION", required=True)
    q = tsub.add_parser(
        "distill",
        help="fine-tune a student copy of a teacher on degraded images, register it",
        description="The teacher (frozen) sees each image as it is, the student a degraded copy; "
        "the best epoch is registered as NAME@VERSION with the teacher as its parent. "
        "Under torchrun the same command trains data-parallel.",
    )
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of training images (label-free)")
    src.add_argument(
        "--dataset",
        help="KIND:PATH of a dataset with positions; its database images train (enables triplet and recall validation)",
    )
    q.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="option of the dataset reader")
    q.add_argument("--teacher", required=True, help="NAME@VERSION (or NAME: its active version)")
    q.add_argument(
        "--quality",
        required=True,
        help="comma-separated quality specs drawn per sample, e.g. orig,h240,h180-jpeg20,h120-jpeg20,h180-h264-qp40",
    )
    q.add_argument("--register", required=True, metavar="NAME", help="registry name of the student")
    q.add_argument("--loss", default="mse+ickd", help="'+'-joined set of mse, ickd, triplet (default mse+ickd)")
    q.add_argument("--loss-weights", help="name=value pairs (mse=1,ickd=1) or numbers in loss order; default 1 each")
    q.add_argument(
        "--trainable",
        help="comma-separated parts that train: backbone blocks (vgg16: conv1..conv5), "
        "netvlad, pca (default: the backbone's last block + netvlad)",
    )
    q.add_argument("--epochs", type=int, default=5)
    q.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    q.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    q.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "step"])
    q.add_argument("--warmup-steps", type=int, default=0)
    q.add_argument("--step-gamma", type=float, default=0.5, help="'step' schedule: lr factor per epoch")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--limit", type=int, help="train on this many images, evenly spread (quick runs)")
    q.add_argument(
        "--val-fraction",
        type=float,
        help="held-out share of the images (default 0.1 with positions, else 0: best epoch by training loss)",
    )
    q.add_argument("--val-radius", type=float, default=25.0, help="validation positives within metres")
    q.add_argument("--margin", type=float, default=0.1, help="triplet margin (squared distance)")
    q.add_argument("--pos-dist", type=float, default=10.0, help="triplet positives within metres")
    q.add_argument("--neg-dist", type=float, default=25.0, help="triplet negatives beyond metres")
    q.add_argument("--negatives", type=int, default=5, help="hardest negatives per anchor")
    q.add_argument("--neg-refresh", type=int, default=100, help="steps between hard-negative cache refreshes")
    q.add_argument(
        "--prefix-cache",
        default="disk",
        choices=["disk", "memory", "off"],
        help="cache the frozen layers' outputs per (image, quality) (same result, much faster)",
    )
    q.add_argument("--cache-dir", help="disk cache folder (default <home>/cache/distill)")
    q.add_argument("--cache-memory-mb", type=int, default=2048, help="memory budget of each cache")
    q.add_argument("--run-dir", help="checkpoints, metrics and plot (default <home>/runs/<NAME>)")
    q.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last epoch")
    q.add_argument("--activate", action="store_true", help="make the student the active version of NAME")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    q.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=main_distill)

    e = sub.add_parser(
        "explain",
        help="heatmaps of where descriptors draw from (models side by side)",
        description="Per image a PNG: the image as the network saw it and, per --model, an overlay "
        "of each location's share of the NetVLAD descriptor (see train/explain.py).",
    )
    e.add_argument("images", nargs="+", metavar="IMAGE")
    e.add_argument("--model", action="append", required=True, help="NAME@VERSION; repeat to compare side by side")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--quality", help="degrade the images to this spec first (e.g. h180-jpeg20)")
    e.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    e.set_defaults(func=main_explain)
