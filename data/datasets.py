"""Dataset readers: every format becomes one `PlaceDataset` (database items,
query items and, for each query, the indices of its positive database items).

Kinds (`open_dataset(kind, path, **options)`):

- ``folder``: the deep-visual-geo-localization-benchmark layout, `database/`
  and `queries/` (directly under `path`, or under `path/images/<split>/`)
  with names `@UTM_east@UTM_north@zone_number@zone_letter@lat@lon@...@.jpg`
  (images in sub-folders too); positives: database images within `radius`
  metres (default 25) of the query.
- ``mat``: a Pittsburgh/Tokyo ground-truth `.mat` (`dbStruct` with `dbImage`,
  `utmDb`, `qImage`, `utmQ`, `posDistThr`), read with scipy (no pickle);
  options `images_root` (database images; default the .mat's folder) and
  `queries_root` (default `images_root/queries_real` when it exists).
- ``traversal``: two folders of frames of the same route (`database`,
  `queries`, relative to `path` or absolute) with either a ground-truth CSV
  `query_index,positive_reference_indices` (space-separated indices; default
  `path/ground_truth.csv`) or, with `tolerance=t`, aligned traversals where
  query frame i matches database frames i-t..i+t.
- ``synthetic``: a folder written by `data.synthetic.make_route` (generated
  on the spot when the folder does not exist yet).

Every problem names the file (and line) and what is wrong. What a user names
(`KIND:PATH` and options) is parsed once, in `data.spec`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from vpr.data.names import parse_dvgl_name
from vpr.data.synthetic import ROUTE_FILE, make_route
from vpr.model.preprocess import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

DEFAULT_RADIUS_M = 25.0
Kind = Literal["folder", "mat", "traversal", "synthetic"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class Item:
    path: Path  # absolute image path
    label: str  # place label (file stem, frame index...)
    utm: tuple[float, float] | None = None  # easting, northing (m)
    utm_zone: str | None = None
    latlon: tuple[float, float] | None = None

    def meta(self) -> dict[str, Any]:
        """Flat metadata (what an index stores next to a descriptor)."""
        return {
            "path": str(self.path),
            "label": self.label,
            "utm_e": self.utm[0] if self.utm else None,
            "utm_n": self.utm[1] if self.utm else None,
            "utm_zone": self.utm_zone,
            "lat": self.latlon[0] if self.latlon else None,
            "lon": self.latlon[1] if self.latlon else None,
        }


@dataclass
class PlaceDataset:
    name: str
    root: Path
    database: list[Item]
    queries: list[Item]
    positives: list[np.ndarray]  # per query: int64 indices into database
    info: dict[str, Any] = field(default_factory=dict)  # kind, radius/tolerance, source files

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.queries):
            raise ValueError(f"{self.name}: {len(self.positives)} positive lists for {len(self.queries)} queries")
        for i, p in enumerate(self.positives):
            if p.size and (p.min() < 0 or p.max() >= len(self.database)):
                raise ValueError(f"{self.name}: query {i} has a positive outside 0..{len(self.database) - 1}")

    def summary(self) -> dict[str, Any]:
        counts = np.array([len(p) for p in self.positives])
        return {
            "name": self.name,
            "root": str(self.root),
            "database": len(self.database),
            "queries": len(self.queries),
            "queries_without_positive": int((counts == 0).sum()),
            "mean_positives": float(counts.mean()) if len(counts) else 0.0,
            **self.info,
        }

    def check_images(self, progress: bool = True) -> list[str]:
        """Decode every image (through model.preprocess); returns one message
        per file that fails (empty when all decode)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        from vpr.model.preprocess import load_image

        def check(item: Item) -> str | None:
            try:
                load_image(item.path)
            except ValueError as e:  # ImageDecodeError, ImageTooLarge
                return str(e)
            return None

        items = self.database + self.queries
        with ThreadPoolExecutor(4) as pool:
            results = list(
                tqdm(pool.map(check, items), total=len(items), desc="check images", unit="img", disable=not progress)
            )
        return [r for r in results if r]

    def subset_queries(self, limit: int) -> PlaceDataset:
        """`limit` queries evenly spread over the set (the database is kept)."""
        if limit <= 0:
            raise ValueError(f"query limit must be positive, got {limit}")
        if limit >= len(self.queries):
            return self
        keep = np.unique(np.linspace(0, len(self.queries) - 1, limit).round().astype(int))
        return PlaceDataset(
            self.name,
            self.root,
            self.database,
            [self.queries[i] for i in keep],
            [self.positives[i] for i in keep],
            {**self.info, "query_limit": limit},
        )


# ---- helpers -----------------------------------------------------------------


def list_images_recursive(folder: Path) -> list[Path]:
    """Image files under `folder` (any depth), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(
        (
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def positives_within(db_utm: np.ndarray, q_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    """Per query, database indices within `radius` metres, nearest first."""
    from scipy.spatial import cKDTree

    if not radius > 0:
        raise ValueError(f"positive radius must be > 0 metres, got {radius}")
    db_utm = np.asarray(db_utm, dtype=np.float64).reshape(-1, 2)
    q_utm = np.asarray(q_utm, dtype=np.float64).reshape(-1, 2)
    if len(q_utm) == 0:
        return []
    if len(db_utm) == 0:
        return [np.zeros(0, np.int64) for _ in q_utm]
    tree = cKDTree(db_utm)
    out = []
    for q, idx in zip(q_utm, tree.query_ball_point(q_utm, r=radius)):
        idx = np.asarray(idx, dtype=np.int64)
        d = np.linalg.norm(db_utm[idx] - q, axis=1) if idx.size else np.zeros(0)
        out.append(idx[np.argsort(d, kind="stable")])
    return out


def check_kind(kind: object) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """`kind` is known and every option is one its reader takes (messages list what is allowed)."""
    check_kind(kind)
    allowed = OPTIONS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset kind {kind!r} has no option(s) {', '.join(unknown)}; it accepts {', '.join(allowed) or 'none'}"
        )


def _float_option(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name}={value!r}: not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"option {name}={value!r}: must be finite")
    return v


def _int_option(name: str, value: Any) -> int:
    try:
        f = float(value)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"option {name}={value!r}: not an integer") from None


# ---- dvgl folder format ------------------------------------------------------


def _dvgl_items(folder: Path, root: Path) -> list[Item]:
    items = []
    for p in list_images_recursive(folder):
        utm, zone, latlon = parse_dvgl_name(p)
        items.append(Item(p.resolve(), p.relative_to(folder).with_suffix("").as_posix(), utm, zone, latlon))
    return items


def _check_zones(items: list[Item], where: Path) -> str | None:
    zones = {i.utm_zone for i in items if i.utm_zone}
    if len({z[:-1] if z[-1:].isalpha() else z for z in zones}) > 1:
        raise ValueError(
            f"{where}: images lie in different UTM zones ({', '.join(sorted(zones))}); "
            "distances across zones are meaningless, re-project them to one zone"
        )
    return next(iter(zones)) if zones else None


def read_folder(
    path: Path,
    radius: float = DEFAULT_RADIUS_M,
    split: str = "test",
    database: Path | str | None = None,
    queries: Path | str | None = None,
) -> PlaceDataset:
    """dvgl layout under `path`; `database`/`queries` name other folders
    (relative to `path` or absolute) holding dvgl-named images."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    base = root
    if (
        database is None
        and queries is None
        and not (root / "database").is_dir()
        and (root / "images" / split / "database").is_dir()
    ):
        base = root / "images" / split
    db_dir = base / database if database is not None else base / "database"
    q_dir = base / queries if queries is not None else base / "queries"
    for d in (db_dir, q_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d}: missing; a folder dataset has database/ and queries/ folders "
                "with @UTM_east@UTM_north@...@.jpg names"
            )
    radius = _float_option("radius", radius)
    db, q = _dvgl_items(db_dir, root), _dvgl_items(q_dir, root)
    _check_zones(db + q, base)
    pos = positives_within(np.array([i.utm for i in db]), np.array([i.utm for i in q]), radius)
    return PlaceDataset(
        root.resolve().name,
        root.resolve(),
        db,
        q,
        pos,
        {
            "kind": "folder",
            "radius_m": radius,
            "database_dir": str(db_dir.resolve()),
            "queries_dir": str(q_dir.resolve()),
        },
    )


# ---- Pittsburgh .mat -----------------------------------------------------------


def _mat_field(struct: Any, name: str, path: Path) -> Any:
    try:
        return getattr(struct, name)
    except AttributeError:
        have = ", ".join(getattr(struct, "_fieldnames", []) or [])
        raise ValueError(f"{path}: dbStruct has no field {name!r} (fields: {have or 'none'})") from None


def _mat_names(value: Any, field_name: str, path: Path) -> list[str]:
    arr = np.atleast_1d(np.asarray(value, dtype=object)).ravel()
    names = []
    for v in arr:
        v = np.asarray(v).ravel()
        s = v[0] if v.size == 1 else None
        if not isinstance(s, str) or not s:
            raise ValueError(f"{path}: dbStruct.{field_name} must hold image file names (strings), found {v!r}")
        names.append(s.strip())
    return names


def _mat_utm(value: Any, count: int, field_name: str, path: Path) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 2 and count == 1:
        arr = arr.reshape(2, 1)
    if arr.shape == (2, count):
        arr = arr.T
    if arr.shape != (count, 2):
        raise ValueError(
            f"{path}: dbStruct.{field_name} has shape {arr.shape}; expected (2, {count}) for {count} images"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: dbStruct.{field_name} has non-finite coordinates")
    return arr


def _bool_option(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name}={value!r}: expected true or false")


def read_mat(
    path: Path,
    images_root: Path | str | None = None,
    queries_root: Path | str | None = None,
    radius: float | None = None,
    check_files: bool | str = True,
) -> PlaceDataset:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    check_files = _bool_option("check_files", check_files)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .mat file")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (MatReadError, ValueError, OSError, TypeError) as e:
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    if "dbStruct" not in mat:
        raise ValueError(
            f"{path}: no 'dbStruct' variable (found {', '.join(k for k in mat if not k.startswith('__')) or 'none'})"
        )
    s = mat["dbStruct"]
    db_names = _mat_names(_mat_field(s, "dbImage", path), "dbImage", path)
    q_names = _mat_names(_mat_field(s, "qImage", path), "qImage", path)
    utm_db = _mat_utm(_mat_field(s, "utmDb", path), len(db_names), "utmDb", path)
    utm_q = _mat_utm(_mat_field(s, "utmQ", path), len(q_names), "utmQ", path)
    thr = getattr(s, "posDistThr", None)
    radius = _float_option("radius", radius if radius is not None else (thr if thr is not None else DEFAULT_RADIUS_M))
    db_root = Path(images_root) if images_root is not None else path.parent
    if queries_root is not None:
        q_root = Path(queries_root)
    else:
        q_root = db_root / "queries_real" if (db_root / "queries_real").is_dir() else db_root

    def items(names: list[str], utm: np.ndarray, root: Path, what: str) -> list[Item]:
        out = [
            Item((root / n).resolve(), Path(n).with_suffix("").as_posix(), (float(e), float(nn)))
            for n, (e, nn) in zip(names, utm)
        ]
        if check_files:
            missing = [i.path for i in out if not i.path.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path}: {len(missing)} of {len(out)} {what} images are missing under {root}, "
                    f"e.g. {missing[0]} (set images_root/queries_root)"
                )
        return out

    db = items(db_names, utm_db, db_root, "database")
    q = items(q_names, utm_q, q_root, "query")
    which = getattr(s, "whichSet", None)
    return PlaceDataset(
        path.stem,
        path.parent.resolve(),
        db,
        q,
        positives_within(utm_db, utm_q, radius),
        {
            "kind": "mat",
            "radius_m": radius,
            "mat": str(path.resolve()),
            "which_set": str(which) if which is not None else None,
        },
    )


# ---- traversals ----------------------------------------------------------------


def read_ground_truth_csv(path: Path, num_queries: int, num_database: int) -> list[np.ndarray]:
    """`query_index,positive_reference_indices` (space-separated) -> per-query
    positives. Queries absent from the file have no positive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ground-truth file")
    positives: list[np.ndarray | None] = [None] * num_queries
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["query_index", "positive_reference_indices"]:
            raise ValueError(
                f"{path}: line 1: expected the header query_index,positive_reference_indices, got {header}"
            )
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}: line {line}: expected 2 columns, got {len(row)}")
            try:
                qi = int(row[0])
                refs = [int(t) for t in row[1].split()]
            except ValueError:
                raise ValueError(f"{path}: line {line}: indices must be integers, got {row}") from None
            if not 0 <= qi < num_queries:
                raise ValueError(f"{path}: line {line}: query index {qi} is out of range 0..{num_queries - 1}")
            if positives[qi] is not None:
                raise ValueError(f"{path}: line {line}: query index {qi} appears twice")
            bad = [r for r in refs if not 0 <= r < num_database]
            if bad:
                raise ValueError(f"{path}: line {line}: reference index {bad[0]} is out of range 0..{num_database - 1}")
            positives[qi] = np.unique(np.asarray(refs, dtype=np.int64))
    missing = sum(p is None for p in positives)
    if missing:
        log.warning("%s: %d of %d queries are not listed; they have no positive", path, missing, num_queries)
    return [p if p is not None else np.zeros(0, np.int64) for p in positives]


def aligned_positives(num_queries: int, num_database: int, tolerance: int) -> list[np.ndarray]:
    """Frame i matches database frames i-t..i+t (clipped to the database)."""
    return [
        np.arange(max(0, i - tolerance), min(num_database, i + tolerance + 1), dtype=np.int64)
        for i in range(num_queries)
    ]


def _traversal_items(folder: Path) -> list[Item]:
    from vpr.model.preprocess import list_images

    return [Item(p.resolve(), p.stem) for p in list_images(folder)]


def read_traversal(
    path: Path | None = None,
    database: Path | str = "database",
    queries: Path | str = "queries",
    ground_truth: Path | str | None = None,
    tolerance: int | None = None,
) -> PlaceDataset:
    root = Path(path) if path is not None else Path(database).parent
    db_dir = root / database if not Path(database).is_absolute() else Path(database)
    q_dir = root / queries if not Path(queries).is_absolute() else Path(queries)
    db, q = _traversal_items(db_dir), _traversal_items(q_dir)
    info: dict[str, Any] = {
        "kind": "traversal",
        "database_dir": str(db_dir.resolve()),
        "queries_dir": str(q_dir.resolve()),
    }
    if tolerance is not None:
        if ground_truth is not None:
            raise ValueError("give either a ground-truth CSV or a frame tolerance, not both")
        t = _int_option("tolerance", tolerance)
        if t < 0:
            raise ValueError(f"frame tolerance must be >= 0, got {t}")
        if len(db) != len(q):
            raise ValueError(
                f"aligned traversals need the same number of frames: {db_dir} has {len(db)}, "
                f"{q_dir} has {len(q)} (use a ground-truth CSV instead)"
            )
        positives = aligned_positives(len(q), len(db), t)
        info["tolerance"] = t
    else:
        gt = Path(ground_truth) if ground_truth is not None else root / "ground_truth.csv"
        if ground_truth is not None and not gt.is_absolute() and not gt.exists():
            gt = root / gt
        if ground_truth is None and not gt.is_file():
            raise FileNotFoundError(f"{gt}: no ground truth; pass a ground-truth CSV or a frame tolerance")
        positives = read_ground_truth_csv(gt, len(q), len(db))
        info["ground_truth"] = str(gt.resolve())
    name = f"{root.resolve().name}:{db_dir.name}->{q_dir.name}"
    return PlaceDataset(name, root.resolve(), db, q, positives, info)


# ---- synthetic -------------------------------------------------------------------


def read_synthetic(path: Path, radius: float | None = None, **generate: Any) -> PlaceDataset:
    path = Path(path)
    if "overwrite" in generate:
        generate["overwrite"] = _bool_option("overwrite", generate["overwrite"])
    if not (path / ROUTE_FILE).is_file():
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path}: exists but has no {ROUTE_FILE}; not a synthetic route folder")
        make_route(path, **generate)
    elif generate:
        make_route(path, **generate)  # checks that the folder matches these parameters
    try:
        route = json.loads((path / ROUTE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ROUTE_FILE}: corrupt route description ({e})") from e
    ds = read_folder(path, radius=radius if radius is not None else route.get("radius_m", DEFAULT_RADIUS_M))
    ds.info.update(kind="synthetic", route=route.get("params", {}))
    return ds


READERS: dict[str, Callable[..., PlaceDataset]] = {
    "folder": read_folder,
    "mat": read_mat,
    "traversal": read_traversal,
    "synthetic": read_synthetic,
}
OPTIONS: dict[str, tuple[str, ...]] = {
    "folder": ("radius", "split", "database", "queries"),
    "mat": ("images_root", "queries_root", "radius", "check_files"),
    "traversal": ("database", "queries", "ground_truth", "tolerance"),
    "synthetic": ("radius", "places", "seed", "spacing", "size", "lighting", "overwrite"),
}


def open_dataset(kind: str, path: Path, **options: Any) -> PlaceDataset:
    """Read a dataset of `kind` at `path` (see the module doc for kinds/options)."""
    options = {k: v for k, v in options.items() if v is not None}
    check_options(kind, options)
    ds = READERS[kind](Path(path), **options)
    log.info("dataset %s (%s): %d database, %d queries", ds.name, kind, len(ds.database), len(ds.queries))
    return ds
