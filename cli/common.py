"""What every `cli/*_cmd.py` module shares (kept out of cli/main.py so that
`python -m vpr.cli.main` and the `vpr` script see the same error class).

- `OwnerDefaults`: flags whose defaults belong to a config model, a dataclass
  or a function's parameters; the CLI never restates them.
- `add_dataset_flags` / `dataset_spec`: the one `--dataset KIND:PATH` and
  `--dataset-option KEY=VALUE` of every command that reads a dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from vpr.settings import HomeSettings

if TYPE_CHECKING:
    from vpr.data.spec import DatasetSpec


class CLIError(Exception):
    """An error to show the user as one line (exit status 2)."""


def validation_message(e: ValidationError) -> str:
    """pydantic's multi-line report -> one line: `field: message; ...`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


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


def comma_list(text: str) -> list[str]:
    """argparse type: `a,b,c` -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


# ---- defaults that live with their owner ---------------------------------------------------------


class OwnerDefaults:
    """Flags that set fields of one owner: a pydantic model, a dataclass or a function.

    The owner keeps every default. A flag's argparse default is None ("not
    given"); `given(args)` returns only the flags given, nested by dotted field
    names (`triplet.margin` -> {"triplet": {"margin": ...}}), so the owner fills
    in the rest. `--help` shows the owner's default (and the values of a
    Literal field), looked up only when help is printed: owners such as
    DistillConfig sit behind torch imports that `vpr` should not pay on every
    start. The owner is named "package.module:Name" for the same reason.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.fields: dict[str, str] = {}  # argparse dest -> dotted field of the owner

    def add(
        self,
        parser: argparse._ActionsContainer,
        *flags: str,
        field: str | None = None,
        show: Callable[[Any], str] | None = None,
        **kwargs: Any,
    ) -> argparse.Action:
        """`parser.add_argument(*flags, **kwargs)` for the owner's `field` (default: the flag's dest);
        `show` writes the default as a user would type it (e.g. 160x120)."""
        action = parser.add_argument(*flags, default=None, **kwargs)
        name = field or action.dest
        self.fields[action.dest] = name
        if action.help != argparse.SUPPRESS:
            # argparse fills %(name)s from the action's attributes when, and only when, help is printed
            action.owner_default = _DefaultText(self, name, action, show)  # type: ignore[attr-defined]
            action.help = (action.help or "") + "%(owner_default)s"
        return action

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dest, name in self.fields.items():
            value = getattr(args, dest, None)
            if value is None:
                continue
            *parents, last = name.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return out

    def resolve(self) -> Any:
        module, _, name = self.owner.partition(":")
        return getattr(importlib.import_module(module), name)

    def default(self, field: str) -> Any:
        """The owner's default of a dotted field (None: none, or required)."""
        first, *rest = field.split(".")
        value = _default_of(self.resolve(), first)
        for part in rest:
            value = getattr(value, part)
        return value

    def choices(self, field: str) -> tuple[Any, ...] | None:
        """The values of a Literal field, else None."""
        owner: Any = self.resolve()
        annotation: Any = None
        for part in field.split("."):
            if isinstance(owner, type) and issubclass(owner, BaseModel):
                annotation = owner.model_fields[part].annotation
            else:
                try:
                    annotation = typing.get_type_hints(owner).get(part)
                except NameError:  # an annotation names a type-checking-only import: no values to list
                    return None
            owner = annotation
        return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def _default_of(owner: Any, name: str) -> Any:
    if isinstance(owner, type) and issubclass(owner, BaseModel):
        info = owner.model_fields[name]
        return None if info.is_required() else info.get_default(call_default_factory=True)
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    default = inspect.signature(owner).parameters[name].default
    return None if default is inspect.Parameter.empty else default


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(_shown(v) for v in value)
    return str(value)


class _DefaultText:
    """The end of one flag's help: "(one of ...; default ...)" from the owner, written on demand."""

    def __init__(
        self, owner: OwnerDefaults, field: str, action: argparse.Action, show: Callable[[Any], str] | None
    ) -> None:
        self.owner, self.field, self.action, self.show = owner, field, action, show
        self.after_text = bool(action.help)

    def __str__(self) -> str:
        parts = []
        choices = self.owner.choices(self.field) if self.action.choices is None else None
        if choices:
            parts.append("one of " + ", ".join(map(str, choices)))
        value = self.owner.default(self.field)
        if value is not None and not isinstance(value, bool):  # a switch's default is its absence
            parts.append("default " + (self.show or _shown)(value))
        if not parts:
            return ""
        text = "; ".join(parts)
        return f" ({text})" if self.after_text else text


# ---- datasets --------------------------------------------------------------------------------------

# Flags some commands have as shortcuts for dataset options (`vpr eval --radius 10`).
DATASET_SHORTCUTS = ("database", "queries", "ground_truth", "tolerance", "radius")


def add_dataset_flags(
    parser: argparse._ActionsContainer,
    dataset_help: str | None = None,
    option_aliases: Sequence[str] = (),
) -> None:
    """`--dataset KIND:PATH` (when `dataset_help` is given) and the repeatable `--dataset-option KEY=VALUE`."""
    if dataset_help is not None:
        parser.add_argument("--dataset", metavar="KIND:PATH", help=dataset_help)
    parser.add_argument(
        "--dataset-option",
        *option_aliases,
        dest="dataset_option",
        action="append",
        metavar="KEY=VALUE",
        help="a reader option of the dataset (repeatable), e.g. radius=10, or images_root=DIR for mat",
    )


def dataset_spec(args: argparse.Namespace, text: str | None = None) -> DatasetSpec | None:
    """The dataset a command line names: `--dataset KIND:PATH` (or `text`) with its
    `--dataset-option`s and the command's shortcut flags; without one, `--database`
    and `--queries` folders; None when it names none."""
    from vpr.data.spec import DatasetSpec, parse_options  # torch behind it: only when a command runs

    options: dict[str, Any] = parse_options(getattr(args, "dataset_option", None) or [])
    shortcuts = {k: v for k in DATASET_SHORTCUTS if (v := getattr(args, k, None)) is not None}
    twice = sorted(set(options) & set(shortcuts))
    if twice:
        raise CLIError(f"{', '.join(twice)}: given both as a flag and as a --dataset-option")
    text = text if text is not None else getattr(args, "dataset", None)
    if not text and options and not {"database", "queries"} <= set(shortcuts):
        raise CLIError("--dataset-option applies to a dataset: give --dataset KIND:PATH")
    if text:
        paths_as_text = {k: str(v) if isinstance(v, Path) else v for k, v in shortcuts.items()}
        return DatasetSpec.parse(text, {**options, **paths_as_text})
    if "database" in shortcuts and "queries" in shortcuts:
        return DatasetSpec.from_folders(
            shortcuts["database"],
            shortcuts["queries"],
            shortcuts.get("ground_truth"),
            shortcuts.get("tolerance"),
            shortcuts.get("radius"),
            options,
        )
    return None
