"""Clustered synthetic descriptors for tests and benchmarks.

Uniform noise in high dimensions has no structure: every point is nearly
equidistant from every other, so approximate indexes look either perfect or
useless and recall means nothing. Real place descriptors come in groups
(several images per place, similar places). These are drawn as places
around centres, images around places, and queries as noisy views of
database images, so that nearest neighbours are meaningful but not trivial.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def clustered_descriptors(
    n: int,
    dim: int,
    n_queries: int = 0,
    centres: int | None = None,
    place_size: int = 4,
    spread: float = 0.6,
    jitter: float = 0.35,
    query_noise: float = 0.5,
    seed: int = 0,
    chunk: int = 200_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database (n, dim), queries (n_queries, dim), query_sources (n_queries,)).

    Database rows: `centres` coarse clusters, places around them, `place_size`
    images per place. Each query is a noisier copy of database row
    `query_sources[i]`. All rows are L2-normalised float32. Memory: n*dim*4
    bytes plus one chunk of working space."""
    rng = np.random.default_rng(seed)
    chunk = max(place_size, chunk // place_size * place_size)  # no place spans two chunks
    centres = centres or max(8, int(np.sqrt(n) / 2))
    n_places = max(1, -(-n // place_size))
    centre_vecs = _unit(rng.standard_normal((centres, dim)).astype(np.float32))
    place_of = np.arange(n) // place_size
    # Place vectors are generated in chunks to bound memory at 1M x 4096.
    db = np.empty((n, dim), np.float32)
    place_centre = rng.integers(0, centres, n_places)
    step = spread / np.sqrt(dim)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        places = place_of[start:stop]
        # Deterministic per-place offsets: seed each place's noise by its index.
        uniq, inv = np.unique(places, return_inverse=True)
        prng = np.random.default_rng([seed, int(uniq[0])])
        offsets = prng.standard_normal((len(uniq), dim)).astype(np.float32) * step
        base = centre_vecs[place_centre[uniq]] + offsets
        img = base[inv] + rng.standard_normal((stop - start, dim)).astype(np.float32) * (jitter / np.sqrt(dim))
        db[start:stop] = _unit(img)
    sources = rng.integers(0, n, n_queries) if n_queries else np.zeros(0, np.int64)
    queries = db[sources] + rng.standard_normal((len(sources), dim)).astype(np.float32) * (query_noise / np.sqrt(dim))
    return db, _unit(queries.astype(np.float32)), sources.astype(np.int64)
