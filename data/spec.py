"""THE dataset spec: how a user names a dataset, parsed in one place.

A command line (`--dataset KIND:PATH --dataset-option KEY=VALUE`), a
distillation config (`dataset`, `dataset_options`) and an admin rebuild
request (`{"kind": ..., "path": ..., "options": {...}}`) all become one
`DatasetSpec`. It checks the kind and the option names when it is made, so a
typo fails before any heavy work with a message that lists what is allowed,
and `open()` reads the dataset through `data.datasets.open_dataset`.

Option values stay as given (strings, from a command line): each reader
converts and checks its own values, so a JSON request and a command line
behave alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vpr.data.datasets import KINDS, Kind, PlaceDataset, check_kind, check_options, open_dataset

OptionValue = str | int | float | bool  # JSON values: a spec is recorded in run state and job files


class DatasetSpec(BaseModel):
    """A dataset as a user names it: a kind, a path and reader options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="folder | mat | traversal | synthetic (see data.datasets)")
    path: Path = Field(description="the dataset's folder (for `mat`, its .mat file)")
    options: dict[str, OptionValue] = Field(
        default_factory=dict, description="reader options, e.g. radius (folder, mat) or images_root (mat)"
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, v: object) -> object:
        check_kind(v)  # names the kinds, where pydantic's Literal message would not say it is a dataset kind
        return v

    @model_validator(mode="after")
    def _known_options(self) -> DatasetSpec:
        check_options(self.kind, self.options)
        return self

    @classmethod
    def parse(cls, text: str, options: Mapping[str, OptionValue] | None = None) -> DatasetSpec:
        """`KIND:PATH` (as given on a command line or in a config) and options -> a spec.

        Every problem is one ValueError line that quotes `text` and says what is wrong."""
        kind, sep, path = text.partition(":")
        if not sep or not kind or not path:
            raise ValueError(f"bad dataset {text!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}")
        try:
            return cls.model_validate({"kind": kind, "path": Path(path), "options": dict(options or {})})
        except ValidationError as e:
            raise ValueError(f"bad dataset {text!r}: {_one_line(e)}") from None

    @classmethod
    def from_folders(
        cls,
        database: Path | str,
        queries: Path | str,
        ground_truth: Path | str | None = None,
        tolerance: int | str | None = None,
        radius: float | str | None = None,
        options: Mapping[str, OptionValue] | None = None,
    ) -> DatasetSpec:
        """A database and a queries folder: traversals when a ground-truth CSV or a frame
        tolerance says which frames match, dvgl-named (`@UTM@`) folders when not."""
        db, q = Path(database).resolve(), Path(queries).resolve()
        root = Path(os.path.commonpath([db, q]))
        opts: dict[str, OptionValue] = {**(options or {}), "database": str(db), "queries": str(q)}
        if ground_truth is None and tolerance is None:
            if radius is not None:
                opts["radius"] = radius
            return cls._made("folder", root, opts)
        if radius is not None:
            raise ValueError("a radius applies to UTM-named images, not to traversals with a ground truth or tolerance")
        if ground_truth is not None:
            opts["ground_truth"] = str(Path(ground_truth).resolve())
        if tolerance is not None:
            opts["tolerance"] = tolerance
        return cls._made("traversal", root, opts)

    @classmethod
    def _made(cls, kind: Kind, path: Path, options: dict[str, OptionValue]) -> DatasetSpec:
        try:
            return cls(kind=kind, path=path, options=options)
        except ValidationError as e:
            raise ValueError(f"bad dataset {kind}:{path}: {_one_line(e)}") from None

    def open(self) -> PlaceDataset:
        return open_dataset(self.kind, self.path, **self.options)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.path}" + (f" ({opts})" if opts else "")


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (a repeatable command-line flag) -> reader options; '-' in a key reads as '_'."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"bad dataset option {pair!r}: expected KEY=VALUE, e.g. radius=10")
        if key in out:
            raise ValueError(f"dataset option {key} is given twice")
        out[key] = value.strip()
    return out


def _one_line(e: ValidationError) -> str:
    """pydantic's report, one line: the messages of our validators without their prefix."""
    return "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
