"""`vpr degrade`, `vpr eval` and `vpr dataset synth|from-video|info`.

Thin: each subcommand turns its arguments into one call of `train/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpr.cli.common import CLIError, home_from, key_values, positive_int

EVAL_EPILOG = """\
data (one of):
  --dataset KIND:PATH            folder (dvgl @UTM@ names), mat (Pittsburgh .mat), traversal, synthetic
  --database DIR --queries DIR   with --ground-truth FILE or --tolerance T: traversals;
                                 without: dvgl-named folders, positives within --radius metres
examples:
  vpr eval --database gp/day_left --queries gp/night_right --ground-truth gp/ground_truth.csv \\
      --db-model teacher@1 --query-model teacher@1 --query-model student@2 \\
      --quality orig,h240,h180-jpeg20 --json eval.json --plot eval.png
  vpr eval --dataset synthetic:var/route --db-model teacher --query-model teacher --quality orig,h60-jpeg20 --json r.json
"""


def _ns(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cut-offs {text!r}: expected integers like 1,5,10,20") from None
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError(f"bad cut-offs {text!r}: expected positive integers")
    return ns


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "degrade",
        help="write degraded copies of a folder of images",
        description="Write degraded copies of the images in SRC to DST (same file names) "
        "and DST/degrade.json with sizes and bitrates.",
    )
    p.add_argument("src", type=Path, help="folder of images")
    p.add_argument("dst", type=Path, help="output folder (created)")
    p.add_argument("--quality", required=True, help="quality spec, e.g. h180-jpeg20, h240-h264-qp38")
    p.add_argument("--recursive", action="store_true", help="also images in sub-folders")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main_degrade)

    p = sub.add_parser(
        "eval",
        help="recall@N of query models on degraded queries",
        description="Describe the database with the database model at original quality and the "
        "queries with each query model at each quality; report recall@N.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", metavar="KIND:PATH", help="a dataset of any kind")
    g.add_argument("--database", type=Path, metavar="DIR", help="database images")
    g.add_argument("--queries", type=Path, metavar="DIR", help="query images")
    g.add_argument("--ground-truth", type=Path, metavar="FILE", help="CSV query_index,positive_reference_indices")
    g.add_argument("--tolerance", type=int, metavar="T", help="aligned traversals: frame i matches i-T..i+T")
    g.add_argument("--radius", type=float, metavar="M", help="positives within M metres (UTM-named data)")
    g.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="more reader options, e.g. images_root=DIR for mat (repeatable)",
    )
    g.add_argument("--limit", type=positive_int, metavar="N", help="evaluate N queries spread over the set")
    g = p.add_argument_group("models and qualities")
    g.add_argument("--db-model", required=True, metavar="NAME@VERSION", help="describes the database (the teacher)")
    g.add_argument(
        "--query-model",
        required=True,
        action="append",
        metavar="NAME@VERSION",
        help="describes the queries (repeatable; include the teacher as the baseline)",
    )
    g.add_argument(
        "--quality",
        required=True,
        action="append",
        metavar="SPEC[,SPEC...]",
        help="query qualities (repeatable), e.g. orig,h240,h180-jpeg20,h180-h264-qp40",
    )
    g.add_argument(
        "--policy",
        choices=("native", "upsample"),
        help="small-query policy for every model (default: the models' own, which must agree)",
    )
    g.add_argument("--recall-at", type=_ns, default=(1, 5, 10, 20), metavar="N,N,...", help="default 1,5,10,20")
    g = p.add_argument_group("output and running")
    g.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here")
    g.add_argument("--plot", type=Path, metavar="OUT.png", help="plot recall@1 against quality")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the descriptor cache")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main_eval)

    p = sub.add_parser("dataset", help="make or inspect datasets")
    dsub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", required=True)
    s = dsub.add_parser("synth", help="write a synthetic street route (database and query passes)")
    s.add_argument("out", type=Path)
    s.add_argument("--places", type=int, default=60)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing", type=float, default=4.0, help="metres between database views")
    s.add_argument("--size", default="160x120", help="WIDTHxHEIGHT of the views")
    s.add_argument("--lighting", choices=("day", "dusk", "night"), default="dusk", help="of the query pass")
    s.add_argument("--radius", type=float, help="positives radius in metres (default 1.25 x spacing)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=main_synth)

    v = dsub.add_parser("from-video", help="video + GPS CSV -> folder dataset sampled by distance")
    v.add_argument("video", type=Path)
    v.add_argument("gps", type=Path, help="CSV with time_s,lat,lon columns")
    v.add_argument("out", type=Path)
    v.add_argument("--spacing", type=float, default=1.0, help="metres between kept frames (default 1)")
    q = v.add_mutually_exclusive_group()
    q.add_argument(
        "--split-queries",
        action="store_true",
        help="also take queries from this video, half-way between database frames",
    )
    q.add_argument("--queries-video", type=Path, help="take queries from a second walk (needs --queries-gps)")
    v.add_argument("--queries-gps", type=Path)
    v.add_argument("--max-side", type=int, help="downscale frames to this longer side")
    v.add_argument("--smooth", type=float, default=1.0, help="GPS smoothing window in seconds (0: none)")
    v.add_argument("--jpeg-quality", type=int, default=95)
    v.add_argument("--overwrite", action="store_true")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=main_from_video)

    i = dsub.add_parser("info", help="read a dataset and print its summary (checks it)")
    i.add_argument("dataset", metavar="KIND:PATH")
    i.add_argument("--option", action="append", metavar="KEY=VALUE")
    i.add_argument("--radius", type=float)
    i.add_argument("--tolerance", type=int)
    i.add_argument("--check-images", action="store_true", help="decode every image and list those that fail")
    i.set_defaults(func=main_info)


def main_degrade(args: argparse.Namespace) -> int:
    from vpr.media.degrade import degrade_folder

    r = degrade_folder(args.src, args.dst, args.quality, recursive=args.recursive, progress=not args.no_progress)
    extra = f", {r.total_bytes} bytes" if r.total_bytes is not None else ""
    extra += f", mean {r.mean_bitrate_kbps:.0f} kbit/s" if r.mean_bitrate_kbps is not None else ""
    print(f"degraded {r.count} images to {r.quality} in {r.target}{extra}")
    return 0


def main_eval(args: argparse.Namespace) -> int:
    from vpr.data.datasets import dataset_source
    from vpr.evaluation.evaluate import EvalConfig, run_eval

    source = dataset_source(
        args.dataset,
        args.database,
        args.queries,
        args.ground_truth,
        args.tolerance,
        args.radius,
        key_values(args.option, "--option"),
    )
    run_eval(
        EvalConfig(
            home=home_from(args),
            source=source,
            db_model=args.db_model,
            query_models=args.query_model,
            qualities=args.quality,
            json_out=args.json,
            plot_out=args.plot,
            policy=args.policy,
            ns=args.recall_at,
            batch_size=args.batch_size,
            device=args.device,
            use_cache=not args.no_cache,
            limit=args.limit,
            progress=not args.no_progress,
        )
    )
    return 0


def main_synth(args: argparse.Namespace) -> int:
    from vpr.data.synthetic import make_route

    path = make_route(
        args.out,
        places=args.places,
        seed=args.seed,
        spacing=args.spacing,
        size=args.size,
        lighting=args.lighting,
        radius=args.radius,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"synthetic route in {path} (read it with --dataset synthetic:{path})")
    return 0


def main_from_video(args: argparse.Namespace) -> int:
    from vpr.data.video_dataset import video_to_dataset

    if args.queries_gps is not None and args.queries_video is None:
        raise CLIError("--queries-gps needs --queries-video")
    r = video_to_dataset(
        args.video,
        args.gps,
        args.out,
        spacing=args.spacing,
        split_queries=args.split_queries,
        queries_video=args.queries_video,
        queries_gps=args.queries_gps,
        max_side=args.max_side,
        smooth_s=args.smooth,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{r.database} database and {r.queries} query frames along {r.track_length_m:.1f} m in {r.out} "
        f"(read it with --dataset folder:{r.out})"
    )
    return 0


def main_info(args: argparse.Namespace) -> int:
    from vpr.data.datasets import dataset_source

    ds = dataset_source(
        args.dataset, tolerance=args.tolerance, radius=args.radius, options=key_values(args.option, "--option")
    ).open()
    json.dump(ds.summary(), sys.stdout, indent=2, default=str)
    print()
    if args.check_images:
        bad = ds.check_images()
        for message in bad:
            print(message, file=sys.stderr)
        if bad:
            raise CLIError(f"{len(bad)} of {len(ds.database) + len(ds.queries)} images do not decode (listed above)")
        print(f"all {len(ds.database) + len(ds.queries)} images decode")
    return 0
