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
from vpr.server.batcher import Answer, BatcherStopped, MicroBatcher, QueueFull
from vpr.server.errors import BadImage, Overloaded, QueryTimeout, ShuttingDown, TooLarge
from vpr.server.inputs import check_media
from vpr.server.metrics import Metrics
from vpr.server.results import answer_json, rounded
from vpr.server.runtime import Runtime
from vpr.server.serving import Serving
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

    # ---- whole HTTP queries ------------------------------------------------------------
    async def query(self, serving: Serving, upload: Upload, top_k: int, started: float) -> dict[str, Any]:
        """One image -> `QueryResponse`; `started` (perf_counter) dates the request."""
        prepared = await self.prepare(serving, upload)
        (answer,) = await self.search(serving, [prepared], top_k, source="http")
        return {**self.answer(serving, prepared, answer, started), "top_k": top_k, "batch_size": answer.batch_size}

    async def query_batch(
        self, serving: Serving, uploads: Sequence[Upload], top_k: int, started: float
    ) -> dict[str, Any]:
        """Several images -> `BatchResponse`; all are queued together or none."""
        prepared = await asyncio.gather(*(self.prepare(serving, u) for u in uploads))
        answers = await self.search(serving, prepared, top_k, source="http")
        total = _ms_since(started)
        items = [
            {"file": u.name, "results": answer_json(a.hits, serving)["results"], "timings_ms": _timings(p, a, total)}
            for u, p, a in zip(uploads, prepared, answers)
        ]
        return {
            "items": items,
            "model": serving.model_spec,
            "index": serving.index_spec,
            "top_k": top_k,
            "timings_ms": rounded({"total": total}),
        }

    # ---- the steps ---------------------------------------------------------------------------
    def lease(self) -> AbstractContextManager[Serving]:
        """The served pair for one query (NotReady when there is none)."""
        return self.runtime.lease()

    async def prepare(self, serving: Serving, upload: Upload) -> Prepared:
        """Media check here, decoding and preprocessing on the pool."""
        check_media(upload.declared, upload.data, upload.name)
        return await self.offload(self.decode, serving, upload.data, upload.name)

    async def search(self, serving: Serving, items: Sequence[Prepared], top_k: int, source: str) -> list[Answer]:
        """Queue all items (all or none), then wait for their answers with a deadline."""
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
            waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            return list(await asyncio.wait_for(waiting, s.query_timeout_s))
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise QueryTimeout(f"no answer from the model within {s.query_timeout_s:g} s") from None
        except BatcherStopped as e:
            raise ShuttingDown(str(e)) from None

    def answer(self, serving: Serving, prepared: Prepared, answer: Answer, started: float) -> dict[str, Any]:
        """Matches with their metadata, the pair that answered, and where the time went."""
        return {**answer_json(answer.hits, serving), "timings_ms": _timings(prepared, answer, _ms_since(started))}

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (decoding) on the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- blocking parts (run on the pool) -------------------------------------------------------
    def decode(self, serving: Serving, data: bytes, source: str) -> Prepared:
        """Decode (pixel-capped) and preprocess one image for the served model."""
        t = time.perf_counter()
        try:
            img = decode_image(data, self.settings.max_pixels, source=source)
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


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _timings(prepared: Prepared, a: Answer, total_ms: float) -> dict[str, float]:
    steps = {"decode": prepared.decode_ms, "queue": a.queue_ms, "embed": a.embed_ms, "search": a.search_ms}
    return rounded({**steps, "total": total_ms})
