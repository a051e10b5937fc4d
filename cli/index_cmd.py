"""`vpr index build|add|remove|list|show|activate|search|prune`."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vpr.cli.common import CLIError, OwnerDefaults, add_dataset_flags, dataset_spec, home_from, validation_message
from vpr.settings import IndexSettings

# The owners of the defaults (see OwnerDefaults). `vpr.index.ops` is imported by the
# command functions only: it loads torch, which `vpr --help` or `vpr query` need not wait for.
SETTINGS = OwnerDefaults("vpr.settings:IndexSettings")
BUILD = OwnerDefaults("vpr.index.ops:build_index")
ADD = OwnerDefaults("vpr.index.ops:add_images")
SEARCH = OwnerDefaults("vpr.index.ops:search_images")
SHOW = OwnerDefaults("vpr.index.ops:show_index")


def _settings(args: argparse.Namespace) -> IndexSettings:
    """Environment (VPR_INDEX_*) overridden by --backend / --milvus-uri."""
    try:
        return IndexSettings(**SETTINGS.given(args))
    except ValidationError as e:  # names the bad value
        raise CLIError(f"bad index settings: {validation_message(e)}") from None


def _dataset(args: argparse.Namespace) -> tuple[list[Any] | None, Path | None]:
    """`--dataset KIND:PATH` -> (its database items, its root); (None, None) without one."""
    spec = dataset_spec(args)
    if spec is None:
        return None, None
    ds = spec.open()
    return list(ds.database), Path(ds.root)


def _params(pairs: list[str] | None) -> dict | None:
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not value.strip().isdigit():
            raise CLIError(f"--param {p!r}: expected NAME=INTEGER, e.g. nprobe=16 or efSearch=128")
        out[key.strip()] = int(value)
    return out or None


def _source(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--images", type=Path, help="folder of database images (labels = file stems)")
    g.add_argument("--dataset", metavar="KIND:PATH", help="a dataset (see `vpr dataset`): its database images")
    add_dataset_flags(p)


def _backend_args(p: argparse.ArgumentParser) -> None:
    SETTINGS.add(
        p,
        "--backend",
        choices=typing.get_args(IndexSettings.model_fields["backend"].annotation),
        help="vector backend: $VPR_INDEX_BACKEND when set",
    )
    SETTINGS.add(p, "--milvus-uri", help="Milvus server http://host:19530, or a .db file for Milvus Lite")


def main_build(args: argparse.Namespace) -> int:
    from vpr.index import ops

    items, ds_root = _dataset(args)
    ref = ops.build_index(
        home_from(args),
        args.model,
        args.name,
        items=items,
        images=args.images,
        dataset_root=ds_root,
        activate=not args.no_activate,
        skip_bad=args.skip_bad,
        settings=_settings(args),
        **BUILD.given(args),
    )
    print(f"built index {ref}" + ("" if args.no_activate else " (active)"))
    return 0


def main_add(args: argparse.Namespace) -> int:
    from vpr.index import ops

    items = _dataset(args)[0]
    ref = ops.add_images(
        home_from(args),
        args.index,
        args.model,
        items=items,
        images=args.images,
        files=args.files,
        activate=not args.no_activate,
        skip_bad=args.skip_bad,
        skip_existing=args.skip_existing,
        settings=_settings(args),
        **ADD.given(args),
    )
    print(f"index {ref} written" + ("" if args.no_activate else " (active)"))
    return 0


def main_remove(args: argparse.Namespace) -> int:
    from vpr.index import ops

    ref = ops.remove_items(
        home_from(args),
        args.index,
        ids=args.id or [],
        paths=args.path or [],
        labels=args.label or [],
        activate=not args.no_activate,
        settings=_settings(args),
    )
    print(f"index {ref} written" + ("" if args.no_activate else " (active)"))
    return 0


def main_list(args: argparse.Namespace) -> int:
    from vpr.index import ops

    listing = ops.list_indexes(home_from(args))
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing:
        print("no indexes")
    for name, versions in listing.items():
        for v in versions:
            mark = "*" if v["active"] else " "
            print(
                f"{mark} {name}@{v['version']:<4} {v['count']:>10} x {v['dim']:<6} {v['factory']:<20} "
                f"{v['backend']:<7} model {v['model']:<20} {v['bytes'] / 2**20:9.1f} MiB  {v['created']}  "
                f"{v['operation'] or ''}"
            )
    return 0


def main_show(args: argparse.Namespace) -> int:
    from vpr.index import ops

    out = ops.show_index(home_from(args), args.index, verify=args.verify, **SHOW.given(args))
    print(json.dumps(out, indent=2, default=str))
    return 0


def main_activate(args: argparse.Namespace) -> int:
    from vpr.index import ops

    print(f"active: {ops.activate_index(home_from(args), args.index)}")
    return 0


def main_prune(args: argparse.Namespace) -> int:
    from vpr.index import ops

    removed = ops.prune_index(home_from(args), args.name, args.keep)
    print("removed " + (", ".join(map(str, removed)) or "nothing"))
    return 0


def main_search(args: argparse.Namespace) -> int:
    from vpr.index import ops

    ref, model, results = ops.search_images(
        home_from(args),
        args.index,
        args.images,
        args.model,
        params=_params(args.param),
        settings=_settings(args),
        **SEARCH.given(args),
    )
    if args.json:
        print(
            json.dumps(
                {
                    "index": str(ref),
                    "model": model,
                    "results": [
                        {"query": str(q), "hits": [{"id": h.id, "score": h.score, **h.meta} for h in hits]}
                        for q, hits in zip(args.images, results)
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(f"index {ref}, model {model}")
    for q, hits in zip(args.images, results):
        print(f"{q}:")
        for rank, h in enumerate(hits, 1):
            pos = (
                f" utm {h.meta['utm_e']:.1f},{h.meta['utm_n']:.1f} {h.meta['utm_zone'] or ''}"
                if h.meta.get("utm_e") is not None
                else ""
            )
            print(f"  {rank:>2}. {h.score:.4f}  id {h.id:<8} {h.meta.get('label', ''):<16} {h.meta.get('path')}{pos}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    idx = subparsers.add_parser("index", help="place databases: build, edit, list, search")
    sub = idx.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    p = sub.add_parser("build", help="describe database images with a model and publish a new index version")
    p.add_argument("--model", required=True, help="NAME@VERSION (or NAME) of the registry model (the teacher)")
    p.add_argument("--name", required=True, help="index name")
    _source(p, required=True)
    BUILD.add(
        p,
        "--factory",
        help="faiss.index_factory spec: Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64, PCA256,L2norm,IVF1024,PQ32 ...",
    )
    BUILD.add(
        p,
        "--root",
        type=Path,
        help="folder image paths are stored relative to (default: the image folder or the dataset root)",
    )
    BUILD.add(p, "--batch-size", type=int, help="images per forward pass")
    p.add_argument("--skip-bad", action="store_true", help="leave out undecodable images instead of failing")
    p.add_argument("--no-activate", action="store_true", help="publish without making it the active version")
    _backend_args(p)
    p.set_defaults(func=main_build)

    p = sub.add_parser("add", help="new version with more images (no rebuild)")
    p.add_argument("index", help="NAME (active version) or NAME@VERSION")
    p.add_argument("files", nargs="*", type=Path, help="image files (under the index root)")
    p.add_argument("--model", help="the index's model (default: the one in its manifest)")
    _source(p, required=False)
    ADD.add(p, "--batch-size", type=int, help="images per forward pass")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--skip-existing", action="store_true", help="leave out images already in the index")
    p.add_argument("--no-activate", action="store_true")
    _backend_args(p)
    p.set_defaults(func=main_add)

    p = sub.add_parser("remove", help="new version without some images (no rebuild)")
    p.add_argument("index", help="NAME (active version) or NAME@VERSION")
    p.add_argument("--id", type=int, action="append", help="item id (repeatable)")
    p.add_argument("--path", action="append", help="image path, relative to the index root (repeatable)")
    p.add_argument("--label", action="append", help="place label: removes all its images (repeatable)")
    p.add_argument("--no-activate", action="store_true")
    _backend_args(p)
    p.set_defaults(func=main_remove)

    p = sub.add_parser("list", help="indexes and their versions (* = active)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main_list)

    p = sub.add_parser("show", help="manifest of a version")
    p.add_argument("index", help="NAME or NAME@VERSION")
    p.add_argument("--verify", action="store_true", help="check file checksums")
    SHOW.add(p, "--items", type=int, help="also print the first N metadata rows")
    p.set_defaults(func=main_show)

    p = sub.add_parser("activate", help="serve this version")
    p.add_argument("index", help="NAME@VERSION")
    p.set_defaults(func=main_activate)

    p = sub.add_parser("prune", help="delete old versions (never the active one)")
    p.add_argument("name")
    p.add_argument("--keep", type=int, default=3)
    p.set_defaults(func=main_prune)

    p = sub.add_parser("search", help="top-k database images for query images")
    p.add_argument("index", help="NAME or NAME@VERSION")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument(
        "--model", help="query model NAME@VERSION: the index's model or a student of it (default: the index's model)"
    )
    SEARCH.add(p, "-k", type=int, help="matches per query image")
    p.add_argument("--param", action="append", help="search parameter NAME=INT (nprobe, efSearch); repeatable")
    SEARCH.add(p, "--batch-size", type=int, help="images per forward pass")
    p.add_argument("--json", action="store_true")
    _backend_args(p)
    p.set_defaults(func=main_search)
