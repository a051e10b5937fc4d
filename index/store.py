"""Versioned place databases under <indexes_dir>/<name>/<version>/.

A version folder holds the vectors (`index.faiss`, or a Milvus collection it
names), `meta.sqlite` (one row per database image) and `manifest.json` (index
name and version, the model that described it and its weights' sha256,
descriptor dimension, count, factory spec, creation time, root). `active`
names the served version.

Names, versions, `active`, the writer lock and atomic publication are the
shared `model.store.VersionedStore`'s: a version is written into a hidden
`.tmp-*` sibling, fsynced, renamed to its number, and only then is `active`
switched (itself an atomic rename). A crash at any point leaves the previous
active version intact; hidden folders are never loaded and are removed (with
their Milvus side) by the next writer. Versions never change once published:
`add` and `remove` write a new version (copy-on-write), so a `LoadedIndex` of
the old version keeps answering; a server swaps which one it searches
(`server.runtime.Runtime`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpr.index import faiss_backend as fb
from vpr.index import hubness as hub_mod
from vpr.index import meta as meta_db
from vpr.index.backends import Backend, FaissBackend, Searcher
from vpr.index.meta import Entry, MetaReader
from vpr.model.fileio import sha256_file
from vpr.model.store import MANIFEST_FILE, BadSpec, NotFound, Ref, StoreError, VersionedStore, now_iso
from vpr.model.store import check_name as _check_name
from vpr.settings import IndexSettings

log = logging.getLogger(__name__)

META_FILE = "meta.sqlite"
BACKEND_FILE = "backend.json"  # what a backend did outside the folder, to undo if unpublished
FORMAT = 1
IndexRef = Ref  # an index version, `name@version`
Progress = Callable[[int, int], None]

__all__ = [
    "Entry",
    "Hit",
    "IndexMismatch",
    "IndexRef",
    "IndexStore",
    "IndexStoreError",
    "LoadedIndex",
    "ModelStamp",
    "check_compatible",
    "check_name",
    "now_iso",
]


class IndexStoreError(StoreError):
    """An index or version that is missing, malformed or cannot be written."""


class IndexNotFound(IndexStoreError, NotFound):
    """No such index name or version."""


class BadIndexSpec(IndexStoreError, BadSpec):
    """A malformed index name or `name@version`."""


class IndexMismatch(ValueError):
    """A model whose descriptors cannot be searched in an index."""


@dataclass
class Hit:
    id: int
    score: float
    meta: dict  # path, label, utm_e, utm_n, utm_zone, lat, lon, extra


@dataclass(frozen=True)
class ModelStamp:
    """What an index records about the model that described its database."""

    spec: str  # name@version
    sha256: str
    dim: int

    @classmethod
    def of(cls, model: Any) -> ModelStamp:
        """From a registry `LoadedModel`, a model manifest dict or a ModelStamp."""
        if isinstance(model, ModelStamp):
            return model
        manifest = model if isinstance(model, dict) else getattr(model, "manifest", None)
        if not isinstance(manifest, dict):
            raise TypeError(f"{model!r}: expected a LoadedModel, a model manifest or a ModelStamp")
        try:
            spec = f"{manifest['name']}@{manifest['version']}"
            dim = manifest.get("descriptor_dim")
            if dim is None and hasattr(model, "net"):
                dim = model.net.descriptor_dim
            if dim is None:
                raise KeyError("descriptor_dim")
            return cls(spec, str(manifest["sha256"]), int(dim))
        except (KeyError, TypeError) as e:
            raise IndexStoreError(f"model manifest lacks {e}: need name, version, sha256, descriptor_dim") from None


def _model_spec(model_manifest: dict) -> str:
    return f"{model_manifest.get('name')}@{model_manifest.get('version')}"


def check_compatible(index_manifest: dict, model_manifest: dict) -> None:
    """Refuse to search an index with descriptors from the wrong model.

    Compatible: the model that built the index (same name@version and weights
    sha256), or a student whose manifest `parent` is that model; in both cases
    the descriptor dimensions must agree."""
    index_name = f"{index_manifest.get('name')}@{index_manifest.get('version')}"
    built_with = index_manifest.get("model")
    spec = _model_spec(model_manifest)
    idim, mdim = index_manifest.get("dim"), model_manifest.get("descriptor_dim")
    if spec == built_with:
        if model_manifest.get("sha256") != index_manifest.get("model_sha256"):
            raise IndexMismatch(
                f"index {index_name} was built with {built_with} weights sha256 "
                f"{str(index_manifest.get('model_sha256'))[:12]}..., but the model {spec} now has "
                f"{str(model_manifest.get('sha256'))[:12]}...; rebuild the index with this model"
            )
    elif model_manifest.get("parent") and model_manifest.get("parent") == built_with:
        pass  # a student distilled from the index's teacher
    else:
        parent = model_manifest.get("parent")
        raise IndexMismatch(
            f"index {index_name} was built with model {built_with}; {spec} is neither that model nor a "
            f"student of it (its parent is {parent or 'unset'}); use {built_with} or one of its students"
        )
    if idim is None or mdim is None or int(idim) != int(mdim):
        raise IndexMismatch(
            f"index {index_name} holds {idim}-d descriptors but model {spec} produces {mdim}-d descriptors"
        )


def check_name(name: str) -> str:
    return _check_name(name, "index", BadIndexSpec)


# ---- a loaded version --------------------------------------------------------
class LoadedIndex:
    """One published version, ready to search from many threads.

    It holds its vectors in memory (or its Milvus collection) and an open
    read-only metadata connection, so it stays valid when another version is
    activated or built: a server swaps the reference it serves from, and
    searches already running on this object finish normally."""

    def __init__(
        self,
        ref: IndexRef,
        manifest: dict,
        path: Path,
        searcher: Searcher,
        meta: MetaReader,
        hubness: hub_mod.Hubness | None = None,
    ) -> None:
        self.ref = ref
        self.manifest = manifest
        self.path = path
        self.dim = int(manifest["dim"])
        self.count = int(manifest["count"])
        self.root = Path(manifest.get("root", "."))
        self._searcher = searcher
        self._meta = meta
        self.hubness = hubness  # how generic each place looks (index/hubness.py); None when not recorded
        # how alike places one spacing apart are, (mean, spread) of their cosine; None when not recorded
        self.step = hub_mod.step_of(manifest, path)

    def __repr__(self) -> str:
        return f"LoadedIndex({self.ref}, {self.count} x {self.dim}-d, {self.manifest.get('factory')})"

    @property
    def param_names(self) -> tuple[str, ...]:
        """Search-time parameters this index accepts (nprobe, efSearch...)."""
        return tuple(self._searcher.param_names)

    def check_model(self, model: Any) -> None:
        """`check_compatible` against a LoadedModel or model manifest."""
        check_compatible(self.manifest, model if isinstance(model, dict) else model.manifest)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (N, {self.dim}) for index {self.ref}, got {q.shape}")
        return fb.l2_normalize(q, "queries")

    def search_ids(self, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (scores, ids) arrays (N, k); -1 ids where fewer than k hits."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._queries(queries)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._searcher.search(q, int(k), params)

    def search(self, queries: np.ndarray, k: int, params: dict | None = None) -> list[list[Hit]]:
        """Top-k hits (best first, with metadata) for each query descriptor.

        `params`: search-time settings, e.g. {"nprobe": 16} for IVF or
        {"efSearch": 128} for HNSW; they apply to this call only."""
        scores, ids = self.search_ids(queries, k, params)
        metas = self._meta.get(ids[ids >= 0].ravel().tolist())
        out: list[list[Hit]] = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:
                    continue
                m = metas.get(int(i))
                if m is None:
                    log.error("index %s: id %d has no metadata row", self.ref, i)
                    m = {"id": int(i)}
                hits.append(Hit(int(i), float(s), {k_: v for k_, v in m.items() if k_ != "id"}))
            out.append(hits)
        return out

    def meta(self, ids: Iterable[int]) -> dict[int, dict]:
        return self._meta.get(ids)

    def image_path(self, hit: Hit) -> Path:
        """Absolute path of a hit's image (the manifest root + its relative path)."""
        return self.root / hit.meta["path"]

    def close(self) -> None:
        self._searcher.close()
        self._meta.close()


# ---- the store ---------------------------------------------------------------
class IndexStore:
    def __init__(self, indexes_dir: Path, settings: IndexSettings | None = None) -> None:
        self.root = Path(indexes_dir)
        self.settings = settings or IndexSettings()
        # A version published without activation (e.g. by a model the served
        # one cannot query) must not be picked up by its bare name.
        self._store = VersionedStore(
            self.root,
            "index",
            error=IndexStoreError,
            not_found=IndexNotFound,
            bad_spec=BadIndexSpec,
            latest_if_inactive=False,
            discard=self._discard,
        )

    # -- backends
    def _backend(self, kind: str | None = None) -> Backend:
        kind = kind or self.settings.backend
        if kind == "faiss":
            return FaissBackend(self.settings.max_train, self.settings.mmap)
        if kind == "milvus":
            from vpr.index.milvus_backend import MilvusBackend  # optional dependency

            return MilvusBackend.from_settings(self.settings, self.root)
        raise IndexStoreError(f"unknown index backend {kind!r}; choose faiss or milvus")

    def validate_factory(self, factory: str, dim: int, kind: str | None = None) -> None:
        """Fail before hours of description on a spec the backend cannot build."""
        fb.make_index(factory, dim)
        if (kind or self.settings.backend) == "milvus":
            from vpr.index.milvus_backend import milvus_index

            milvus_index(factory)

    # -- naming
    def names(self) -> list[str]:
        return self._store.names()

    def versions(self, name: str) -> list[int]:
        return self._store.versions(name)

    def active(self, name: str) -> IndexRef | None:
        return self._store.active(name)

    def dir(self, ref: IndexRef) -> Path:
        return self._store.dir(ref)

    def resolve(self, spec: str | IndexRef) -> IndexRef:
        """`name@version`, or `name` for its active version."""
        return self._store.resolve(spec)

    def manifest(self, spec: str | IndexRef) -> dict[str, Any]:
        ref = self.resolve(spec)
        path = self.dir(ref) / MANIFEST_FILE
        m = self._store.read_manifest(ref)
        for key in ("name", "version", "model", "model_sha256", "dim", "count", "factory", "backend"):
            if key not in m:
                raise IndexStoreError(f"{path}: manifest lacks {key!r}")
        return m

    # -- reading
    def load(self, spec: str | IndexRef, model: Any = None) -> LoadedIndex:
        """Open a published version (`name` = its active one) for searching.

        With `model` (LoadedModel or model manifest), refuses an incompatible
        model (see `check_compatible`). Files are checked against the sizes the
        manifest recorded; `verify` also checks their sha256."""
        ref = self.resolve(spec)
        m = self.manifest(ref)
        if model is not None:
            check_compatible(m, model if isinstance(model, dict) else model.manifest)
        folder = self.dir(ref)
        self._check_sizes(folder, m)
        try:
            hubness = hub_mod.Hubness.open(folder, m)
        except ValueError as e:
            raise IndexStoreError(str(e)) from None
        searcher = self._backend(m["backend"]).open(folder, m)
        if searcher.ntotal != int(m["count"]):
            searcher.close()
            raise IndexStoreError(f"{folder}: index holds {searcher.ntotal} vectors, manifest says {m['count']}")
        return LoadedIndex(ref, m, folder, searcher, MetaReader(folder / META_FILE), hubness)

    def _check_sizes(self, folder: Path, m: dict) -> None:
        for fname, info in m.get("files", {}).items():
            p = folder / fname
            if not p.is_file():
                raise IndexStoreError(f"{p}: missing (listed in the manifest)")
            if p.stat().st_size != info["bytes"]:
                raise IndexStoreError(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")

    def verify(self, spec: str | IndexRef) -> dict[str, Any]:
        """Check every file's sha256 against the manifest; returns the manifest."""
        ref = self.resolve(spec)
        m = self.manifest(ref)
        folder = self.dir(ref)
        self._check_sizes(folder, m)
        for fname, info in m.get("files", {}).items():
            actual = sha256_file(folder / fname)
            if actual != info["sha256"]:
                raise IndexStoreError(f"{folder / fname}: sha256 {actual[:12]}... != manifest {info['sha256'][:12]}...")
        return m

    def activate(self, spec: str | IndexRef) -> IndexRef:
        ref = self.resolve(spec)
        self.manifest(ref)  # refuse to activate a malformed version
        self._store.activate(ref)
        log.info("index %s is now active", ref)
        return ref

    # -- writing (staging, locking, version numbers: model.store.VersionedStore)
    def _discard(self, tmp: Path) -> None:
        """Undo the external side (e.g. a Milvus collection) of an unpublished
        folder, as recorded in its `backend.json`."""
        fields_file = tmp / BACKEND_FILE
        if fields_file.is_file():
            fields = json.loads(fields_file.read_text())
            self._backend(fields.get("backend", "faiss")).discard(fields)

    def _publish(self, tmp: Path, manifest: dict, activate: bool) -> IndexRef:
        """Checksum the files, publish as the next version, then activate."""
        manifest["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name not in (MANIFEST_FILE, BACKEND_FILE)
        }
        ref = self._store.publish(tmp, manifest)
        log.info("published index %s (%d x %d-d, %s)", ref, manifest["count"], manifest["dim"], manifest["factory"])
        if activate:
            self.activate(ref)
        return ref

    def build_from_descriptors(
        self,
        name: str,
        descriptors: np.ndarray,
        items: Sequence[Any],
        root: Path,
        model: Any,
        factory: str = "Flat",
        progress: Progress | None = None,
        activate: bool = True,
        ids: Sequence[int] | None = None,
        details: dict | None = None,
        description: dict | None = None,
    ) -> IndexRef:
        """Publish a new version of `name` from ready descriptors.

        `items[i]` (Entry or any object with path/label/utm/utm_zone/latlon)
        describes row i; `model` is what produced them (LoadedModel, model
        manifest or ModelStamp). Ids are 0..N-1 unless given. `description`:
        the size the images were described at (`meta.description_record`),
        recorded for the server's query size rule; None for unknown."""
        stamp = ModelStamp.of(model)
        entries = [Entry.of(i) for i in items]
        x = fb.l2_normalize(descriptors)
        if len(entries) != len(x):
            raise ValueError(f"{len(entries)} items for {len(x)} descriptors")
        if len(x) == 0:
            raise ValueError(f"index {name}: no database items to index")
        if x.shape[1] != stamp.dim:
            raise IndexMismatch(f"descriptors are {x.shape[1]}-d but model {stamp.spec} produces {stamp.dim}-d")
        ids_arr = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids_arr) != len(x) or len(np.unique(ids_arr)) != len(ids_arr) or (ids_arr < 0).any():
            raise ValueError("ids must be unique non-negative integers, one per descriptor")
        root = Path(root).resolve()
        rows = [meta_db.row_for(i, e, root) for i, e in zip(ids_arr.tolist(), entries)]
        self.validate_factory(factory, x.shape[1])
        backend = self._backend()
        with self._store.stage(name) as tmp:
            t0 = time.perf_counter()
            meta_db.create(tmp / META_FILE, rows)
            hub = hub_mod.hubness(x, [e.utm for e in entries])
            hub_record = hub_mod.save(tmp, ids_arr, hub) if hub is not None else None
            step_record = hub_mod.step_similarity(x, [e.utm for e in entries])
            fields = backend.build(tmp, name, x, ids_arr, fb.normalize_spec(factory), progress)
            manifest = {
                "format": FORMAT,
                "name": name,
                "model": stamp.spec,
                "model_sha256": stamp.sha256,
                "dim": int(x.shape[1]),
                "count": int(len(x)),
                "factory": fb.normalize_spec(factory),
                "metric": "inner_product",
                "normalized": True,
                "created": now_iso(),
                "root": str(root),
                "next_id": int(ids_arr.max()) + 1,
                "derived_from": None,
                "operation": f"build {len(x)}",
                "build_seconds": round(time.perf_counter() - t0, 3),
                "details": details or {},
                **({meta_db.DESCRIPTION_KEY: description} if description else {}),
                **({hub_mod.HUB_KEY: hub_record} if hub_record else {}),
                **({hub_mod.STEP_KEY: step_record} if step_record else {}),
                **fields,
            }
            return self._publish(tmp, manifest, activate)

    def build(
        self,
        name: str,
        model: Any,
        items: Sequence[Any],
        root: Path,
        factory: str = "Flat",
        batch_size: int = 8,
        progress: Progress | None = None,
        activate: bool = True,
        device: Any = None,
        skip_bad: bool = False,
    ) -> IndexRef:
        """Describe `items` with `model` (a registry LoadedModel), then publish.

        Description is resumable: images an interrupted build of this index with
        the same model already described are not described again."""
        check_name(name)
        self.validate_factory(factory, int(model.net.descriptor_dim))
        stamp = ModelStamp.of(model)
        entries = [Entry.of(i) for i in items]
        if not entries:
            raise ValueError(f"index {name}: no database images")
        root = Path(root).resolve()
        paths = [e.path if e.path.is_absolute() else root / e.path for e in entries]
        for e in entries:
            meta_db.relative_path(e.path, root)  # every image must be under root
        with self._described(name, model, stamp, paths, entries, batch_size, device, progress, skip_bad) as (
            descs,
            entries,
        ):
            size = meta_db.description_record(paths, _db_cfg(model))
            return self.build_from_descriptors(
                name, descs, entries, root, stamp, factory, activate=activate, description=size
            )

    @contextlib.contextmanager
    def _described(
        self,
        name: str,
        model: Any,
        stamp: ModelStamp,
        paths: list[Path],
        entries: list[Entry],
        batch_size: int,
        device: Any,
        progress: Progress | None,
        skip_bad: bool,
    ) -> Iterator[tuple[np.ndarray, list[Entry]]]:
        """The descriptors of `paths` (undecodable images left out with `skip_bad`)
        for the caller to publish. They go through a build's own cache under
        `.work/`: a killed build or add resumes from it; it is deleted once the
        caller's block has published (kept when it fails, for the retry)."""
        from vpr.describe.cache import DescriptorCache  # needs torch
        from vpr.describe.describe import describe
        from vpr.model.preprocess import database_config

        work = self.root / ".work" / f"{name}-{stamp.sha256[:16]}"
        descs = describe(
            model,
            paths,
            resize=database_config,  # the database side of the size rule (policy `database`)
            cache=DescriptorCache(work),
            batch_size=batch_size,
            chunk_size=self.settings.chunk_size,
            device=device,
            progress=f"describe {name}",
            on_progress=progress,
            skip_bad=skip_bad,
        ).desc
        yield _drop_bad(descs, entries)
        shutil.rmtree(work, ignore_errors=True)

    def add_descriptors(
        self,
        spec: str | IndexRef,
        descriptors: np.ndarray,
        items: Sequence[Any],
        model: Any,
        root: Path | None = None,
        activate: bool = True,
    ) -> IndexRef:
        """New version = `spec` (default: the active one) plus these items."""
        return self._edit(spec, model, descriptors, items, None, root, activate)

    def add(
        self,
        spec: str | IndexRef,
        model: Any,
        items: Sequence[Any],
        root: Path | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
        activate: bool = True,
        device: Any = None,
        skip_bad: bool = False,
        skip_existing: bool = False,
    ) -> IndexRef:
        """Describe `items` with the index's own model and add them (no rebuild).

        Images already in the index are refused, or left out with
        `skip_existing` (e.g. re-adding a whole dataset after it grew)."""
        m = self.manifest(spec)
        stamp = ModelStamp.of(model)
        self._same_model(m, stamp)
        root = Path(root).resolve() if root else Path(m["root"])
        entries = [Entry.of(i) for i in items]
        if skip_existing:
            reader = MetaReader(self.dir(self.resolve(spec)) / META_FILE)
            try:
                known = reader.paths()
            finally:
                reader.close()
            before = len(entries)
            entries = [e for e in entries if meta_db.relative_path(e.path, root) not in known]
            log.info("%d of %d images are already in the index", before - len(entries), before)
            if not entries:
                raise ValueError(f"all {before} images are already in index {m['name']}@{m['version']}")
        if not entries:
            raise ValueError("nothing to add")
        paths = [e.path if e.path.is_absolute() else root / e.path for e in entries]
        with self._described(m["name"], model, stamp, paths, entries, batch_size, device, progress, skip_bad) as (
            descs,
            entries,
        ):
            size = meta_db.description_record(paths, _db_cfg(model))
            return self._edit(spec, stamp, descs, entries, None, root, activate, size)

    def remove(
        self,
        spec: str | IndexRef,
        ids: Iterable[int] = (),
        paths: Iterable[str | Path] = (),
        labels: Iterable[str] = (),
        activate: bool = True,
    ) -> IndexRef:
        """New version = `spec` (default: the active one) without the items
        with these ids, relative (or absolute, under the root) paths or place
        labels. Unknown ids, paths or labels are refused."""
        ids, paths, labels = [int(i) for i in ids], list(paths), [str(x) for x in labels]
        if not (ids or paths or labels):
            raise ValueError("nothing to remove: give ids, paths or labels")

        def select(ref: IndexRef, m: dict) -> list[int]:
            reader = MetaReader(self.dir(ref) / META_FILE)
            try:
                rel = [meta_db.relative_path(Path(p), Path(m["root"])) for p in paths]
                unknown = sorted(set(ids) - set(reader.get(ids)))
                if unknown:
                    raise IndexStoreError(f"index {ref} has no ids {unknown[:10]}")
                by_path = reader.get(reader.ids_for(paths=rel))
                if missing := sorted(set(rel) - {d["path"] for d in by_path.values()}):
                    raise IndexStoreError(f"index {ref} has no images {missing[:5]}")
                by_label = reader.get(reader.ids_for(labels=labels))
                if missing := sorted(set(labels) - {d["label"] for d in by_label.values()}):
                    raise IndexStoreError(f"index {ref} has no place labels {missing[:5]}")
            finally:
                reader.close()
            return sorted(set(ids) | set(by_path) | set(by_label))

        return self._edit(spec, None, None, (), select, None, activate)

    @staticmethod
    def _same_model(m: dict, stamp: ModelStamp) -> None:
        """Adding needs the very model that built the index (a student's
        descriptors do not belong in the database)."""
        if stamp.spec != m["model"] or stamp.sha256 != m["model_sha256"] or stamp.dim != int(m["dim"]):
            raise IndexMismatch(
                f"index {m['name']}@{m['version']} was built with {m['model']} "
                f"(sha256 {m['model_sha256'][:12]}..., {m['dim']}-d); cannot add descriptors "
                f"from {stamp.spec} (sha256 {stamp.sha256[:12]}..., {stamp.dim}-d)"
            )

    def _edit(
        self,
        spec: str | IndexRef,
        model: Any,
        descriptors: np.ndarray | None,
        items: Sequence[Any],
        select: Callable[[IndexRef, dict], list[int]] | None,
        root: Path | None,
        activate: bool,
        added_size: dict | None = None,
    ) -> IndexRef:
        """Copy-on-write edit, resolved under the writer lock (held by the
        staged folder) so that two concurrent edits of the active version both land."""
        name, _ = self._store.parse(spec)
        with self._store.stage(name) as tmp:
            ref = self.resolve(spec)
            old = self.manifest(ref)
            root = Path(root).resolve() if root else Path(old["root"])
            if str(root) != old["root"]:
                raise ValueError(
                    f"root {root} differs from the index root {old['root']}; "
                    "paths are stored relative to the index root"
                )
            add_x = np.zeros((0, int(old["dim"])), np.float32)
            add_ids = np.zeros(0, np.int64)
            rows: list[tuple] = []
            if descriptors is not None:
                self._same_model(old, ModelStamp.of(model))
                entries = [Entry.of(i) for i in items]
                add_x = fb.l2_normalize(descriptors)
                if len(entries) != len(add_x):
                    raise ValueError(f"{len(entries)} items for {len(add_x)} descriptors")
                if add_x.shape[1] != int(old["dim"]):
                    raise IndexMismatch(f"descriptors are {add_x.shape[1]}-d, index {ref} holds {old['dim']}-d")
                add_ids = np.arange(old["next_id"], old["next_id"] + len(add_x), dtype=np.int64)
                rows = [meta_db.row_for(i, e, root) for i, e in zip(add_ids.tolist(), entries)]
                reader = MetaReader(self.dir(ref) / META_FILE)
                try:
                    dup = sorted({r[1] for r in rows} & reader.paths())
                finally:
                    reader.close()
                if dup:
                    raise IndexStoreError(
                        f"index {ref} already has {len(dup)} of these images, e.g. {dup[:3]}; remove them first"
                    )
            rm = np.asarray(select(ref, old) if select else [], dtype=np.int64)
            count = int(old["count"]) + len(add_ids) - len(rm)
            if count < 1:
                raise IndexStoreError(f"removing {len(rm)} items would leave index {ref} empty")
            backend = self._backend(old["backend"])
            meta_db.copy_edit(self.dir(ref) / META_FILE, tmp / META_FILE, rows, rm.tolist())
            fields = backend.edit(self.dir(ref), old, tmp, ref.name, add_x, add_ids, rm)
            op = (f"add {len(add_ids)}" if len(add_ids) else "") + (f"remove {len(rm)}" if len(rm) else "")
            manifest = {
                **old,
                **fields,
                "count": count,
                "created": now_iso(),
                "derived_from": str(ref),
                "operation": op,
                "next_id": int(old["next_id"]) + len(add_ids),
            }
            if manifest.pop(hub_mod.HUB_KEY, None):  # other places' neighbourhoods changed
                log.info("index %s: hubness not carried over by this edit; rebuild the index to restore it", name)
            if added_size and old.get(meta_db.DESCRIPTION_KEY):  # removals keep the record (sizes are not per id)
                manifest[meta_db.DESCRIPTION_KEY] = meta_db.merge_records(old[meta_db.DESCRIPTION_KEY], added_size)
            return self._publish(tmp, manifest, activate)

    def prune(self, name: str, keep: int = 3) -> list[IndexRef]:
        """Delete all but the newest `keep` versions (never the active one).
        Only for versions no running server still searches."""

        def drop_external(removed: list[dict]) -> None:
            live = [self.manifest(IndexRef(name, v)) for v in self.versions(name)]
            for kind in sorted({m.get("backend", "faiss") for m in removed}):
                with contextlib.suppress(Exception):  # a leftover collection is not worth failing over
                    self._backend(kind).cleanup(name, live)

        return self._store.prune(name, keep, drop_external)

    def info(self, name: str) -> list[dict]:
        """One summary per version, oldest first (for `vpr index list/show`)."""
        active = self.active(name)
        out = []
        for v in self.versions(name):
            m = self.manifest(IndexRef(name, v))
            out.append(
                {
                    "version": v,
                    "active": bool(active and active.version == v),
                    "count": m["count"],
                    "dim": m["dim"],
                    "factory": m["factory"],
                    "model": m["model"],
                    "backend": m["backend"],
                    "created": m["created"],
                    "operation": m.get("operation"),
                    "bytes": sum(f["bytes"] for f in m.get("files", {}).values()),
                }
            )
        return out


def _db_cfg(model: Any) -> Any:
    """How `model` prepares database images (the database side of the size rule)."""
    from vpr.model.preprocess import database_config  # needs torch

    return database_config(model.net.config.preprocess)


def _drop_bad(descs: np.ndarray, entries: list[Entry]) -> tuple[np.ndarray, list[Entry]]:
    """Drop rows of images that could not be decoded (NaN rows, `skip_bad`)."""
    ok = np.isfinite(descs).all(axis=1)
    if ok.all():
        return descs, entries
    bad = [str(e.path) for e, good in zip(entries, ok) if not good]
    log.warning("leaving out %d undecodable images, e.g. %s", len(bad), bad[:3])
    return descs[ok], [e for e, good in zip(entries, ok) if good]
