"""Where a version's vectors live: the interface every backend implements,
and the FAISS one (default). The Milvus one is in `index.milvus_backend`.

A backend writes a version's vectors while the store writes everything else
(metadata, manifest, publication); the manifest fields a backend returns are
all it needs to open that version again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from vpr.index import faiss_backend as fb

INDEX_FILE = "index.faiss"
Progress = Callable[[int, int], None]


class Searcher(Protocol):
    """Search over one published version; must be safe for concurrent calls."""

    ntotal: int
    param_names: tuple[str, ...]

    def search(self, queries: np.ndarray, k: int, params: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (N, D) float32 queries -> (scores, ids), -1 where no hit."""

    def close(self) -> None: ...


class Backend(Protocol):
    kind: str

    def build(
        self, folder: Path, name: str, vectors: np.ndarray, ids: np.ndarray, factory: str, progress: Progress | None
    ) -> dict: ...

    def edit(
        self,
        old_folder: Path,
        old_manifest: dict,
        folder: Path,
        name: str,
        add_vectors: np.ndarray,
        add_ids: np.ndarray,
        remove_ids: np.ndarray,
    ) -> dict: ...

    def open(self, folder: Path, manifest: dict) -> Searcher: ...

    def discard(self, fields: dict) -> None:
        """Undo the external side of a build that was not published."""

    def cleanup(self, name: str, live: list[dict]) -> int:
        """Drop external state of `name` no published manifest in `live` uses."""


class FaissSearcher:
    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        self.param_names = fb.param_names(index)

    def search(self, queries: np.ndarray, k: int, params: dict | None) -> tuple[np.ndarray, np.ndarray]:
        sp = fb.search_parameters(self.index, params)
        # FAISS releases the GIL in search, and per-call parameters leave the
        # shared index untouched, so concurrent callers need no lock.
        return self.index.search(queries, k, params=sp) if sp is not None else self.index.search(queries, k)

    def close(self) -> None:
        self.index = None


class FaissBackend:
    kind = "faiss"

    def __init__(self, max_train: int = fb.DEFAULT_MAX_TRAIN, mmap: bool = False) -> None:
        self.max_train = max_train
        self.mmap = mmap

    def build(
        self, folder: Path, name: str, vectors: np.ndarray, ids: np.ndarray, factory: str, progress: Progress | None
    ) -> dict:
        index = fb.build_index(vectors, ids, factory, self.max_train, progress, normalized=True)
        fb.write_index(index, folder / INDEX_FILE)
        return {
            "backend": "faiss",
            "index_file": INDEX_FILE,
            "index_type": fb.describe(index),
            "search_params": list(fb.param_names(index)),
        }

    def edit(
        self,
        old_folder: Path,
        old_manifest: dict,
        folder: Path,
        name: str,
        add_vectors: np.ndarray,
        add_ids: np.ndarray,
        remove_ids: np.ndarray,
    ) -> dict:
        index = fb.read_index(old_folder / old_manifest.get("index_file", INDEX_FILE))
        if len(remove_ids):
            fb.remove_ids(index, remove_ids)
        if len(add_ids):
            fb.add_vectors(index, add_vectors, add_ids)
        fb.write_index(index, folder / INDEX_FILE)
        return {
            "backend": "faiss",
            "index_file": INDEX_FILE,
            "index_type": fb.describe(index),
            "search_params": list(fb.param_names(index)),
        }

    def open(self, folder: Path, manifest: dict) -> FaissSearcher:
        path = folder / manifest.get("index_file", INDEX_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: index file missing")
        if self.mmap:  # IVF lists can be mapped; other index types cannot
            try:
                return FaissSearcher(fb.read_index(path, mmap=True))
            except ValueError:
                pass
        return FaissSearcher(fb.read_index(path))

    def discard(self, fields: dict) -> None:
        return None

    def cleanup(self, name: str, live: list[dict]) -> int:
        return 0
