"""Which vector backend an index store writes to, and its tuning knobs.

`faiss` (default) keeps each version's vectors in a FAISS file beside its
metadata; `milvus` keeps them in a Milvus collection (Milvus Lite file or a
cluster URI) and the metadata, manifest and versions stay on disk as for
FAISS. Environment: VPR_INDEX_BACKEND, VPR_INDEX_MILVUS_URI, ...
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VPR_INDEX_", extra="forbid")

    backend: Literal["faiss", "milvus"] = "faiss"
    # Milvus: "http://host:19530" (cluster / standalone), "https://..." (Zilliz
    # Cloud), or a local file path ending in .db (Milvus Lite). Unset with the
    # milvus backend: Milvus Lite in <indexes_dir>/milvus.db.
    milvus_uri: str | None = None
    milvus_token: SecretStr | None = None  # "user:password" or an API key
    milvus_db: str | None = None  # database name on a cluster
    # Images described per resumable chunk file while building.
    chunk_size: int = Field(256, ge=1, le=1_000_000)
    # Vectors sampled to train IVF / PQ / PCA (FAISS subsamples further per k-means).
    max_train: int = Field(500_000, ge=1)
    # Memory-map IVF inverted lists on load instead of reading them (big indexes).
    mmap: bool = False

    @field_validator("milvus_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not (v.startswith(("http://", "https://", "tcp://", "unix:")) or v.endswith(".db")):
            raise ValueError(
                f"milvus_uri {v!r}: expected http(s)://host:port for a server "
                "or a local file path ending in .db for Milvus Lite"
            )
        return v
