"""What every `cli/*_cmd.py` module shares (kept out of cli/main.py so that
`python -m cli.main` and the `vpr` script see the same error class)."""
from __future__ import annotations

import argparse
from pathlib import Path

from model.config import HomeSettings


class CLIError(Exception):
    """An error to show the user as one line (exit status 2)."""


def home_from(args: argparse.Namespace) -> HomeSettings:
    """`--home` beats `VPR_HOME`, which beats ./var."""
    return HomeSettings(home=Path(args.home)) if getattr(args, "home", None) else HomeSettings()
