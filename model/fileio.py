"""Atomic, durable file writes and content hashes.

Every piece of state is written to a temporary sibling, fsynced, then renamed
into place, so that a reader (or a process restarted after SIGKILL) never sees
half a file or half a version folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (before publishing it by rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_pointer(path: Path) -> str | None:
    """Read an `active` pointer file (a version string), or None when unset."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_pointer(path: Path, value: str) -> None:
    """Switch an `active` pointer atomically; concurrent writers leave one valid value."""
    atomic_write_bytes(path, (value + "\n").encode())


def replace_dir(tmp: Path, out: Path) -> None:
    """Publish the finished folder `tmp` as `out`, replacing any previous `out`.

    `tmp` must be a fsynced sibling of `out`. The old folder is moved aside
    first, so `out` is always either the old or the new complete folder."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)


@contextmanager
def temp_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` (named `prefix` + random). It is
    removed when the block ends unless the block renamed it away (published
    it); a process killed meanwhile leaves it for the next writer to clear."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `out` to fill. When the block ends without
    error it is fsynced and published as `out` (see `replace_dir`); either way
    nothing half-written is left behind, so a crash never leaves a partial `out`.
    (Numbered versions of a name are published by `model.store.VersionedStore`.)"""
    out = Path(out)
    with temp_dir(out.parent, f".{out.name}.tmp-") as tmp:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
