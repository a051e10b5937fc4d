"""The query service: the one way from an image to ranked places.

    lease the served pair -> media check (signature) -> decode (pixel cap) and
    preprocess on the decode pool -> the micro-batcher (one forward pass and
    one index search per group) -> metadata -> answer with timings

`POST /v1/query` and `POST /v1/query/batch` call `query` / `query_batch`;
each websocket frame goes through the same steps (`prepare` or
`decode_frame`, `search`, `answer`) around the stream's own video decoding
and frame dropping. Refusals are typed errors (server/errors.py) that each
transport maps to its own answer. The event loop never decodes or runs the
model: decoding goes to the pool, the forward pass and the search to the
batcher's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from vpr.model.preprocess import ImageDecodeError, ImageTooLarge, decode_image, to_input
from vpr.server.batcher import Answer, BatcherStopped, ItemFailed, MicroBatcher, QueueFull
from vpr.server.errors import (
    ApiError,
    BadImage,
    BadRequest,
    Overloaded,
    QueryTimeout,
    ShuttingDown,
    TooLarge,
    UnsupportedMedia,
)
from vpr.server.inputs import check_media
from vpr.server.metrics import Metrics
from vpr.server.results import answer_json, error_json, rounded
from vpr.server.runtime import Runtime
from vpr.server.serving import Serving
from vpr.server.sessions import Sessions, Track
from vpr.settings import ServerSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """One image as it arrived."""

    data: bytes
    declared: str | None  # the content type the client declared
    name: str  # how messages name it: "body", "files[0]:a.jpg", "frame 3"


@dataclass(frozen=True)
class Prepared:
    """A network input, and how long decoding and preprocessing took."""

    tensor: torch.Tensor
    decode_ms: float


class QueryService:
    def __init__(
        self,
        settings: ServerSettings,
        runtime: Runtime,
        batcher: MicroBatcher,
        pool: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self.settings, self.runtime, self.batcher, self.pool, self.metrics = settings, runtime, batcher, pool, metrics
        # The trackers of HTTP sessions, and the factory of each stream's (one home for both transports).
        self.sessions = Sessions(settings.track)

    # ---- whole HTTP queries ------------------------------------------------------------
    async def query(
        self, serving: Serving, upload: Upload, top_k: int, started: float, track: Track | None = None
    ) -> dict[str, Any]:
        """One image -> `QueryResponse`; `started` (perf_counter) dates the request;
        `track`: the session's tracker, which this image updates (its `track` field)."""
        prepared = await self.prepare(serving, upload)
        (answer,) = await self.search(serving, [prepared], self.search_k(top_k, track), source="http")
        body = self.answer(serving, prepared, answer, started, top_k=top_k, track=track)
        return {**body, "top_k": answered_top_k(serving, top_k), "batch_size": answer.batch_size}

    async def query_batch(
        self, serving: Serving, uploads: Sequence[Upload], top_k: int, started: float
    ) -> dict[str, Any]:
        """Several images -> `BatchResponse`, answered per item: a bad image (or one
        the model cannot process) is that item's `error`, the others get results.
        Refusals of the whole request (full queue, timeout) still fail it all."""
        outcomes: list[Prepared | ApiError] = list(
            await asyncio.gather(*(self._prepare_or_error(serving, u) for u in uploads))
        )
        good = [o for o in outcomes if isinstance(o, Prepared)]
        answers = iter(await self.search_each(serving, good, top_k, source="http"))
        total = _ms_since(started)
        items: list[dict[str, Any]] = []
        for upload, outcome in zip(uploads, outcomes):
            result = next(answers) if isinstance(outcome, Prepared) else outcome
            if isinstance(result, ApiError):
                items.append({"file": upload.name, "results": [], "timings_ms": None, "error": error_json(result)})
                continue
            assert isinstance(outcome, Prepared)
            timings = _timings(outcome, result, total)
            items.append(
                {"file": upload.name, "results": answer_json(result.hits, serving)["results"], "timings_ms": timings}
            )
        return {
            "items": items,
            "failed": sum(1 for it in items if "error" in it),
            "model": serving.model_spec,
            "index": serving.index_spec,
            "engine": serving.engine.name,
            "top_k": answered_top_k(serving, top_k),
            "timings_ms": rounded({"total": total}),
        }

    async def _prepare_or_error(self, serving: Serving, upload: Upload) -> Prepared | ApiError:
        try:
            return await self.prepare(serving, upload)
        except (BadRequest, TooLarge, UnsupportedMedia) as e:  # this item's own fault
            return e

    # ---- the steps ---------------------------------------------------------------------------
    def lease(self) -> AbstractContextManager[Serving]:
        """The served pair for one query (NotReady when there is none)."""
        return self.runtime.lease()

    async def prepare(self, serving: Serving, upload: Upload) -> Prepared:
        """Media check here, decoding and preprocessing on the pool."""
        fmt = check_media(upload.declared, upload.data, upload.name)
        return await self.offload(self.decode, serving, upload.data, upload.name, fmt)

    async def search(self, serving: Serving, items: Sequence[Prepared], top_k: int, source: str) -> list[Answer]:
        """Answers for all items, or the first item's error (see `search_each`)."""
        answers = await self.search_each(serving, items, top_k, source)
        for a in answers:
            if isinstance(a, ApiError):
                raise a
        return [a for a in answers if isinstance(a, Answer)]

    async def search_each(
        self, serving: Serving, items: Sequence[Prepared], top_k: int, source: str
    ) -> list[Answer | ApiError]:
        """Queue all items (all or none), then wait for their answers with a
        deadline. An item the model could not process gets its own `BadImage`;
        the others are answered."""
        s = self.settings
        futures: list[Future[Answer]] = []
        try:
            for item in items:
                futures.append(self.batcher.submit(item.tensor, serving, top_k, source=source))
        except QueueFull as e:
            for f in futures:
                f.cancel()
            raise Overloaded(f"{e}; retry in {s.retry_after_s} s") from None
        except BatcherStopped as e:
            raise ShuttingDown(str(e)) from None
        try:
            waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
            done = list(await asyncio.wait_for(waiting, s.query_timeout_s))
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise QueryTimeout(f"no answer from the model within {s.query_timeout_s:g} s") from None
        out: list[Answer | ApiError] = []
        for result in done:
            if isinstance(result, ItemFailed):
                out.append(BadImage(str(result), code="unprocessable_image"))
            elif isinstance(result, BatcherStopped):
                raise ShuttingDown(str(result)) from None
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        return out

    def search_k(self, top_k: int, track: Track | None) -> int:
        """Places to ask the index for: a tracker needs its own candidates, the reply only `top_k`."""
        return max(top_k, self.settings.track.candidates) if track is not None else top_k

    def answer(
        self,
        serving: Serving,
        prepared: Prepared,
        answer: Answer,
        started: float,
        top_k: int | None = None,
        track: Track | None = None,
        at: float | None = None,
    ) -> dict[str, Any]:
        """Matches with their metadata, the pair that answered, and where the time
        went; with a tracker, also `track` (updated with all the candidates
        searched, at frame number `at` when known, with its own time as `update_ms`)."""
        hits = answer.hits if top_k is None else answer.hits[:top_k]
        if track is None:
            return {**answer_json(hits, serving), "timings_ms": _timings(prepared, answer, _ms_since(started))}
        timings = _timings(prepared, answer, _ms_since(started))
        t = time.perf_counter()
        state = track.observe(serving, answer.hits, at, answer.descriptor)
        if state is not None:
            state["update_ms"] = round(_ms_since(t), 3)
        return {**answer_json(hits, serving), "track": state, "timings_ms": timings}

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (decoding) on the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- blocking parts (run on the pool) -------------------------------------------------------
    def decode(self, serving: Serving, data: bytes, source: str, fmt: str | None = None) -> Prepared:
        """Decode (pixel-capped; only as `fmt` when given: the format its
        signature announced) and preprocess one image for the served model."""
        t = time.perf_counter()
        try:
            img = decode_image(data, self.settings.max_pixels, source=source, formats=(fmt,) if fmt else None)
        except ImageTooLarge as e:
            raise TooLarge(str(e), code="image_too_large") from None
        except ImageDecodeError as e:
            raise BadImage(str(e)) from None
        return self._prepared(to_input(img, serving.preprocess), t)

    def decode_frame(self, serving: Serving, rgb: np.ndarray) -> Prepared:
        """A decoded video frame (H, W, 3 uint8) -> network input."""
        t = time.perf_counter()
        return self._prepared(to_input(Image.fromarray(rgb), serving.preprocess), t)

    def _prepared(self, x: torch.Tensor, start: float) -> Prepared:
        seconds = time.perf_counter() - start
        self.metrics.stage.labels("decode").observe(seconds)
        return Prepared(x, seconds * 1000)


def answered_top_k(serving: Serving, top_k: int) -> int:
    """The `top_k` a reply states: as asked, but never more than the index holds."""
    return min(top_k, serving.index.count)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _timings(prepared: Prepared, a: Answer, total_ms: float) -> dict[str, float]:
    steps = {"decode": prepared.decode_ms, "queue": a.queue_ms, "embed": a.embed_ms, "search": a.search_ms}
    return rounded({**steps, "total": total_ms})
