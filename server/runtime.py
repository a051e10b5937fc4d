"""What the server serves, and how it changes while serving.

`Runtime` owns the (query model, index) pair as one immutable `Serving`
snapshot. A request leases the snapshot current when it starts and uses it
to the end, so a hot swap (new model, rebuilt index) never disturbs requests
in flight: they finish on the old pair, new requests get the new one, and a
retired pair's resources are released once its last lease ends. This is the
one hot-swap mechanism of the project.

It also decides what to serve (settings, then the pair last chosen through
the admin API, then what the registry and store hold) and persists admin
choices. Everything else a server needs (metrics, the micro-batcher, thread
pools, streams, jobs) lives in its own object, wired by `create_app`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vpr.index.store import IndexMismatch, IndexStore, LoadedIndex, check_compatible
from vpr.model.engines import Engine, check_engine_name, select_engine
from vpr.model.extract import resolve_device
from vpr.model.fileio import atomic_write_json
from vpr.model.preprocess import target_size
from vpr.model.registry import LoadedModel, Registry, RegistryError, now_iso
from vpr.server.batcher import MicroBatcher
from vpr.server.errors import NotReady
from vpr.server.metrics import Metrics
from vpr.server.serving import Serving
from vpr.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"  # $VPR_HOME/serving.json: the last pair chosen through the admin API


@dataclass(frozen=True)
class Swap:
    """What one hot swap replaced and what it published, read in one step under
    the swap lock: overlapping swaps each report their own link of the chain."""

    previous: Serving | None
    current: Serving


@dataclass
class Status:
    state: str  # starting | loading | ready | not_ready
    reason: str | None = None
    since: float = 0.0


class Runtime:
    """The served pair and its changes. `batcher`: warm-ups run on its thread
    (when it runs); `metrics`: told what is served and of every swap."""

    def __init__(
        self, settings: ServerSettings, batcher: MicroBatcher | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.metrics = metrics or Metrics()  # a private registry when nobody reads them
        self.registry = Registry(settings.models_dir)
        self.store = IndexStore(settings.indexes_dir)
        self.device = resolve_device(settings.device)
        check_engine_name(settings.engine)  # an unknown VPR_ENGINE stops the server before it starts
        self.current: Serving | None = None
        self.status = Status("starting", "the server is starting", time.time())
        self.last_error: str | None = None
        self._lease_lock = threading.Lock()  # leases vs. swaps
        self._leases: dict[int, int] = {}  # id(index) -> requests using it
        self._retired: dict[int, LoadedIndex] = {}  # swapped out, still leased
        self._swap_lock = threading.RLock()  # one load or swap at a time

    # ---- leases -----------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self) -> Iterator[Serving]:
        """The current pair, held for the duration of a request: an index
        swapped out meanwhile stays open until its last lease ends."""
        with self._lease_lock:
            serving = self.current
            if serving is None:
                raise NotReady(self.status.reason or "not ready")
            key = id(serving.index)
            self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield serving
        finally:
            with self._lease_lock:
                left = self._leases[key] = self._leases[key] - 1
                done = self._retired.pop(key, None) if left == 0 else None
                if left == 0:
                    del self._leases[key]
            if done is not None:
                self._close_index(done)

    def _publish(self, new: Serving) -> None:
        with self._lease_lock:
            old, self.current = self.current, new
            self.status = Status("ready", None, time.time())
            self._retired.pop(id(new.index), None)  # served again
            done = None
            if old is not None and old.index is not new.index:
                if self._leases.get(id(old.index)):
                    self._retired[id(old.index)] = old.index  # closed by its last lease
                else:
                    done = old.index
        self.metrics.set_served(new.model_spec, new.index_spec, new.index.count)
        if done is not None:
            self._close_index(done)

    def _close_index(self, index: LoadedIndex) -> None:
        try:
            index.close()
            log.info("closed index %s (no longer served)", index.ref)
        except Exception:
            log.exception("closing index %s failed", index.ref)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- loading ----------------------------------------------------------------
    def load(self) -> bool:
        """Select, load and publish a model and an index. Never raises: on
        failure the server stays up and reports the reason on /readyz."""
        with self._swap_lock:
            if self.current is None:
                self.status = Status("loading", "loading the model and the index", time.time())
            try:
                model, index = self._load_pair(*self.select())
            except (NotReady, RegistryError, IndexMismatch, FileNotFoundError, ValueError, OSError) as e:
                reason = self.last_error = str(e)
                log.error("loading failed: %s", reason)
                if self.current is None:
                    self.status = Status("not_ready", reason, time.time())
                    self.metrics.set_served(None, None, None)
                return False
            except Exception as e:  # a bug, but the server must stay up to say so
                log.exception("loading failed")
                self.last_error = f"{type(e).__name__}: {e}"
                if self.current is None:
                    self.status = Status("not_ready", f"loading failed: {type(e).__name__}: {e}", time.time())
                return False
            self.last_error = None
            self._publish(Serving(model, index, self.device, *self.engine(model)))
            log.info(
                "serving model %s with index %s (%d vectors) on %s", model.ref, index.ref, index.count, self.device
            )
            return True

    def _load_pair(self, model_spec: str, index_spec: str) -> tuple[LoadedModel, LoadedIndex]:
        log.info("loading model %s and index %s on %s", model_spec, index_spec, self.device)
        model = self.registry.load(model_spec, self.device)
        index = self.store.load(index_spec)
        try:
            _check(index, model)
            self.warmup(model, index)
        except BaseException:
            index.close()
            raise
        return model, index

    def select(self) -> tuple[str, str]:
        """Which model and index to serve: settings first, then the pair last
        chosen through the admin API, then what the registry and store hold."""
        s = self.settings
        names = self.store.names()
        if not names:
            raise NotReady(
                f"no index in {s.indexes_dir}: build one (vpr index build ... or "
                "POST /v1/admin/index/rebuild), then reload"
            )
        if not self.registry.names():
            raise NotReady(f"no model in {s.models_dir}: register one (vpr model init ...), then reload")
        saved = self._saved_choice()
        index_spec = s.index or saved.get("index")
        model_spec = s.model or saved.get("model")
        model_manifest = self.registry.manifest(model_spec) if model_spec else None
        if index_spec is None:
            index_spec = self._pick_index(names, model_manifest)
        if model_spec is None:
            model_spec = self._pick_model(self.store.manifest(index_spec))
        return model_spec, index_spec

    def _pick_index(self, names: list[str], model_manifest: dict[str, Any] | None) -> str:
        candidates = [n for n in names if self.store.active(n) is not None] or names
        if model_manifest is not None:
            candidates = [n for n in candidates if _compatible(self.store.manifest(n), model_manifest)]
            if not candidates:
                raise NotReady(
                    f"no index is compatible with model {model_manifest['name']}@"
                    f"{model_manifest['version']}; indexes: {', '.join(names)}"
                )
        if len(candidates) > 1:
            raise NotReady(
                f"several indexes ({', '.join(candidates)}): choose one with VPR_INDEX or `vpr serve --index NAME`"
            )
        return candidates[0]

    def _pick_model(self, index_manifest: dict[str, Any]) -> str:
        """The active version of the newest compatible student, else of a
        compatible teacher (normally the one that built the index)."""
        students: list[tuple[tuple[str, str, int], str]] = []
        builders: list[tuple[tuple[str, str, int], str]] = []
        for name in self.registry.names():
            try:
                ref = self.registry.resolve(name)
                m = self.registry.manifest(ref)
            except RegistryError as e:
                log.warning("skipping model %s: %s", name, e)
                continue
            if not _compatible(index_manifest, m):
                continue
            key = (str(m.get("created", "")), ref.name, ref.version)
            (students if m.get("role") == "student" else builders).append((key, str(ref)))
        chosen = max(students or builders, default=None)
        if chosen is None:
            raise NotReady(
                f"no registered model can query index {index_manifest.get('name')} "
                f"(built by {index_manifest.get('model')}); set VPR_MODEL or register its model"
            )
        return chosen[1]

    def _saved_choice(self) -> dict[str, str]:
        """The names last chosen through the admin API, when they still exist."""
        path = self.settings.home / SERVING_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s: ignored (%s)", path, e)
            return {}
        out: dict[str, str] = {}
        for key, resolve in (("model", self.registry.resolve), ("index", self.store.resolve)):
            value = data.get(key) if isinstance(data, dict) else None
            if not isinstance(value, str):
                continue
            try:
                resolve(value)
                out[key] = value
            except ValueError as e:
                log.warning("%s: ignoring the saved %s (%s)", path, key, e)
        return out

    def _save_choice(self, serving: Serving) -> None:
        atomic_write_json(
            self.settings.home / SERVING_FILE,
            {"model": serving.model.ref.name, "index": serving.index.ref.name, "updated": now_iso()},
        )

    def engine(self, model: LoadedModel) -> tuple[Engine, str | None]:
        """The engine VPR_ENGINE names for `model` (prepared once per model), and
        why another one runs when it cannot run here (`model.engines.select_engine`)."""
        return select_engine(self.settings.engine, model, self.device)

    def warmup(self, model: LoadedModel, index: LoadedIndex) -> None:
        """One forward pass and one search at a typical size before serving, on
        the batcher's own thread (backends keep per-thread state, e.g. oneDNN
        primitive caches), so the first real query is not the slow one."""
        if not self.settings.warmup:
            return
        serving = Serving(model, index, self.device, *self.engine(model))
        cfg = serving.preprocess  # the size queries will have (the index's size rule)
        w, h = target_size(cfg.max_side, max(1, cfg.max_side * 3 // 4), cfg)
        x = torch.zeros(3, h, w)
        t = time.perf_counter()
        if self.batcher is not None and self.batcher.running:
            # Under load the queue may be full: wait for room (a hot swap must not fail because of traffic).
            timeout = max(60.0, self.settings.query_timeout_s)
            fut = self.batcher.submit(x, serving, 1, source="warmup", wait_s=timeout)
            fut.result(timeout=timeout)
        else:
            desc, _ = serving.engine.embed(x[None])
            if index.count:
                index.search(desc, 1)
        log.info("warm-up of %s at %dx%d took %.0f ms", model.ref, w, h, (time.perf_counter() - t) * 1000)

    # ---- hot swaps -----------------------------------------------------------------
    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Hold off every other load and swap of this process (re-entrant: `swap`
        and `load` may run inside). The follower of the shared home (server/follow.py)
        reads what to serve and swaps to it under it, so that it never publishes
        a pair older than one an admin swap published meanwhile."""
        with self._swap_lock:
            yield

    def swap(
        self,
        model_spec: str | None = None,
        index_spec: str | None = None,
        persist: bool = True,
        guard: contextlib.AbstractContextManager[Any] | None = None,
    ) -> Swap:
        """Serve another model and/or index; both are loaded before anything
        changes, checked against each other, then published atomically. Returns
        the pair replaced and the pair published (by this swap, not by another).
        `guard` is entered after the loads, around the check, the persisted
        choice and the publication (the shared home's activation lease).

        Raises RegistryError / FileNotFoundError (unknown), IndexMismatch (the
        pair is incompatible: nothing changes), NotReady (no counterpart)."""
        if model_spec is None and index_spec is None:
            raise ValueError("nothing to swap: give a model, an index or both")
        model = self.registry.load(model_spec, self.device) if model_spec else None
        index = self.store.load(index_spec) if index_spec else None
        with self._swap_lock, guard or contextlib.nullcontext():
            cur = self.current
            if model is None or index is None:
                if cur is None:
                    raise NotReady(
                        f"nothing is served yet ({self.status.reason}); give both a model and an index, or reload"
                    )
                model = model or cur.model
                index = index or cur.index
            _check(index, model)
            if model is not (cur.model if cur else None):
                self.warmup(model, index)
            if persist:
                if model_spec:
                    self.registry.activate(model.ref)
                if index_spec:
                    self.store.activate(str(index.ref))
            new = Serving(model, index, self.device, *self.engine(model))
            self._publish(new)
            if persist:
                self._save_choice(new)
            if cur is not None:
                for kind, a, b in (
                    ("model", cur.model_spec, new.model_spec),
                    ("index", cur.index_spec, new.index_spec),
                ):
                    if a != b:
                        self.metrics.swaps.labels(kind).inc()
                        log.info("hot swap: %s %s -> %s", kind, a, b)
            return Swap(cur, new)


def _compatible(index_manifest: dict[str, Any], model_manifest: dict[str, Any]) -> bool:
    try:
        check_compatible(index_manifest, model_manifest)
        return True
    except IndexMismatch:
        return False


def _check(index: LoadedIndex, model: LoadedModel) -> None:
    check_compatible(index.manifest, model.manifest)
