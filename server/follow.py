"""Replicas: several `vpr serve` processes over one shared `$VPR_HOME`.

Each replica runs a `Follower`: every `follow_interval_s` it reads what the
shared home says to serve (the same selection as start-up: settings, then the
admin's saved choice in `serving.json`, then the active versions; except that an
admin choice made after this replica started ranks above its settings, so that
an activation through any replica applies to all) and, when
that differs from the served pair, hot-swaps to it through `Runtime.swap`
(the one hot swap: both loaded and checked against each other first, requests
in flight finish on the old pair). A change made on any replica, or by
`vpr model activate` / `vpr index activate`, is therefore served everywhere
within `follow_interval_s` plus the time to load the new pair. A pair that
cannot be loaded leaves the old one served; `/readyz` (`follow`) and the
metric `vpr_follow_behind` say so, and the follower tries again with a
back-off, or at once when the shared choice changes again.

Writers take leases (model/lease.py) in `$VPR_HOME/leases`: `activate` around
every admin activation (so that two replicas never interleave their pointer
writes into a torn pair, and followers skip their check meanwhile), and
`rebuild.<index>` for the life of a rebuild job (server/jobs.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpr.model.lease import LeaseBusy, Leases, Owner
from vpr.server.errors import Conflict
from vpr.server.metrics import Metrics
from vpr.server.runtime import SERVING_FILE, Runtime, Swap

log = logging.getLogger(__name__)

ACTIVATION_LEASE = "activate"
REPLICA_HEADER = "X-VPR-Replica"
MAX_BACKOFF_S = 60.0


def swap_under_lease(
    runtime: Runtime, leases: Leases | None, model: str | None, index: str | None, wait_s: float | None = None
) -> Swap:
    """An admin activation: `Runtime.swap` (persisted), holding the activation
    lease while it writes, so that one replica at a time writes the shared pointers.
    Waits for another replica's activation up to `wait_s` (default: the lease
    ttl), then answers 409 `busy`."""
    if leases is None:
        return runtime.swap(model, index)
    wait = leases.ttl_s if wait_s is None else wait_s
    guard = leases.hold(ACTIVATION_LEASE, {"model": model, "index": index}, wait_s=wait)
    try:
        return runtime.swap(model, index, guard=guard)  # the loads run before the lease is taken
    except LeaseBusy as e:
        raise Conflict(f"another activation is running: {e}; try again", code="busy") from None


@dataclass
class FollowState:
    """What /readyz reports about following the shared home."""

    enabled: bool
    interval_s: float
    wanted: dict[str, str] | None = None  # the pair the shared home says to serve
    behind: bool = False  # serving something else, because loading `wanted` failed
    error: str | None = None
    checked: float | None = None  # Unix time of the last completed check
    changed: float | None = None  # Unix time of the last swap the follower made

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "interval_s": self.interval_s,
            "wanted": self.wanted,
            "behind": self.behind,
            "error": self.error,
            "checked": self.checked,
            "changed": self.changed,
        }


class Follower:
    """Keeps this replica serving what the shared home says (see the module doc)."""

    def __init__(
        self, runtime: Runtime, interval_s: float, leases: Leases | None = None, metrics: Metrics | None = None
    ) -> None:
        self.runtime = runtime
        self.interval_s = float(interval_s)
        self.leases = leases
        self.metrics = metrics or runtime.metrics
        self.state = FollowState(enabled=self.interval_s > 0, interval_s=self.interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: tuple[tuple[str, str], float, float] | None = None  # (pair, when, back-off)
        # The admin's choice as this replica found it at start: its own settings
        # (VPR_MODEL, VPR_INDEX) rank above it; a choice made later ranks above them.
        self._choice_at_start = self._admin_choice().get("updated")

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vpr-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the follower must survive anything; the next round tries again
                log.exception("following the shared home failed")

    def _admin_choice(self) -> dict[str, Any]:
        """`serving.json`: the pair last chosen through the admin API (of any replica)."""
        try:
            data = json.loads((self.runtime.settings.home / SERVING_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def wanted(self) -> tuple[str, str]:
        """(model ref, index ref) the shared home says to serve, resolved to versions:
        what start-up would select, except that an admin choice made after this
        replica started applies to it too, above its own settings."""
        rt = self.runtime
        model_spec, index_spec = rt.select()
        choice = self._admin_choice()
        if choice.get("updated") != self._choice_at_start:
            model_spec = choice["model"] if isinstance(choice.get("model"), str) else model_spec
            index_spec = choice["index"] if isinstance(choice.get("index"), str) else index_spec
        return str(rt.registry.resolve(model_spec)), str(rt.store.resolve(index_spec))

    def check(self) -> bool:
        """One round: swap to what the shared home says when it differs from what
        is served. Returns whether a swap (or first load) happened."""
        rt = self.runtime
        if rt.status.state in ("starting", "loading"):
            return False  # the start-up load is running; it reads the same state
        if self.leases is not None and self.leases.holder(ACTIVATION_LEASE) is not None:
            return False  # an activation is writing the pointers: read them when it is done
        with rt.swapping():
            try:
                want = self.wanted()
            except Exception as e:
                self._record(None, behind=rt.current is not None, error=f"cannot read the shared home: {e}")
                return False
            cur = rt.current
            have = (cur.model_spec, cur.index_spec) if cur is not None else None
            if have == want:
                self._failed = None
                self._record(want, behind=False, error=None)
                return False
            if self._failed is not None and self._failed[0] == want and time.time() < self._failed[1] + self._failed[2]:
                return False  # this pair failed lately: wait for the back-off, or a new choice
            try:
                if cur is None:
                    if not rt.load():
                        raise RuntimeError(rt.last_error or "loading failed")
                else:
                    model = want[0] if want[0] != cur.model_spec else None
                    index = want[1] if want[1] != cur.index_spec else None
                    rt.swap(model, index, persist=False)
            except Exception as e:
                backoff = min(MAX_BACKOFF_S, 2 * self._failed[2]) if self._failed and self._failed[0] == want else 0.0
                self._failed = (want, time.time(), max(backoff, 5 * self.interval_s, 1.0))
                self.metrics.follow_failures.inc()
                reason = f"cannot serve {want[0]} with {want[1]} from the shared home: {type(e).__name__}: {e}"
                log.error("%s; still serving %s", reason, have)
                self._record(want, behind=True, error=reason)
                return False
            self._failed = None
            self.state.changed = time.time()
            log.info("following the shared home: now serving %s with %s (was %s)", want[0], want[1], have)
            self._record(want, behind=False, error=None)
            return True

    def _record(self, want: tuple[str, str] | None, behind: bool, error: str | None) -> None:
        if want is not None:
            self.state.wanted = {"model": want[0], "index": want[1]}
        self.state.behind, self.state.error, self.state.checked = behind, error, time.time()
        self.metrics.follow_behind.set(1 if behind else 0)


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP answer names the replica that made it
    (`X-VPR-Replica`), so that a client behind a load balancer, and the
    replica tests, can tell who answered."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REPLICA_HEADER] = self.name
            await send(message)

        await self.app(scope, receive, send_wrapper)


def owner_for(replica_name: str | None) -> Owner:
    """This process as a lease and job owner."""
    return Owner.this_process(replica_name)


__all__ = ["ACTIVATION_LEASE", "REPLICA_HEADER", "FollowState", "Follower", "ReplicaHeader", "swap_under_lease"]
