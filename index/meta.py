"""Per-item metadata in SQLite beside each index version.

One row per database image: stable id, image path relative to the index root,
place label, position (UTM and lat/lon when known) and free-form JSON.
A published version's file never changes, so readers open it read-only and
immutable (no locking, no journal) and one connection serves all threads
under a lock.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the index package stays importable without torch (model.preprocess needs it)
    from vpr.model.config import PreprocessConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    utm_e REAL, utm_n REAL, utm_zone TEXT,
    lat REAL, lon REAL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
"""
COLUMNS = ("id", "path", "label", "utm_e", "utm_n", "utm_zone", "lat", "lon", "extra")
QUERY_CHUNK = 900  # stay under SQLite's default limit of bound variables
DESCRIPTION_KEY = "description"  # the manifest's record of the size the database was described at


@dataclass(frozen=True)
class Entry:
    """One database image as the index stores it.

    Anything with `path`, `label`, `utm`, `utm_zone` and `latlon` attributes
    (e.g. `train.datasets.Item`) converts with `Entry.of(obj)`, so the index
    never imports the dataset readers."""

    path: Path
    label: str = ""
    utm: tuple[float, float] | None = None
    utm_zone: str | None = None
    latlon: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, obj: Any) -> Entry:
        if isinstance(obj, Entry):
            return obj
        if isinstance(obj, (str, Path)):
            return cls(Path(obj), Path(obj).stem)
        if not hasattr(obj, "path"):
            raise TypeError(f"{obj!r}: a database item needs at least a `path` attribute")
        path = Path(obj.path)
        label = getattr(obj, "label", None)
        return cls(
            path=path,
            label=str(label) if label is not None else path.stem,
            utm=_pair(getattr(obj, "utm", None), "utm", path),
            utm_zone=getattr(obj, "utm_zone", None),
            latlon=_pair(getattr(obj, "latlon", None), "latlon", path),
            extra=dict(getattr(obj, "extra", None) or {}),
        )


def _pair(value: Any, what: str, path: Path) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be two numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{path}: {what} must be finite, got {value!r}")
    return a, b


def relative_path(path: Path, root: Path) -> str:
    """`path` relative to `root`, as a POSIX string; relative paths are taken as
    already relative to root. Refuses paths outside root (the index must stay
    valid when the image folder moves with its root)."""
    path = Path(path)
    if not path.is_absolute():
        rel = PurePosixPath(path.as_posix())
    else:
        try:
            rel = PurePosixPath(path.resolve().relative_to(Path(root).resolve()).as_posix())
        except ValueError:
            raise ValueError(
                f"{path}: not under the index root {root}; pass a root folder that contains every database image"
            ) from None
    if ".." in rel.parts:
        raise ValueError(f"{path}: escapes the index root {root}")
    return str(rel)


def row_for(id_: int, entry: Entry, root: Path) -> tuple:
    utm = entry.utm or (None, None)
    latlon = entry.latlon or (None, None)
    return (
        int(id_),
        relative_path(entry.path, root),
        entry.label,
        utm[0],
        utm[1],
        entry.utm_zone,
        latlon[0],
        latlon[1],
        json.dumps(entry.extra, sort_keys=True),
    )


def create(path: Path, rows: Iterable[tuple]) -> int:
    """Write a new metadata database (in a build's temp folder)."""
    con = sqlite3.connect(path)
    try:
        con.executescript(SCHEMA)
        cur = con.executemany(f"INSERT INTO items VALUES ({','.join('?' * len(COLUMNS))})", rows)
        con.commit()
        return cur.rowcount
    finally:
        con.close()


def copy_edit(src: Path, dst: Path, add_rows: Iterable[tuple] = (), remove_ids: Iterable[int] = ()) -> None:
    """Copy `src` to `dst` (SQLite backup: consistent) and apply an edit."""
    s = sqlite3.connect(f"file:{src}?mode=ro&immutable=1", uri=True)
    d = sqlite3.connect(dst)
    try:
        s.backup(d)
        d.executemany("DELETE FROM items WHERE id = ?", ((int(i),) for i in remove_ids))
        d.executemany(f"INSERT INTO items VALUES ({','.join('?' * len(COLUMNS))})", add_rows)
        d.commit()
    finally:
        s.close()
        d.close()


def as_dict(row: tuple) -> dict[str, Any]:
    d = dict(zip(COLUMNS, row))
    d["extra"] = json.loads(d["extra"] or "{}")
    return d


class MetaReader:
    """Thread-safe read-only access to a published version's metadata."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: metadata database missing")
        self._con = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def get(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        wanted = sorted({int(i) for i in ids if int(i) >= 0})
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(wanted), QUERY_CHUNK):
                chunk = wanted[start : start + QUERY_CHUNK]
                sql = f"SELECT {','.join(COLUMNS)} FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                for row in self._con.execute(sql, chunk):
                    out[row[0]] = as_dict(row)
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def ids(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._con.execute("SELECT id FROM items ORDER BY id")]

    def paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT path FROM items")}

    def iter_rows(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        sql = f"SELECT {','.join(COLUMNS)} FROM items ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            rows = self._con.execute(sql).fetchall()
        return (as_dict(r) for r in rows)

    def ids_for(self, paths: Iterable[str] = (), labels: Iterable[str] = ()) -> list[int]:
        """Ids of items with any of these relative paths or labels."""
        found: set[int] = set()
        with self._lock:
            for column, values in (("path", list(paths)), ("label", list(labels))):
                for start in range(0, len(values), QUERY_CHUNK):
                    chunk = values[start : start + QUERY_CHUNK]
                    sql = f"SELECT id FROM items WHERE {column} IN ({','.join('?' * len(chunk))})"
                    found.update(r[0] for r in self._con.execute(sql, chunk))
        return sorted(found)

    def close(self) -> None:
        with self._lock:
            self._con.close()


# ---- the size the database was described at ---------------------------------------------------
# Recorded in every index manifest under DESCRIPTION_KEY, so that the server can
# prepare queries like the database (`model.preprocess.query_config`, policy
# `database`): {"side": the median longer side of the network inputs,
# "sides": {side: count}, "count", "min", "max"}. Sides come from the image
# headers (no decoding) and the database's preprocessing, so they are exact
# without touching the description loop.


def side_record(counts: Mapping[int, int]) -> dict[str, Any] | None:
    """The record of a distribution of input sides (None when empty). The
    median is the lower one, so it is always a size some database image has."""
    hist = {int(k): int(v) for k, v in counts.items() if int(v) > 0}
    if not hist:
        return None
    ordered = sorted(hist)
    total = sum(hist.values())
    seen, median = 0, ordered[0]
    for side in ordered:
        seen += hist[side]
        if 2 * seen >= total:
            median = side
            break
    return {
        "side": median,
        "sides": {str(k): hist[k] for k in ordered},
        "count": total,
        "min": ordered[0],
        "max": ordered[-1],
    }


def description_record(paths: Sequence[Path], cfg: PreprocessConfig) -> dict[str, Any] | None:
    """The record of database images `paths` prepared with `cfg` (the database
    side of the rule: `model.preprocess.database_config`); unreadable files are
    left out (the description step reports them)."""
    from vpr.model.preprocess import image_side, input_side

    sides = (image_side(p) for p in paths)
    return side_record(Counter(input_side(s, cfg) for s in sides if s is not None))


def merge_records(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record after adding images described as `new` to an index recorded as `old`."""
    counts: Counter[int] = Counter()
    for rec in (old, new):
        for k, v in ((rec or {}).get("sides") or {}).items():
            counts[int(k)] += int(v)
    return side_record(counts)


def query_side(manifest: Mapping[str, Any]) -> int | None:
    """The side queries against this index are resized to under the `database`
    policy; None for an index built before the record (today's behaviour then)."""
    rec = manifest.get(DESCRIPTION_KEY)
    if not isinstance(rec, Mapping) or not isinstance(rec.get("side"), int):
        return None
    return int(rec["side"])
