"""What every `cli/*_cmd.py` module shares (kept out of cli/main.py so that
`python -m vpr.cli.main` and the `vpr` script see the same error class)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr.settings import HomeSettings


class CLIError(Exception):
    """An error to show the user as one line (exit status 2)."""


def home_from(args: argparse.Namespace) -> HomeSettings:
    """`--home` beats `VPR_HOME`, which beats ./var."""
    return HomeSettings(home=Path(args.home)) if getattr(args, "home", None) else HomeSettings()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v:g} must be positive")
    return v


def key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    """`KEY=VALUE` strings (a repeatable option) -> dict, keys with '-' as '_'."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"bad {option} {pair!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out
