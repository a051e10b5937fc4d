"""Exact k-nearest-neighbour search by inner product on L2-normalised vectors.

The one exact search path: the `Flat` index backend and the recall evaluation
both go through it, so evaluation measures what the server would return.
"""

from __future__ import annotations

import faiss
import numpy as np


def as_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be a 2-D array (N, D), got shape {x.shape}")
    return x


def flat_ip_index(database: np.ndarray) -> faiss.Index:
    db = as_float32(database)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    return index


def exact_knn(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of each query among the database rows; ids are row
    numbers, -1 where the database has fewer than k rows."""
    q = as_float32(queries)
    index = flat_ip_index(database)
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} != database dimension {index.d}")
    return index.search(q, k)
