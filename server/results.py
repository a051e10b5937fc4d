"""JSON shapes of answers (also the OpenAPI schema at /docs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from vpr.server.errors import ApiError, http_status

POSITION_KEYS = ("utm_e", "utm_n", "utm_zone", "lat", "lon")


class Position(BaseModel):
    utm_e: float | None = None
    utm_n: float | None = None
    utm_zone: str | None = None
    lat: float | None = None
    lon: float | None = None


class Match(BaseModel):
    rank: int = Field(description="1 = best match")
    id: int = Field(description="database item id in the index")
    score: float = Field(description="cosine similarity of the descriptors (higher is closer)")
    path: str | None = Field(description="database image, relative to the index root")
    label: str | None = Field(description="place label")
    position: Position | None = Field(description="where the database image was taken, when known")
    extra: dict[str, Any] = Field(default_factory=dict)


class Timings(BaseModel):
    decode: float = Field(description="image decoding and preprocessing, ms")
    queue: float = Field(description="waiting for the model (micro-batching), ms")
    embed: float = Field(description="the forward pass of the batch this image was in, ms")
    search: float = Field(description="index search of that batch, ms")
    total: float = Field(description="from request start to answer, ms")


class TrackState(BaseModel):
    """Where the tracker of a stream or HTTP session places the walker after this frame."""

    id: int = Field(description="the tracked database place (an index id)")
    label: str | None = Field(description="its place label")
    path: str | None = Field(description="its database image, relative to the index root")
    position: Position | None = Field(description="where it is, when the index knows")
    confidence: float = Field(description="belief within the motion reach of that place, 0..1")
    localized: bool = Field(description="confidence at or above VPR_TRACK_LOCALIZED")
    frames: int = Field(description="frames this tracker has observed")
    mode: Literal["route", "positions", "order"] = Field(
        description="motion model: along a route of positioned places, metric positions with compass headings, "
        "or database order (track/tracker.py)"
    )
    update_ms: float = Field(description="the tracker's update for this frame, ms (not in timings_ms.total)")


TOP_K_DOC = "matches each answer holds at most: the top_k asked for, capped at the places in the index"


class QueryResponse(BaseModel):
    results: list[Match]
    model: str = Field(description="query model NAME@VERSION")
    index: str = Field(description="index NAME@VERSION")
    engine: str = Field(description="how the model's forward pass ran (VPR_ENGINE, e.g. eager-bf16-cl)")
    top_k: int = Field(description=TOP_K_DOC)
    timings_ms: Timings
    batch_size: int = Field(description="images in the forward pass this one shared")
    track: TrackState | None = Field(
        None, description="with an `X-VPR-Session` header (and not `track=false`): the session's tracked place"
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="stable machine-readable code")
    detail: Any = Field(description="what is wrong, for humans")


class ItemError(ErrorResponse):
    status: int = Field(description="the HTTP status this error has when it is a whole request's")


class BatchItem(BaseModel):
    file: str = Field(description="the form field, index and file name of this image")
    results: list[Match] = Field(description="empty when the item has an error")
    timings_ms: Timings | None = Field(None, description="absent when the item has an error")
    error: ItemError | None = Field(None, description="why this image got no results; the others are unaffected")


class BatchResponse(BaseModel):
    items: list[BatchItem] = Field(description="one per file, in the order sent")
    failed: int = Field(0, description="items with an error")
    model: str
    index: str
    engine: str = Field(description="how the model's forward pass ran")
    top_k: int = Field(description=TOP_K_DOC)
    timings_ms: dict[str, float]


class Readiness(BaseModel):
    ready: bool
    state: Literal["starting", "loading", "ready", "not_ready"]
    reason: str | None = None
    model: str | None = None
    index: str | None = None
    index_size: int | None = None
    device: str
    # The engine serving queries (`model.engines`): name, device, cache_kind, the
    # VPR_ENGINE setting and, when another engine runs instead, why (`note`).
    engine: dict[str, Any] | None = None
    replica: str | None = None  # this replica's name (VPR_REPLICA_NAME)
    # Following the shared home (server/follow.py): `wanted` is the pair it names,
    # `behind` true while another pair is served because loading that one failed.
    follow: dict[str, Any] | None = None


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def match_json(rank: int, hit: Any) -> dict[str, Any]:
    m = hit.meta
    pos = {k: _finite(m.get(k)) for k in POSITION_KEYS}
    return {
        "rank": rank,
        "id": int(hit.id),
        "score": round(float(hit.score), 6),
        "path": m.get("path"),
        "label": m.get("label"),
        "position": pos if any(v is not None for v in pos.values()) else None,
        "extra": m.get("extra") or {},
    }


def answer_json(hits: Sequence[Any], serving: Any) -> dict[str, Any]:
    return {
        "results": [match_json(r, h) for r, h in enumerate(hits, 1)],
        "model": serving.model_spec,
        "index": serving.index_spec,
        "engine": serving.engine.name,
    }


def error_json(error: ApiError) -> dict[str, Any]:
    """An `ApiError` as one batch item's `ItemError`."""
    return {"error": error.code, "detail": error.detail, "status": http_status(error)}


def rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 3) for k, v in timings.items()}
