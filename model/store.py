"""Versioned folders: the one store behind models and indexes.

    <root>/<name>/<version>/{..., manifest.json}    <root>/<name>/active

A version is a folder named by an integer that holds a `manifest.json`; it
never changes once published (a model's metrics and derived artifacts aside). `active` names the
version a bare `name` resolves to. Writers of one name take an exclusive file
lock (`<root>/<name>/.lock`) and build the next version in a hidden temporary
folder (`.tmp-*`) which is fsynced and then renamed to the next free number.
A reader therefore never sees half a version: a writer killed at any point
leaves only a hidden folder, which the next writer of that name removes.

`Registry` (model/registry.py) and `IndexStore` (index/store.py) each hold
one `VersionedStore` and add what is theirs: weights and their sha256 for
models, backends, metadata and search for indexes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpr.model.fileio import atomic_write_json, fsync_dir, fsync_tree, read_pointer, temp_dir, write_pointer

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "active"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"  # a version being written; may hold external state to undo
OLD_PREFIX = ".old-"  # a pruned version on its way out; never undone, only deleted


class StoreError(ValueError):
    """A name, version or folder that is missing, malformed or cannot be written."""


class NotFound(StoreError):
    """The name or version does not exist (callers answer 404)."""


class BadSpec(StoreError):
    """The name or `name@version` is malformed (callers answer 422)."""


@dataclass(frozen=True)
class Ref:
    """One version of one name; prints as `name@version`."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def now_iso() -> str:
    """UTC time to the second, as manifests and job files record it."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def check_name(name: str, kind: str = "item", error: type[StoreError] = BadSpec) -> str:
    """A name is also a folder name: no separators, no leading dot, bounded length."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise error(
            f"bad {kind} name {name!r}: use letters, digits, '_', '.', '-' (max 64, not starting with '.', '_' or '-')"
        )
    return name


class VersionedStore:
    """Names, versions, the active pointer and atomic publication under `root`.

    `kind` ("model", "index") and `error` (a StoreError subclass) shape the
    messages and exceptions callers see; `not_found` and `bad_spec` are the
    subclasses of `error` (and of NotFound / BadSpec) raised for an unknown or
    a malformed name, so that callers tell them apart by type (default: `error`). `latest_if_inactive`: whether a bare
    name without an active version resolves to its newest version (models) or
    is refused (indexes: a version published without activation, e.g. by a
    model that failed the compatibility check, must not be served by
    accident). `discard(folder)` undoes what an unpublished version left
    outside its folder (a Milvus collection); it runs before such a folder is
    deleted."""

    def __init__(
        self,
        root: Path,
        kind: str,
        *,
        error: type[StoreError] = StoreError,
        not_found: type[StoreError] | None = None,
        bad_spec: type[StoreError] | None = None,
        latest_if_inactive: bool = True,
        discard: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.kind = kind
        self.error = error
        self.not_found = not_found or error
        self.bad_spec = bad_spec or error
        self.latest_if_inactive = latest_if_inactive
        self._discard = discard

    # ---- names and versions -------------------------------------------------------
    def check_name(self, name: str) -> str:
        return check_name(name, self.kind, self.bad_spec)

    def names(self) -> list[str]:
        """Names with at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Published versions, oldest first; a number without a manifest is not one."""
        base = self.root / self.check_name(name)
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file())

    def active(self, name: str) -> Ref | None:
        value = read_pointer(self.root / self.check_name(name) / ACTIVE_FILE)
        return Ref(name, int(value)) if value and value.isdigit() else None

    def dir(self, ref: Ref) -> Path:
        return self.root / self.check_name(ref.name) / str(ref.version)

    def parse(self, spec: str | Ref) -> tuple[str, int | None]:
        """`name@version` or `name` -> (name, version or None), both checked."""
        if isinstance(spec, Ref):
            return self.check_name(spec.name), spec.version
        name, _, version = str(spec).partition("@")
        self.check_name(name)
        if not version:
            return name, None
        if not version.isdigit():
            raise self.bad_spec(f"bad version in {spec!r}: expected NAME@<integer>")
        return name, int(version)

    def resolve(self, spec: str | Ref) -> Ref:
        """`name@version`, or `name` for its active version (else, where the
        store allows it, its newest). The version must be published."""
        name, version = self.parse(spec)
        ref = Ref(name, version) if version is not None else self.active(name) or self._inactive(name)
        if not (self.dir(ref) / MANIFEST_FILE).is_file():
            known = ", ".join(f"{ref.name}@{v}" for v in self.versions(ref.name)) or "none"
            raise self.not_found(f"{self.kind} {ref} not found in {self.root} (versions: {known})")
        return ref

    def _inactive(self, name: str) -> Ref:
        """What a bare `name` without an active version means."""
        known = self.versions(name)
        if not known:
            others = ", ".join(self.names()) or "none"
            raise self.not_found(f"no {self.kind} named {name!r} in {self.root} (known: {others})")
        if self.latest_if_inactive:
            return Ref(name, known[-1])
        raise self.error(
            f"{self.kind} {name!r} has no active version; activate one of {', '.join(f'{name}@{v}' for v in known)}"
        )

    def read_manifest(self, ref: Ref) -> dict[str, Any]:
        path = self.dir(ref) / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise self.not_found(f"{self.kind} {ref} not found in {self.root}") from None
        except json.JSONDecodeError as e:
            raise self.error(f"{path}: corrupt manifest ({e})") from e
        if not isinstance(manifest, dict):
            raise self.error(f"{path}: corrupt manifest (not a JSON object)")
        return manifest

    def activate(self, spec: str | Ref) -> Ref:
        """Point `active` at a published version (an atomic rename: concurrent
        activations leave one of their values, never a torn one)."""
        ref = self.resolve(spec)
        write_pointer(self.root / ref.name / ACTIVE_FILE, str(ref.version))
        return ref

    # ---- writing --------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[Path]:
        """Hold the exclusive writer lock of `name` (across threads and
        processes) and clear what killed writers left; yields `<root>/<name>`."""
        base = self.root / self.check_name(name)
        with self._lock(base):
            self._cleanup(base)
            yield base

    @staticmethod
    @contextlib.contextmanager
    def _lock(base: Path) -> Iterator[None]:
        base.mkdir(parents=True, exist_ok=True)
        # A fresh open file per holder: flock then excludes every other holder,
        # in other processes and in other threads of this one alike.
        with open(base / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Path]:
        """An empty hidden folder for the next version of `name`, written under
        the writer lock. Fill it, then `publish` it inside the block. On error
        its external side is undone (`discard`); either way nothing of it is
        left unless it was published."""
        with self.writer(name) as base, temp_dir(base, TMP_PREFIX) as tmp:
            try:
                yield tmp
            except BaseException:
                if tmp.exists():
                    self._undo(tmp)
                raise

    def publish(self, tmp: Path, manifest: dict[str, Any]) -> Ref:
        """Publish the staged folder `tmp` as the next version of its name.

        Records name and version in `manifest`, writes it, fsyncs everything
        and claims the number by renaming: a rename onto a version another
        writer took meanwhile fails and the next number is tried, so
        concurrent writers always end up with distinct versions. Numbers of
        stray folders (no manifest) are skipped, never reused."""
        base = tmp.parent
        name = self.check_name(base.name)
        if base.parent != self.root or not tmp.name.startswith(TMP_PREFIX):
            raise ValueError(f"{tmp}: not a folder staged by this store (use stage())")
        manifest["name"] = name
        fsync_tree(tmp)  # the payload once; each try below rewrites (and fsyncs) the manifest
        while True:
            version = max((int(p.name) for p in base.iterdir() if p.name.isdigit()), default=0) + 1
            manifest["version"] = version
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
            try:
                tmp.rename(base / str(version))
                break
            except OSError:
                if (base / str(version)).exists():
                    continue  # taken meanwhile
                raise
        fsync_dir(base)
        return Ref(name, version)

    def cleanup(self, name: str | None = None) -> int:
        """Remove what killed writers left (of `name`, else of every name),
        under each name's writer lock so that no live writer loses its
        folder; returns how many folders went."""
        if name is None:
            names = sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name)) if self.root.is_dir() else []
            return sum(self.cleanup(n) for n in names)
        base = self.root / self.check_name(name)
        if not base.is_dir():
            return 0
        with self._lock(base):
            return self._cleanup(base)

    def _cleanup(self, base: Path) -> int:
        """With the writer lock held, every hidden folder is debris."""
        gone = sorted(p for p in base.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX)))
        for d in gone:
            if d.name.startswith(TMP_PREFIX):
                self._undo(d)
            shutil.rmtree(d, ignore_errors=True)
        if gone:
            log.warning("removed %d unfinished folder(s) of %s %s", len(gone), self.kind, base.name)
        return len(gone)

    def _undo(self, tmp: Path) -> None:
        if self._discard is None:
            return
        try:
            self._discard(tmp)
        except Exception as e:  # never mask the error that got us here
            log.warning("%s: could not undo the outside side of an unpublished %s (%s)", tmp, self.kind, e)

    def prune(
        self, name: str, keep: int = 3, on_pruned: Callable[[list[dict[str, Any]]], None] | None = None
    ) -> list[Ref]:
        """Delete all but the newest `keep` versions, never the active one;
        returns what went. Each goes by a rename to a hidden folder first, so
        a killed prune never leaves half a version that still looks published.
        `on_pruned(manifests)` runs under the lock afterwards (e.g. to drop
        external state no remaining version uses). Only for versions no
        running process still reads."""
        if keep < 1:
            raise ValueError("keep at least one version")
        removed: list[Ref] = []
        manifests: list[dict[str, Any]] = []
        with self.writer(name) as base:
            active = self.active(name)
            for v in self.versions(name)[:-keep]:
                ref = Ref(name, v)
                if active is not None and ref == active:
                    continue
                manifests.append(self.read_manifest(ref))
                doomed = base / f"{OLD_PREFIX}{v}-{uuid.uuid4().hex[:8]}"
                self.dir(ref).rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(ref)
            fsync_dir(base)
            if removed and on_pruned is not None:
                on_pruned(manifests)
        return removed


__all__ = [
    "MANIFEST_FILE",
    "NAME_RE",
    "Ref",
    "StoreError",
    "VersionedStore",
    "check_name",
    "now_iso",
]
