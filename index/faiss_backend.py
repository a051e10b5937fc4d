"""FAISS indexes built from `index_factory` specs: validation, training, ids,
search-time parameters, copy-on-write edits.

Every index searches by inner product on L2-normalised vectors (cosine), the
metric the exact path (`index.knn`) uses, so `Flat` returns exactly what
`exact_knn` returns.

Ids: indexes that store ids themselves (IVF) get them through `add_with_ids`;
the others (Flat, HNSW, PQ, SQ) are wrapped in `IndexIDMap2`. FAISS's IDMap
wrapper assumes the wrapped index renumbers its vectors on removal like Flat
does; IVF does not, so wrapping IVF would silently return wrong ids after a
removal. HNSW cannot remove at all: removal rebuilds its graph from the
vectors it stores (no new training, no re-extraction).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vpr.index.knn import as_float32, flat_ip_index

log = logging.getLogger(__name__)

FACTORY_EXAMPLES = (
    "Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64, PCA256,L2norm,IVF1024,PQ32, OPQ64,IVF4096,PQ64, IVF1024,SQ8"
)
# Search-time parameters accepted by `search(..., params=...)`, per index kind.
IVF_PARAMS = ("nprobe", "max_codes")
HNSW_PARAMS = ("efSearch",)
ADD_BATCH = 65_536
DEFAULT_MAX_TRAIN = 500_000


class FactoryError(ValueError):
    """A factory spec FAISS cannot build, or cannot train on the data given."""


def l2_normalize(x: np.ndarray, source: str = "descriptors") -> np.ndarray:
    """Float32 copy with unit rows; refuses NaN/inf (a corrupt descriptor would
    otherwise silently poison every search). All-zero rows stay zero."""
    x = np.array(as_float32(x), dtype=np.float32, copy=True)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{source}: rows {bad[:5].tolist()} contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


# ---- factory specs ---------------------------------------------------------
def normalize_spec(spec: str) -> str:
    spec = (spec or "").strip().replace(" ", "")
    if not spec:
        raise FactoryError(f"empty factory spec; examples: {FACTORY_EXAMPLES}")
    if re.search(r"(^|,)IDMap2?(,|$)", spec):
        raise FactoryError(f"factory spec {spec!r}: leave out IDMap/IDMap2, ids are managed by the index store")
    return spec


def min_train_vectors(spec: str) -> int:
    """Fewest vectors FAISS needs to train `spec` (0 when nothing trains).

    IVF<n> needs n (one per centroid); PQ<m>[x<b>] and OPQ need 2^b (256);
    PCA<d> needs more than d."""
    need = 0
    for part in normalize_spec(spec).split(","):
        if m := re.match(r"^IVF(\d+)", part):
            need = max(need, int(m.group(1)))
        if m := re.match(r"^(?:IVF\d+_)?(?:O?PQ)(\d+)(?:x(\d+))?", part):
            need = max(need, 2 ** int(m.group(2) or 8))
        if m := re.match(r"^PCAW?R?(\d+)", part):
            need = max(need, int(m.group(1)) + 1)
    return need


def make_index(spec: str, dim: int) -> faiss.Index:
    """An empty index for `spec` over `dim`-d vectors, by inner product.

    `Flat` is exactly the `index.knn` path (IndexFlatIP)."""
    spec = normalize_spec(spec)
    if dim < 1:
        raise FactoryError(f"descriptor dimension must be positive, got {dim}")
    if spec == "Flat":
        return flat_ip_index(np.zeros((0, dim), np.float32))
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise FactoryError(
            f"bad factory spec {spec!r} for {dim}-d descriptors: {_faiss_msg(e)}; examples: {FACTORY_EXAMPLES}"
        ) from None


def _faiss_msg(e: Exception) -> str:
    """The useful last line of a FAISS C++ exception."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return re.sub(r"^Error in .*? at .*?:\d+: ", "", text)


# ---- walking an index -------------------------------------------------------
def unwrap(index: faiss.Index) -> tuple[faiss.Index | None, faiss.IndexPreTransform | None, faiss.Index]:
    """(id map or None, pre-transform or None, base index) of a stored index."""
    index = faiss.downcast_index(index)
    idmap = None
    if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        idmap, index = index, faiss.downcast_index(index.index)
    pre = None
    if isinstance(index, faiss.IndexPreTransform):
        pre, index = index, faiss.downcast_index(index.index)
    return idmap, pre, index


def is_ivf(base: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(base) is not None


def is_hnsw(base: faiss.Index) -> bool:
    return isinstance(base, faiss.IndexHNSW)


def param_names(index: faiss.Index) -> tuple[str, ...]:
    """The search-time parameters this index understands."""
    _, _, base = unwrap(index)
    if is_ivf(base):
        return IVF_PARAMS
    if is_hnsw(base):
        return HNSW_PARAMS
    return ()


def search_parameters(index: faiss.Index, params: dict | None) -> faiss.SearchParameters | None:
    """Per-call FAISS search parameters: nothing shared is modified, so
    concurrent searches with different settings never see each other's."""
    if not params:
        return None
    allowed = param_names(index)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        _, _, base = unwrap(index)
        kind = type(base).__name__
        raise ValueError(
            f"search parameters {unknown} do not apply to a {kind} index; it accepts {list(allowed) or 'none'}"
        )
    values = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        values[key] = int(value)
    _, pre, base = unwrap(index)
    if is_ivf(base):
        p: faiss.SearchParameters = faiss.SearchParametersIVF()
        p.nprobe = values.get("nprobe", faiss.try_extract_index_ivf(base).nprobe)
        p.max_codes = values.get("max_codes", 0)
    else:
        p = faiss.SearchParametersHNSW()
        p.efSearch = values["efSearch"]
    if pre is not None:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = p
        outer.referenced_objects = [p]  # keep the inner object alive
        return outer
    return p


# ---- building ---------------------------------------------------------------
@dataclass
class BuildStats:
    trained_on: int = 0
    train_seconds: float = 0.0
    add_seconds: float = 0.0


def train_index(
    index: faiss.Index, vectors: np.ndarray, spec: str, max_train: int = DEFAULT_MAX_TRAIN, seed: int = 0
) -> int:
    """Train on (a sample of) the normalised database vectors; returns how many."""
    if index.is_trained:
        return 0
    need = min_train_vectors(spec)
    if len(vectors) < max(need, 1):
        raise FactoryError(
            f"factory spec {spec!r} needs at least {need} vectors to train, "
            f"the database has {len(vectors)}; use a smaller spec (e.g. Flat or HNSW32) "
            f"or fewer IVF lists / PQ sub-quantizers"
        )
    sample = vectors
    if len(vectors) > max_train:
        pick = np.sort(np.random.default_rng(seed).choice(len(vectors), max_train, replace=False))
        sample = vectors[pick]
    try:
        index.train(sample)
    except RuntimeError as e:
        raise FactoryError(f"training {spec!r} on {len(sample)} vectors failed: {_faiss_msg(e)}") from None
    return len(sample)


def wrap_ids(index: faiss.Index) -> faiss.Index:
    """IDMap2 around indexes that cannot store ids themselves (see module doc)."""
    _, _, base = unwrap(index)
    return index if is_ivf(base) else faiss.IndexIDMap2(index)


def add_vectors(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
    batch: int | None = None,
) -> None:
    """Add in batches (about 20 progress reports per call, at most ADD_BATCH each)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    total = len(vectors)
    batch = batch or max(256, min(ADD_BATCH, -(-total // 20)))
    for start in range(0, total, batch):
        stop = min(total, start + batch)
        try:
            index.add_with_ids(vectors[start:stop], ids[start:stop])
        except RuntimeError as e:
            raise FactoryError(f"adding vectors failed: {_faiss_msg(e)}") from None
        if progress:
            progress(stop, total)


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    spec: str = "Flat",
    max_train: int = DEFAULT_MAX_TRAIN,
    progress: Callable[[int, int], None] | None = None,
    normalized: bool = False,
) -> faiss.Index:
    """Build a searchable index over `vectors` with external `ids`."""
    x = vectors if normalized else l2_normalize(vectors)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    index = make_index(spec, x.shape[1])
    n = train_index(index, x, spec, max_train)
    if n:
        log.info("trained %s on %d vectors", spec, n)
    index = wrap_ids(index)
    add_vectors(index, x, ids, progress)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """All external ids stored in an index (order unspecified)."""
    idmap, pre, base = unwrap(index)
    if idmap is not None:
        return faiss.vector_to_array(idmap.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(base)
    invlists = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            out.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove `ids` in place (call on a copy: versions are copy-on-write)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    idmap, pre, base = unwrap(index)
    if is_hnsw(base):
        return _rebuild_hnsw_without(idmap, pre, base, ids)
    try:
        return int(index.remove_ids(faiss.IDSelectorBatch(ids)))
    except RuntimeError as e:
        raise FactoryError(f"this index cannot remove vectors ({_faiss_msg(e)}); rebuild it instead") from None


def _rebuild_hnsw_without(idmap, pre, base, ids: np.ndarray) -> int:
    """HNSW has no removal: re-insert the kept vectors (in the space the graph
    stores them, after any PCA) into a reset graph."""
    if idmap is None:
        raise FactoryError("HNSW index without an id map cannot remove vectors")
    stored = faiss.vector_to_array(idmap.id_map).astype(np.int64)
    keep = ~np.isin(stored, ids)
    removed = int((~keep).sum())
    if not removed:
        return 0
    vectors = base.reconstruct_n(0, base.ntotal)[keep]
    log.info("HNSW cannot delete in place: rebuilding its graph over %d vectors", len(vectors))
    base.reset()
    if len(vectors):
        base.add(vectors)
    if pre is not None:
        pre.ntotal = base.ntotal
    faiss.copy_array_to_vector(stored[keep], idmap.id_map)
    idmap.ntotal = base.ntotal
    if isinstance(idmap, faiss.IndexIDMap2):
        idmap.construct_rev_map()
    return removed


# ---- files -------------------------------------------------------------------
def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path, mmap: bool = False) -> faiss.Index:
    """Read an index file; `mmap` maps IVF lists instead of reading them."""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable FAISS index ({_faiss_msg(e)})") from None


def describe(index: faiss.Index) -> str:
    idmap, pre, base = unwrap(index)
    parts = [type(idmap).__name__] if idmap is not None else []
    if pre is not None:
        parts.append("PreTransform")
    parts.append(type(base).__name__)
    return " > ".join(parts)
