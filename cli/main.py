"""Entry point of the `vpr` command.

Each `cli/<area>.py` module exposes `register(subparsers)`, adding its
subcommands with `set_defaults(func=main_fn)`; `main_fn(args) -> int` is the
exit status. User errors (bad files, bad specs) print one line naming the
file and the problem and exit 2, without a traceback.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers fight the server's own threads on small machines
# (forward passes 2-10x slower, erratically, on 2 cores); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import sys

from pydantic import ValidationError

from vpr.cli import data_cmd, index_cmd, model_cmd, server_cmd, train_cmd, weights_cmd
from vpr.cli.common import CLIError, validation_message

# Command modules, in the order they appear in --help.
COMMAND_MODULES = (model_cmd, weights_cmd, data_cmd, train_cmd, index_cmd, server_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpr", description="Visual place recognition for low-quality queries.")
    parser.add_argument("--home", help="state folder (default: $VPR_HOME or ./var)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


CHATTY_LOGGERS = ("httpx", "httpcore", "faiss.loader")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # libraries' INFO lines (each HTTP request, faiss' loader) stay out of the output
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValidationError as e:  # a config model refused a flag's value (before ValueError: it is one)
        print(f"vpr {args.command}: error: {validation_message(e)}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"vpr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
