"""`vpr weights list|fetch|verify|import`: the weights catalogue (model/catalogue.py).

Downloads follow `VPR_OFFLINE` (and CI), read from the settings tree here and
passed to model/fetch.py as an argument.
"""

from __future__ import annotations

import argparse
import json

from vpr.cli.common import CLIError, home_from


def _status(entry, weights_home) -> str:
    from vpr.model.fetch import read_record, stored_path

    if not stored_path(entry, weights_home).is_file():
        return "absent"
    rec = read_record(entry, weights_home)
    return f"here ({rec.get('checked_against', 'unchecked')})" if rec.get("sha256") else "here (unchecked)"


def main_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vpr.model.catalogue import CATALOGUE

    home = home_from(args)
    if args.json:
        rows = [{**asdict(e), "status": _status(e, home.weights_dir)} for e in CATALOGUE.values()]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"weights folder: {home.weights_dir}   downloads: {'off' if home.forbid_downloads else 'allowed'}")
    for e in CATALOGUE.values():
        print(f"{e.name:<31} {e.kind:<9} {e.arch:<9} {e.size_text():>13}  {_status(e, home.weights_dir)}")
        print(f"    {e.urls[0]}")
    return 0


def main_fetch(args: argparse.Namespace) -> int:
    from vpr.model.catalogue import get_entry
    from vpr.model.fetch import fetch

    home = home_from(args)
    for name in args.names:
        entry = get_entry(name)
        got = fetch(
            entry,
            home.weights_dir,
            offline=home.forbid_downloads,
            sha256=args.sha256,
            trust_first_use=args.trust_on_first_use,
            urls=args.url or (),
            progress=not args.no_progress,
        )
        if got.source == "present":
            print(f"{name}: already here, {got.path} (sha256 {got.sha256} checked)")
        else:
            resumed = f", resumed after {got.resumed_from} bytes" if got.resumed_from else ""
            print(f"{name}: {got.path} (sha256 {got.sha256} checked), served by {got.source}{resumed}")
    return 0


def main_verify(args: argparse.Namespace) -> int:
    from vpr.model.catalogue import CATALOGUE, get_entry
    from vpr.model.fetch import FetchError, stored_path, verify

    home = home_from(args)
    entries = [get_entry(n) for n in args.names] or [
        e for e in CATALOGUE.values() if stored_path(e, home.weights_dir).is_file()
    ]
    if not entries:
        print(f"no catalogue files in {home.weights_dir}")
        return 0
    failed = []
    for entry in entries:
        try:
            got = verify(entry, home.weights_dir)
        except FetchError as e:
            failed.append(entry.name)
            print(f"{entry.name}: FAILED: {e}")
            continue
        print(f"{entry.name}: ok, {got.path} sha256 {got.sha256}")
    if failed:
        raise CLIError(f"verification failed for {', '.join(failed)}")
    return 0


def main_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vpr.model.catalogue import get_entry
    from vpr.model.fetch import import_file

    home = home_from(args)
    got = import_file(
        get_entry(args.name),
        Path(args.file),
        home.weights_dir,
        sha256=args.sha256,
        trust_first_use=args.trust_on_first_use,
    )
    print(f"{args.name}: {got.path} (sha256 {got.sha256} checked)")
    return 0


def _hash_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--sha256", help="expected sha256 (64 hex digits), for entries without a published one")
    q.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="accept an entry without a published sha256 and pin the sum of this file",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="the weights catalogue: list, fetch, verify, import")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    q = wsub.add_parser("list", help="catalogue entries and whether each is in $VPR_HOME/weights")
    q.add_argument("--json", action="store_true", help="every field of every entry")
    q.set_defaults(func=main_list)

    q = wsub.add_parser("fetch", help="download entries (mirrors in order, resumed, sha256-checked)")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.add_argument("--url", action="append", help="a mirror tried before the catalogue's (repeatable)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    _hash_flags(q)
    q.set_defaults(func=main_fetch)

    q = wsub.add_parser("verify", help="re-check stored files against their sha256 (all present ones by default)")
    q.add_argument("names", nargs="*", metavar="NAME")
    q.set_defaults(func=main_verify)

    q = wsub.add_parser("import", help="bring a file by hand (air-gapped machines), checked like a download")
    q.add_argument("name", metavar="NAME")
    q.add_argument("file", metavar="FILE")
    _hash_flags(q)
    q.set_defaults(func=main_import)
