"""Leases in a shared folder: one writer at a time across processes and machines.

Replicas of the server share one `$VPR_HOME` (a local disk, NFSv4, CephFS, EFS:
any POSIX file system with atomic `rename` and `link`, which the versioned
stores need anyway). A lease says who runs a rebuild of an index, or an
activation, and until when; the others see it and answer with the running job
instead of starting a second one.

    <root>/<key>/<generation>.json   {"key", "generation", "owner", "expires", "data"}

Why files with an owner and an expiry rather than `flock` alone: a lease must
be visible (which job, which replica) and must not depend on lock semantics
the shared volume may not honour across machines. The mechanism:

- **Acquire**: read the newest generation `n`; if it is live (not expired, and
  its owner not known dead), the lease is held and its record is returned.
  Otherwise write a complete record to a temporary file and `link` it to
  `n + 1`: `link` fails when the name exists, so exactly one contender wins
  each generation, and a reader never sees a half-written record. Losers
  read the winner's record. Older generations are then deleted.
- **Renew**: the holder rewrites its own generation file (atomic rename) with
  a new expiry every `ttl / 3`; finding a newer generation means the lease was
  taken after it expired (a stalled holder): the holder is told (`lost`) and
  stops its work. The store's own per-name `flock` still serialises
  publication, so even a late holder never corrupts a version.
- **Release**: the holder deletes its generation file.
- **When the holder dies**: a holder on the same machine (same host name and
  boot id) is known dead at once when its process is gone (pid and start time
  from /proc); one on another machine only when its lease expires, at most
  `ttl` seconds after its last renewal. Expiry compares wall clocks, so
  replicas' clocks must agree to well within `ttl` (NTP). Host names must be
  unique per replica (containers and pods have their own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vpr.model.fileio import atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class LeaseBusy(RuntimeError):
    """The lease stayed held by another owner for as long as the caller would wait."""

    def __init__(self, holder: LeaseRecord) -> None:
        super().__init__(f"{holder.key} is held by {holder.owner.replica} until {time.ctime(holder.expires)}")
        self.holder = holder


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat):
    with the pid, it names one process even after its pid is reused."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()[19]


@dataclass(frozen=True)
class Owner:
    """One process of one replica."""

    replica: str
    host: str
    boot: str
    pid: int
    start: str
    instance: str

    @classmethod
    def this_process(cls, replica: str | None = None) -> Owner:
        host = socket.gethostname()
        pid = os.getpid()
        try:
            start = _start_time(pid)
        except OSError:
            start = ""
        return cls(replica or f"{host}-{pid}", host, _boot_id(), pid, start, uuid.uuid4().hex)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Owner:
        return cls(
            str(d.get("replica", "?")),
            str(d.get("host", "")),
            str(d.get("boot", "")),
            int(d.get("pid", 0)),
            str(d.get("start", "")),
            str(d.get("instance", "")),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def alive(self) -> bool | None:
        """True or False when this machine can tell (same host), None otherwise."""
        if self.host != socket.gethostname() or not self.boot or not _boot_id():
            return None
        if self.boot != _boot_id():
            return False  # the machine rebooted since
        try:
            return bool(self.start) and _start_time(self.pid) == self.start
        except (OSError, IndexError):
            return False


@dataclass
class LeaseRecord:
    key: str
    generation: int
    owner: Owner
    expires: float  # Unix time
    data: dict[str, Any] = field(default_factory=dict)

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now) and self.owner.alive() is not False

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "generation": self.generation,
            "owner": self.owner.as_dict(),
            "expires": self.expires,
            "data": self.data,
        }


@dataclass
class Lease:
    """A lease this process holds; `lost` is set when a renewal finds it taken."""

    record: LeaseRecord
    path: Path
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        return self.record.key


class Leases:
    """The leases under `root`, held by `owner`, each valid `ttl_s` after its
    last renewal. `start()` runs the renewing thread; `stop()` releases all."""

    def __init__(self, root: Path, owner: Owner, ttl_s: float = 15.0) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease needs a positive ttl")
        self.root = Path(root)
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ----------------------------------------------------------------------
    def _dir(self, key: str) -> Path:
        if not KEY_RE.match(key):
            raise ValueError(f"bad lease key {key!r}")
        return self.root / key

    @staticmethod
    def _generations(folder: Path) -> list[int]:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    @staticmethod
    def _read(path: Path) -> LeaseRecord | None:
        try:
            d = json.loads(path.read_text())
            return LeaseRecord(
                str(d["key"]),
                int(d["generation"]),
                Owner.from_dict(d["owner"]),
                float(d["expires"]),
                d.get("data") or {},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Records are linked in complete, so this is damage: treat it as held until
            # the file is old enough to have expired.
            log.warning("%s: unreadable lease (%s)", path, e)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                return None
            return LeaseRecord(path.parent.name, int(path.stem), Owner.from_dict({}), mtime + 3600.0)

    def holder(self, key: str) -> LeaseRecord | None:
        """The live record of `key`, or None when nobody holds it."""
        folder = self._dir(key)
        gens = self._generations(folder)
        if not gens:
            return None
        rec = self._read(folder / f"{gens[-1]}.json")
        return rec if rec is not None and rec.live() else None

    def mine(self, record: LeaseRecord | None) -> bool:
        return record is not None and record.owner.instance == self.owner.instance

    # ---- acquiring and releasing --------------------------------------------------------------
    def acquire(self, key: str, data: dict[str, Any] | None = None) -> Lease | LeaseRecord:
        """Take `key`: a `Lease` (ours now), or the live `LeaseRecord` of its holder
        (possibly this process, under another `data`)."""
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        gens = self._generations(folder)
        n = gens[-1] if gens else 0
        if n:
            rec = self._read(folder / f"{n}.json")
            if rec is not None and rec.live():
                return rec
        while True:
            n += 1
            record = LeaseRecord(key, n, self.owner, time.time() + self.ttl_s, dict(data or {}))
            path = folder / f"{n}.json"
            tmp = folder / f".tmp-{uuid.uuid4().hex}"
            atomic_write_json(tmp, record.as_dict())
            try:
                os.link(tmp, path)  # fails when another contender took generation n
            except FileExistsError:
                rec = self._read(path)
                if rec is not None and rec.live():
                    return rec
                continue  # that one is dead too: try the next generation
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(folder)
            for old in self._generations(folder):
                if old < n:
                    (folder / f"{old}.json").unlink(missing_ok=True)
            lease = Lease(record, path)
            with self._lock:
                self._held[key] = lease
            log.info("lease %s taken (generation %d) by %s", key, n, self.owner.replica)
            return lease

    @contextlib.contextmanager
    def hold(self, key: str, data: dict[str, Any] | None = None, wait_s: float = 0.0) -> Iterator[Lease]:
        """Hold `key` for a block, waiting up to `wait_s` for its holder to finish
        (LeaseBusy when it does not)."""
        deadline = time.monotonic() + wait_s
        while True:
            got = self.acquire(key, data)
            if isinstance(got, Lease):
                break
            if time.monotonic() >= deadline:
                raise LeaseBusy(got)
            time.sleep(0.05)  # a short critical section of another replica: poll it
        try:
            yield got
        finally:
            self.release(got)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get(lease.key) is lease:
                del self._held[lease.key]
        current = self._read(lease.path)
        if current is not None and current.owner.instance == self.owner.instance:
            lease.path.unlink(missing_ok=True)
            log.info("lease %s released by %s", lease.key, self.owner.replica)

    # ---- renewing -------------------------------------------------------------------------
    def renew(self, lease: Lease) -> bool:
        """Extend `lease`; False (and `lost` set) when another owner has taken it."""
        folder = lease.path.parent
        gens = self._generations(folder)
        current = self._read(lease.path)
        if (gens and gens[-1] > lease.record.generation) or current is None or not self.mine(current):
            lease.lost.set()
            with self._lock:
                self._held.pop(lease.key, None)
            log.error("lease %s was lost by %s (taken after it expired)", lease.key, self.owner.replica)
            return False
        lease.record.expires = time.time() + self.ttl_s
        atomic_write_json(lease.path, lease.record.as_dict())
        return True

    def renew_all(self) -> None:
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            try:
                self.renew(lease)
            except OSError as e:  # a volume hiccup: try again next round, before expiry
                log.warning("renewing lease %s failed: %s", lease.key, e)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vpr-leases", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.renew_all()

    def stop(self) -> None:
        """Stop renewing and release every lease still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            with contextlib.suppress(OSError):
                self.release(lease)


__all__ = ["KEY_RE", "Lease", "LeaseBusy", "LeaseRecord", "Leases", "Owner"]
