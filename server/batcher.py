"""Dynamic micro-batching: concurrent queries share one forward pass.

Requests (HTTP images, stream frames) put prepared input tensors into a
bounded queue. One worker thread takes the first waiting item, gathers
whatever else arrives within `max_wait_ms` (up to `max_batch_size`), runs
one forward pass per (model, input shape) group and one index search per
(index, search params) group, then resolves each item's future. Under load
the model runs on full batches; when idle a lone query waits at most
`max_wait_ms`. A full queue refuses new work at once (`QueueFull`) so that
latency stays bounded: HTTP answers 503 with Retry-After, streams drop the
frame.

Each item carries the `Serving` snapshot it was admitted with, so a hot swap
never mixes models: items of the old and new model simply land in different
groups, and requests in flight finish on the model they started with.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from vpr.index.store import Hit
    from vpr.server.metrics import Metrics
    from vpr.server.serving import Serving

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The model queue is at capacity; try again shortly."""


class BatcherStopped(RuntimeError):
    """The server is shutting down."""


class ItemFailed(RuntimeError):
    """The forward pass failed on this item alone (its batch-mates were
    answered): the input, not the server, is at fault."""


@dataclass
class Answer:
    """One item's result: ranked hits and where its time went."""

    hits: list[Hit]
    queue_ms: float
    embed_ms: float
    search_ms: float
    batch_size: int
    descriptor: np.ndarray | None = None  # the query's descriptor (the tracker compares consecutive frames')


@dataclass(eq=False)
class _Item:
    tensor: torch.Tensor
    serving: Serving
    k: int
    params: dict[str, Any] | None
    enqueued: float = field(default_factory=time.perf_counter)
    future: cf.Future[Answer] = field(default_factory=cf.Future)


class MicroBatcher:
    def __init__(
        self, max_batch_size: int = 8, max_wait_ms: float = 2.0, queue_size: int = 64, metrics: Metrics | None = None
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.metrics = metrics
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="vpr-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail what is still queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherStopped("the server is shutting down"))

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- producers ----------------------------------------------------------
    def submit(
        self,
        tensor: torch.Tensor,
        serving: Serving,
        k: int,
        params: dict[str, Any] | None = None,
        source: str = "http",
        wait_s: float = 0.0,
    ) -> cf.Future[Answer]:
        """Queue one prepared input (3, H, W); the future yields an `Answer`.

        Raises QueueFull at once when the queue is at capacity, or after
        `wait_s` seconds of waiting for room (internal work such as the
        warm-up of a hot swap waits rather than fail under load)."""
        if self._stop.is_set() or not self.running:
            raise BatcherStopped("the model runtime is not running")
        item = _Item(tensor, serving, int(k), params)
        try:
            if wait_s > 0:
                self._queue.put(item, timeout=wait_s)
            else:
                self._queue.put_nowait(item)
        except queue.Full:
            if self.metrics:
                self.metrics.queue_rejected.labels(source).inc()
            raise QueueFull(f"the model queue is full ({self.queue_size} items waiting)") from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return item.future

    # ---- the worker -----------------------------------------------------------
    def _gather(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._gather()
            if self.metrics:
                self.metrics.queue_depth.set(self._queue.qsize())
            # Items whose waiter gave up (timeout, disconnect) are skipped.
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]
            if live:
                try:
                    self.run_batch(live)
                except BaseException as e:  # never let the worker die
                    log.exception("batch of %d failed", len(live))
                    _fail(live, e)

    def run_batch(self, items: list[_Item]) -> None:
        """Embed by (engine, shape) group (an engine belongs to one model), search by (index, params) group."""
        started = time.perf_counter()
        descs: dict[int, np.ndarray] = {}
        embed_ms: dict[int, float] = {}
        sizes: dict[int, int] = {}
        for group in _groups(items, lambda it: (id(it.serving.engine), tuple(it.tensor.shape))):
            serving = group[0].serving
            t = time.perf_counter()
            try:
                out, _ = serving.engine.embed(torch.stack([it.tensor for it in group]))
            except Exception as e:
                if len(group) == 1:
                    _fail_item(group[0], e)
                    continue
                # One bad item must not fail its batch-mates: retry each alone.
                log.warning("forward pass of %d items failed (%s); retrying them one by one", len(group), e)
                for it in group:
                    self.run_batch([it])
                continue
            ms = (time.perf_counter() - t) * 1000
            if self.metrics:
                self.metrics.batch_size.observe(len(group))
                self.metrics.stage.labels("embed").observe(ms / 1000)
            for it, d in zip(group, out):
                descs[id(it)], embed_ms[id(it)], sizes[id(it)] = d, ms, len(group)
        ready = [it for it in items if id(it) in descs]
        for group in _groups(ready, lambda it: (id(it.serving.index), _params_key(it.params))):
            self._search(group, descs, embed_ms, sizes, started)

    def _search(
        self,
        group: list[_Item],
        descs: dict[int, np.ndarray],
        embed_ms: dict[int, float],
        sizes: dict[int, int],
        started: float,
    ) -> None:
        index = group[0].serving.index
        k = max(it.k for it in group)
        t = time.perf_counter()
        try:
            hits = index.search(np.stack([descs[id(it)] for it in group]), k, group[0].params)
        except Exception as e:
            log.exception("search of %d queries failed", len(group))
            _fail(group, e)
            return
        ms = (time.perf_counter() - t) * 1000
        if self.metrics:
            self.metrics.stage.labels("search").observe(ms / 1000)
        for it, h in zip(group, hits):
            queue_ms = (started - it.enqueued) * 1000
            if self.metrics:
                self.metrics.stage.labels("queue").observe(queue_ms / 1000)
            answer = Answer(list(h)[: it.k], queue_ms, embed_ms[id(it)], ms, sizes[id(it)], descs[id(it)])
            it.future.set_result(answer)


def _fail_item(item: _Item, error: Exception) -> None:
    log.warning("forward pass failed on one %s input: %s: %s", tuple(item.tensor.shape), type(error).__name__, error)
    if not item.future.done():
        item.future.set_exception(
            ItemFailed(f"the model could not process this input ({type(error).__name__}: {error})")
        )


def _fail(items: list[_Item], error: BaseException) -> None:
    """Answer every still-waiting item with `error`, so no caller hangs."""
    for it in items:
        if not it.future.done():
            it.future.set_exception(error)


def _groups(items: list[_Item], key: Callable[[_Item], Hashable]) -> list[list[_Item]]:
    out: dict[Hashable, list[_Item]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.values())


def _params_key(params: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((params or {}).items()))
