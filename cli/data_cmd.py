"""`vpr degrade`, `vpr eval` and `vpr dataset synth|from-video|info`.

Thin: each subcommand turns its arguments into one call of `media/`, `evaluation/` or `data/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from vpr.cli.common import CLIError, OwnerDefaults, add_dataset_flags, dataset_spec, home_from, positive_int
from vpr.model.config import PreprocessConfig

# The owners of the defaults (see OwnerDefaults).
EVAL = OwnerDefaults("vpr.evaluation.evaluate:EvalConfig")
ROUTE = OwnerDefaults("vpr.data.synthetic:RouteParams")
VIDEO = OwnerDefaults("vpr.data.video_dataset:video_to_dataset")

EVAL_EPILOG = """\
data (one of):
  --dataset KIND:PATH            folder (dvgl @UTM@ names), mat (Pittsburgh .mat), traversal, synthetic
  --database DIR --queries DIR   with --ground-truth FILE or --tolerance T: traversals;
                                 without: dvgl-named folders, positives within --radius metres
  --dataset-option KEY=VALUE     a reader option (repeatable; --option is the same flag)
examples:
  vpr eval --database gp/day_left --queries gp/night_right --ground-truth gp/ground_truth.csv \\
      --db-model teacher@1 --query-model teacher@1 --query-model student@2 \\
      --quality orig,h240,h180-jpeg20 --json eval.json --plot eval.png
  vpr eval --dataset synthetic:var/route --dataset-option places=24 \\
      --db-model teacher --query-model teacher --quality orig,h60-jpeg20 --json r.json
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
    add_dataset_flags(g, "a dataset of any kind", option_aliases=["--option"])
    g.add_argument("--database", type=Path, metavar="DIR", help="database images")
    g.add_argument("--queries", type=Path, metavar="DIR", help="query images")
    g.add_argument("--ground-truth", type=Path, metavar="FILE", help="CSV query_index,positive_reference_indices")
    g.add_argument("--tolerance", type=int, metavar="T", help="aligned traversals: frame i matches i-T..i+T")
    g.add_argument("--radius", type=float, metavar="M", help="positives within M metres (UTM-named data)")
    EVAL.add(g, "--limit", type=positive_int, metavar="N", help="evaluate N queries spread over the set")
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
    EVAL.add(
        g,
        "--policy",
        choices=typing.get_args(PreprocessConfig.model_fields["small_policy"].annotation),
        help="small-query policy for every model (default: the models' own, which must agree)",
    )
    EVAL.add(g, "--recall-at", field="ns", type=_ns, metavar="N,N,...", help="recall cut-offs")
    g = p.add_argument_group("output and running")
    EVAL.add(g, "--json", field="json_out", type=Path, metavar="OUT", help="write the JSON report here")
    EVAL.add(g, "--plot", field="plot_out", type=Path, metavar="OUT.png", help="plot recall@1 against quality")
    EVAL.add(
        g,
        "--track",
        action="store_true",
        help="also track_recall: each query folder (sorted by name) is a sequence through the causal "
        "tracker (VPR_TRACK_* settings); video qualities encode each sequence as one video",
    )
    EVAL.add(g, "--batch-size", type=positive_int, help="images per forward pass")
    EVAL.add(g, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    EVAL.add(
        g,
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="neither read nor write the descriptor cache",
    )
    EVAL.add(g, "--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=main_eval)

    p = sub.add_parser("dataset", help="make or inspect datasets")
    dsub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", required=True)
    s = dsub.add_parser("synth", help="write a synthetic street route (database and query passes)")
    s.add_argument("out", type=Path)
    ROUTE.add(s, "--places", type=int, help="places along the street (one database and one query view each)")
    ROUTE.add(s, "--seed", type=int, help="same seed and parameters, same files")
    ROUTE.add(s, "--spacing", type=float, help="metres between database views")
    ROUTE.add(s, "--size", help="WIDTHxHEIGHT of the views", show=lambda wh: f"{wh[0]}x{wh[1]}")
    ROUTE.add(s, "--lighting", help="of the query pass")
    ROUTE.add(s, "--radius", type=float, help="positives radius in metres (default 1.25 x spacing)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=main_synth)

    v = dsub.add_parser("from-video", help="video + GPS CSV -> folder dataset sampled by distance")
    v.add_argument("video", type=Path)
    v.add_argument("gps", type=Path, help="CSV with time_s,lat,lon columns")
    v.add_argument("out", type=Path)
    VIDEO.add(v, "--spacing", type=float, help="metres between kept frames")
    q = v.add_mutually_exclusive_group()
    VIDEO.add(
        q,
        "--split-queries",
        action="store_true",
        help="also take queries from this video, half-way between database frames",
    )
    VIDEO.add(q, "--queries-video", type=Path, help="take queries from a second walk (needs --queries-gps)")
    VIDEO.add(v, "--queries-gps", type=Path, help="GPS CSV of the queries video")
    VIDEO.add(v, "--max-side", type=int, help="downscale frames to this longer side")
    VIDEO.add(v, "--smooth", field="smooth_s", type=float, help="GPS smoothing window in seconds (0: none)")
    VIDEO.add(v, "--jpeg-quality", type=int, help="quality of the written frames")
    VIDEO.add(v, "--overwrite", action="store_true", help="replace a non-empty output folder")
    VIDEO.add(v, "--no-progress", dest="progress", action="store_false", help="no progress bar")
    v.set_defaults(func=main_from_video)

    i = dsub.add_parser("info", help="read a dataset and print its summary (checks it)")
    i.add_argument("dataset", metavar="KIND:PATH")
    add_dataset_flags(i, option_aliases=["--option"])
    i.add_argument("--radius", type=float, help="positives within metres (UTM-named data)")
    i.add_argument("--tolerance", type=int, help="aligned traversals: frame i matches i-T..i+T")
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
    from vpr.evaluation.evaluate import EvalConfig, run_eval

    source = dataset_spec(args)
    if source is None:
        raise CLIError("name the data: --dataset KIND:PATH, or --database DIR and --queries DIR")
    run_eval(
        EvalConfig(
            home=home_from(args),
            source=source,
            db_model=args.db_model,
            query_models=args.query_model,
            qualities=args.quality,
            **EVAL.given(args),
        )
    )
    return 0


def main_synth(args: argparse.Namespace) -> int:
    from vpr.data.synthetic import make_route

    path = make_route(args.out, **ROUTE.given(args), overwrite=args.overwrite, progress=True)
    print(f"synthetic route in {path} (read it with --dataset synthetic:{path})")
    return 0


def main_from_video(args: argparse.Namespace) -> int:
    from vpr.data.video_dataset import video_to_dataset

    if args.queries_gps is not None and args.queries_video is None:
        raise CLIError("--queries-gps needs --queries-video")
    r = video_to_dataset(args.video, args.gps, args.out, **VIDEO.given(args))
    print(
        f"{r.database} database and {r.queries} query frames along {r.track_length_m:.1f} m in {r.out} "
        f"(read it with --dataset folder:{r.out})"
    )
    return 0


def main_info(args: argparse.Namespace) -> int:
    spec = dataset_spec(args)
    assert spec is not None  # the positional KIND:PATH is required
    ds = spec.open()
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
