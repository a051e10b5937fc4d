"""Milvus backend: a version's vectors in a Milvus collection (scale-out).

The store keeps versions, manifests and metadata on disk exactly as for
FAISS; only the vectors move. A build creates a fresh collection
(`vpr_<name>_<hash>_<token>`) and publishes the version only once the
collection is flushed, indexed and loaded. Versions stay copy-on-write
without copying hundreds of millions of vectors: `add` inserts into a new
partition that only the new version searches, `remove` records the removed
ids in the new version's manifest (a filter on its searches), so readers of
an older version see exactly what they saw before. Rebuild when the removed
list grows large (its size is logged).

Works with Milvus Lite (a local `.db` file, used by the tests), a standalone
server or a cluster (`http://host:19530`), or Zilliz Cloud (https + token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vpr.index import faiss_backend as fb
from vpr.index.backends import Progress

log = logging.getLogger(__name__)

VECTOR_FIELD = "vec"
ID_FIELD = "id"
MAX_INSERT_BYTES = 16 << 20  # keep gRPC messages well under Milvus's 64 MiB
MAX_LIMIT = 16_384  # Milvus's top-k limit
EXCLUDED_WARN = 10_000
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


class MilvusUnavailable(ValueError):
    """pymilvus missing or the Milvus server unreachable (a configuration error)."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MilvusUnavailable(
            "the milvus backend needs pymilvus (pip install 'pymilvus>=2.4' 'milvus-lite>=2.4')"
        ) from e
    return pymilvus


def close_clients() -> None:
    """Close every cached client (stops Milvus Lite servers this process started)."""
    with _clients_lock:
        for client in _clients.values():
            try:
                client.close()
            except Exception as e:  # closing is best effort
                log.debug("closing a Milvus client: %s", e)
        _clients.clear()


def milvus_index(spec: str) -> tuple[str, dict]:
    """Map a FAISS factory spec to a Milvus index type and build parameters."""
    spec = fb.normalize_spec(spec)
    patterns = [
        (r"^Flat$", lambda m: ("FLAT", {})),
        (r"^IVF(\d+),Flat$", lambda m: ("IVF_FLAT", {"nlist": int(m[1])})),
        (r"^IVF(\d+),SQ8$", lambda m: ("IVF_SQ8", {"nlist": int(m[1])})),
        (
            r"^IVF(\d+),PQ(\d+)(?:x(\d+))?$",
            lambda m: ("IVF_PQ", {"nlist": int(m[1]), "m": int(m[2]), "nbits": int(m[3] or 8)}),
        ),
        (r"^HNSW(\d+)(?:,Flat)?$", lambda m: ("HNSW", {"M": int(m[1]), "efConstruction": 200})),
    ]
    for pattern, make in patterns:
        if m := re.match(pattern, spec):
            return make(m)
    raise fb.FactoryError(
        f"factory spec {spec!r} has no Milvus equivalent; the milvus backend supports Flat, "
        "IVF<n>,Flat, IVF<n>,SQ8, IVF<n>,PQ<m>[x<bits>] and HNSW<M>. Milvus has no PCA: "
        "reduce the dimension in the model (pca_dim) instead"
    )


def collection_prefix(name: str) -> str:
    """Collection names allow [A-Za-z0-9_]; the hash keeps `a.b` and `a_b` apart."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]
    return f"vpr_{safe}_{hashlib.sha1(name.encode()).hexdigest()[:6]}_"


def _exclusion_filter(excluded: list[int]) -> str:
    return f"{ID_FIELD} not in [{','.join(str(int(i)) for i in excluded)}]" if excluded else ""


def is_lite(uri: str) -> bool:
    return uri.endswith(".db")


def _load_partition(client: Any, collection: str, partition: str, lite: bool) -> None:
    """Make a new partition searchable (Milvus Lite only loads whole collections)."""
    if lite:
        client.load_collection(collection)
    else:
        client.load_partitions(collection, [partition])


class MilvusSearcher:
    def __init__(
        self, client: Any, collection: str, partitions: list[str], excluded: list[int], index_type: str, dim: int
    ) -> None:
        self.client = client
        self.collection = collection
        self.partitions = partitions
        self.filter = _exclusion_filter(excluded)
        self.dim = dim
        self.param_names: tuple[str, ...] = {
            "IVF_FLAT": ("nprobe",),
            "IVF_SQ8": ("nprobe",),
            "IVF_PQ": ("nprobe",),
            "HNSW": ("efSearch",),
        }.get(index_type, ())
        client.load_collection(collection)
        res = client.query(
            collection, filter=self.filter or f"{ID_FIELD} >= 0", output_fields=["count(*)"], partition_names=partitions
        )
        self.ntotal = int(res[0]["count(*)"])

    def _params(self, params: dict | None) -> dict:
        params = params or {}
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise ValueError(
                f"search parameters {unknown} do not apply to this Milvus index; "
                f"it accepts {list(self.param_names) or 'none'}"
            )
        out = {}
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
            out["ef" if key == "efSearch" else key] = int(value)
        return out

    def search(self, queries: np.ndarray, k: int, params: dict | None) -> tuple[np.ndarray, np.ndarray]:
        if k > MAX_LIMIT:
            raise ValueError(f"k={k} exceeds Milvus's limit of {MAX_LIMIT}")
        sp = {"metric_type": "IP", "params": self._params(params)}
        res = self.client.search(
            self.collection,
            data=queries.tolist(),
            limit=k,
            anns_field=VECTOR_FIELD,
            search_params=sp,
            filter=self.filter,
            partition_names=self.partitions,
            output_fields=[ID_FIELD],
        )
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, hits in enumerate(res):
            for j, hit in enumerate(list(hits)[:k]):
                ids[row, j] = int(hit["id"])
                scores[row, j] = float(hit["distance"])
        return scores, ids

    def close(self) -> None:
        self.client = None


class MilvusBackend:
    kind = "milvus"

    def __init__(self, uri: str, token: str | None = None, db_name: str | None = None) -> None:
        self.uri = uri
        self.token = token
        self.db_name = db_name

    @classmethod
    def from_settings(cls, settings: Any, indexes_dir: Path) -> MilvusBackend:
        uri = settings.milvus_uri or str(Path(indexes_dir).resolve() / "milvus.db")
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        return cls(uri, token, settings.milvus_db)

    def client(self, uri: str | None = None) -> Any:
        """One client per server (Milvus Lite starts one local server per file)."""
        uri = uri or self.uri
        key = (uri, self.token, self.db_name)
        with _clients_lock:
            if key not in _clients:
                pm = _pymilvus()
                kwargs: dict = {"uri": uri}
                if self.token:
                    kwargs["token"] = self.token
                if self.db_name:
                    kwargs["db_name"] = self.db_name
                if is_lite(uri):
                    Path(uri).parent.mkdir(parents=True, exist_ok=True)
                    # Milvus Lite's in-process gRPC server logs a harmless traceback
                    # for an RPC it does not implement (AllocTimestamp) on connect.
                    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
                try:
                    _clients[key] = pm.MilvusClient(**kwargs)
                except Exception as e:
                    raise MilvusUnavailable(f"cannot connect to Milvus at {uri}: {e}") from e
            return _clients[key]

    def _insert(
        self,
        client: Any,
        collection: str,
        vectors: np.ndarray,
        ids: np.ndarray,
        partition: str | None,
        progress: Progress | None = None,
    ) -> None:
        rows_per = max(1, MAX_INSERT_BYTES // (vectors.shape[1] * 4 + 8))
        total = len(vectors)
        for start in range(0, total, rows_per):
            stop = min(total, start + rows_per)
            data = [{ID_FIELD: int(i), VECTOR_FIELD: v.tolist()} for i, v in zip(ids[start:stop], vectors[start:stop])]
            client.insert(collection, data, partition_name=partition) if partition else client.insert(collection, data)
            if progress:
                progress(stop, total)
        client.flush(collection)

    def build(
        self, folder: Path, name: str, vectors: np.ndarray, ids: np.ndarray, factory: str, progress: Progress | None
    ) -> dict:
        pm = _pymilvus()
        index_type, build_params = milvus_index(factory)
        min_train = fb.min_train_vectors(factory)
        if len(vectors) < min_train:
            raise fb.FactoryError(
                f"factory spec {factory!r} needs at least {min_train} vectors to train, the database has {len(vectors)}"
            )
        collection = collection_prefix(name) + secrets.token_hex(4)
        # Written before the collection exists: a killed build leaves enough
        # behind for the next writer to drop the orphan collection.
        (folder / "backend.json").write_text(
            json.dumps(
                {"backend": "milvus", "milvus_uri": self.uri, "milvus_collection": collection, "milvus_fresh": True}
            )
        )
        client = self.client()
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, pm.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, pm.DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
        client.create_collection(collection, schema=schema, consistency_level="Strong")
        self._insert(client, collection, vectors, ids, None, progress)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name=VECTOR_FIELD, index_type=index_type, metric_type="IP", params=build_params)
        client.create_index(collection, index_params)
        client.load_collection(collection)
        log.info(
            "milvus collection %s at %s: %d vectors, %s %s",
            collection,
            self.uri,
            len(vectors),
            index_type,
            build_params,
        )
        return {
            "backend": "milvus",
            "milvus_uri": self.uri,
            "milvus_collection": collection,
            "milvus_partitions": ["_default"],
            "milvus_excluded": [],
            "milvus_index": index_type,
            "milvus_index_params": build_params,
            "search_params": list(
                {"IVF_FLAT": ("nprobe",), "IVF_SQ8": ("nprobe",), "IVF_PQ": ("nprobe",), "HNSW": ("efSearch",)}.get(
                    index_type, ()
                )
            ),
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
        collection = old_manifest["milvus_collection"]
        client = self.client(self._uri_for(old_manifest))
        partitions = list(old_manifest.get("milvus_partitions", ["_default"]))
        excluded = sorted(set(old_manifest.get("milvus_excluded", [])) | {int(i) for i in remove_ids})
        if len(add_ids):
            part = f"p_{secrets.token_hex(4)}"
            (folder / "backend.json").write_text(
                json.dumps(
                    {
                        "backend": "milvus",
                        "milvus_uri": self.uri,
                        "milvus_collection": collection,
                        "milvus_new_partition": part,
                    }
                )
            )
            client.create_partition(collection, part)
            self._insert(client, collection, add_vectors, add_ids, part)
            _load_partition(client, collection, part, is_lite(self._uri_for(old_manifest)))
            partitions.append(part)
        if len(excluded) > EXCLUDED_WARN:
            log.warning(
                "index %s: %d removed ids are filtered at search time; rebuild it to compact", name, len(excluded)
            )
        return {"milvus_partitions": partitions, "milvus_excluded": excluded}

    def _uri_for(self, manifest: dict) -> str:
        """The configured URI wins (a cluster may move); else the recorded one."""
        return self.uri if self.uri else manifest["milvus_uri"]

    def open(self, folder: Path, manifest: dict) -> MilvusSearcher:
        client = self.client(self._uri_for(manifest))
        collection = manifest["milvus_collection"]
        if not client.has_collection(collection):
            raise FileNotFoundError(
                f"Milvus collection {collection} of index {manifest['name']}@"
                f"{manifest['version']} is missing at {self._uri_for(manifest)}"
            )
        return MilvusSearcher(
            client,
            collection,
            list(manifest.get("milvus_partitions", ["_default"])),
            list(manifest.get("milvus_excluded", [])),
            manifest.get("milvus_index", "FLAT"),
            int(manifest["dim"]),
        )

    def discard(self, fields: dict) -> None:
        client = self.client(fields.get("milvus_uri") or self.uri)
        collection = fields.get("milvus_collection")
        if not collection or not client.has_collection(collection):
            return
        if fields.get("milvus_new_partition"):
            part = fields["milvus_new_partition"]
            if client.has_partition(collection, part):
                if is_lite(fields.get("milvus_uri") or self.uri):  # no partition-level release
                    client.release_collection(collection)
                    client.drop_partition(collection, part)
                    client.load_collection(collection)
                else:
                    client.release_partitions(collection, [part])
                    client.drop_partition(collection, part)
                log.info("dropped unpublished partition %s of %s", part, collection)
        elif fields.get("milvus_fresh"):
            client.drop_collection(collection)
            log.info("dropped unpublished collection %s", collection)

    def cleanup(self, name: str, live: list[dict]) -> int:
        """Drop collections of `name` that no published version uses."""
        client = self.client()
        used = {m.get("milvus_collection") for m in live}
        n = 0
        for c in client.list_collections():
            if c.startswith(collection_prefix(name)) and c not in used:
                client.drop_collection(c)
                n += 1
        return n
