"""`vpr train distill ...` and `vpr explain ...`.

Multi-GPU (or multi-process CPU) training runs the same command under
torchrun: `torchrun --nproc-per-node 4 -m vpr.cli.main train distill ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from vpr.cli.common import OwnerDefaults, add_dataset_flags, comma_list, dataset_spec, home_from

if TYPE_CHECKING:
    from vpr.train.distill import DistillConfig

# DistillConfig keeps the defaults and the limits of `vpr train distill` (see OwnerDefaults).
DISTILL = OwnerDefaults("vpr.train.distill:DistillConfig")


def distill_config(args: argparse.Namespace) -> DistillConfig:
    """The run the command line asks for: the flags given, DistillConfig's defaults for the rest."""
    from vpr.train.distill import DistillConfig
    from vpr.train.losses import parse_loss

    fields = DISTILL.given(args)
    if fields.get("grad_clip") == 0:  # the flag's way to say "off"
        fields["grad_clip"] = None
    if args.loss_weights:  # names or numbers in loss order: parse_loss reads them against the losses
        loss = args.loss or DistillConfig.model_fields["loss"].default
        fields["loss_weights"] = parse_loss(loss, args.loss_weights).weights
    spec = dataset_spec(args)
    if spec is not None:  # parsed here too, so that a bad spec fails before the teacher loads
        fields["dataset_options"] = dict(spec.options)
    return DistillConfig.model_validate(fields)  # a ValidationError is reported in one line by cli.main


def main_distill(args: argparse.Namespace) -> int:
    from vpr.train.distill import run_distill

    result = run_distill(distill_config(args), home_from(args), resume=args.resume)
    print(result.ref)
    return 0


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
    DISTILL.add(src, "--images", type=Path, help="folder of training images (label-free)")
    DISTILL.add(
        src,
        "--dataset",
        metavar="KIND:PATH",
        help="a dataset with positions; its database images train (enables triplet and recall validation)",
    )
    add_dataset_flags(q)
    DISTILL.add(q, "--teacher", required=True, help="NAME@VERSION (or NAME: its active version)")
    DISTILL.add(
        q,
        "--quality",
        field="qualities",
        type=comma_list,
        required=True,
        help="comma-separated quality specs drawn per sample, e.g. orig,h240,h180-jpeg20,h120-jpeg20,h180-h264-qp40",
    )
    DISTILL.add(q, "--register", field="name", required=True, metavar="NAME", help="registry name of the student")
    DISTILL.add(q, "--loss", help="'+'-joined set of mse, ickd, regions, triplet")
    q.add_argument("--loss-weights", help="name=value pairs (mse=1,ickd=1) or numbers in loss order; default 1 each")
    DISTILL.add(
        q,
        "--trainable",
        type=comma_list,
        help="comma-separated parts that train: backbone blocks (vgg16: conv1..conv5), "
        "netvlad, pca (default: the backbone's last block + netvlad)",
    )
    DISTILL.add(q, "--epochs", type=int, help="passes over the training images")
    DISTILL.add(q, "--batch-size", type=int, help="images per step and process")
    DISTILL.add(q, "--lr", type=float, help="Adam learning rate")
    DISTILL.add(q, "--weight-decay", type=float, help="Adam weight decay")
    DISTILL.add(q, "--grad-clip", type=float, help="max gradient norm, 0: off")
    DISTILL.add(q, "--schedule", help="learning-rate schedule over the steps")
    DISTILL.add(q, "--warmup-steps", type=int, help="steps of linear learning-rate warm-up")
    DISTILL.add(q, "--step-gamma", type=float, help="'step' schedule: lr factor per epoch")
    DISTILL.add(q, "--seed", type=int, help="seeds initialisation, qualities drawn and the validation split")
    DISTILL.add(q, "--limit", type=int, help="train on this many images, evenly spread (quick runs)")
    DISTILL.add(
        q,
        "--val-fraction",
        type=float,
        help="held-out share of the images for the label-free validation that picks the epoch and stops "
        "training (0: off, the training loss picks)",
    )
    DISTILL.add(q, "--val-radius", type=float, help="validation: neighbours within metres count as right")
    DISTILL.add(
        q,
        "--val-rule",
        help="validation: 'self' (a held-out image finds its own original among all the images) or "
        "'neighbours' (held-out images left out; one must find a neighbour: harder, closer to a query)",
    )
    DISTILL.add(
        q, "--patience", type=int, help="stop after this many epochs without a better validation score (default: off)"
    )
    DISTILL.add(
        q,
        "--epoch-choice",
        help="validation: 'exact' (highest held-out recall@1, then the held-out loss) or 'within-noise' "
        "(recalls within one standard error count as tied and the held-out loss decides)",
    )
    DISTILL.add(
        q,
        "--orig-share",
        type=float,
        help="share of training samples at full quality (orig; a listed orig does not add to it)",
    )
    # the capture conditions in the mix (DistillConfig.conditions), each with its share of the degraded samples
    for flag, how in (
        ("--low-light-share", "in low light (the -dark<F> step: the camera's gain on; 0: off)"),
        ("--grey-share", "by a monochrome camera (the -grey step; 0: off)"),
        ("--dim-share", "underexposed (the -dim<F> step: no gain; 0: off)"),
    ):
        DISTILL.add(q, flag, type=float, help=f"share of the degraded samples also taken {how}")
    DISTILL.add(q, "--low-light-factor", type=int, help="low light: F times less light than the image had")
    DISTILL.add(q, "--dim-factor", type=int, help="underexposure: F times less light, kept dark")
    DISTILL.add(
        q,
        "--mirror",
        action="store_true",
        help="also train on each training image's left-right mirror (its own teacher target)",
    )
    DISTILL.add(
        q,
        "--level-weights",
        help="how the degraded levels are drawn: 'uniform', or 'baseline-loss' (each in proportion to the "
        "untrained student's held-out loss at that level, measured before training)",
    )
    DISTILL.add(
        q,
        "--crop-share",
        type=float,
        help="share of the degraded samples seen through a shifted crop of --crop-fraction of each side "
        "(targets: the teacher's of the whole original)",
    )
    DISTILL.add(q, "--crop-fraction", type=float, help="crop window: this fraction of each side")
    DISTILL.add(q, "--margin", field="triplet.margin", type=float, help="triplet margin (squared distance)")
    DISTILL.add(q, "--pos-dist", field="triplet.pos_dist", type=float, help="triplet positives within metres")
    DISTILL.add(q, "--neg-dist", field="triplet.neg_dist", type=float, help="triplet negatives beyond metres")
    DISTILL.add(q, "--negatives", field="triplet.negatives", type=int, help="hardest negatives per anchor")
    DISTILL.add(
        q,
        "--neg-refresh",
        field="triplet.refresh_every",
        type=int,
        help="steps between hard-negative cache refreshes",
    )
    DISTILL.add(
        q,
        "--prefix-cache",
        help="cache the frozen layers' outputs per (image, quality) (same result, much faster)",
    )
    DISTILL.add(q, "--cache-dir", type=Path, help="disk cache folder (default <home>/cache/distill)")
    DISTILL.add(q, "--cache-memory-mb", type=int, help="memory budget of each cache")
    DISTILL.add(q, "--run-dir", type=Path, help="checkpoints, metrics and plot (default <home>/runs/<NAME>)")
    q.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last epoch")
    DISTILL.add(q, "--activate", action="store_true", help="make the student the active version of NAME")
    DISTILL.add(q, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    DISTILL.add(q, "--log-every", type=int, help="steps between metrics lines")
    DISTILL.add(q, "--no-progress", dest="progress", action="store_false", help="no progress bars")
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
