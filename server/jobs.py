"""Background admin jobs (index rebuilds), persisted as $VPR_HOME/jobs/<id>.json.

A job file is rewritten atomically on every state change (and on progress,
at most twice a second), so `GET /v1/admin/jobs/{id}` and a human with `cat`
always read a whole, current document, also after a restart: jobs that were
queued or running when the server stopped are marked failed on the next
start, with the reason. Rebuilds run one at a time on their own thread, so
queries keep being served (more slowly, on the same cores) meanwhile.

A request is checked before it is queued, so that what cannot work is a 4xx
with the reason rather than a failed job: the index name, the model, the
factory spec (and whether there are images enough to train it), and the
images themselves, listed now, each of which must resolve (links followed) to
a file under a data root (`VPR_DATA_ROOTS`, by default `$VPR_HOME/data` and
`$VPR_HOME/demo`): an admin token is not a licence to index the host.

Replicas over one shared home (README "Scaling out"): a rebuild holds the
lease `rebuild.<index>` (model/lease.py) from the moment it is accepted until
it ends, renewed by this process; a rebuild of the same index asked of any
replica meanwhile answers 202 with the running job (`existing: true`)
instead of starting another. Job files carry their owner (replica, process)
and lease, so that every replica reads every job, and a job whose owner
stopped (its lease ended: at once when the owner died on this machine, after
`lease_ttl_s` otherwise) reads as failed, on any replica; `recover` leaves the
running jobs of live replicas alone.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vpr.data.datasets import list_images_recursive
from vpr.data.spec import DatasetSpec
from vpr.index.faiss_backend import min_train_vectors
from vpr.index.store import IndexMismatch, IndexRef, check_name
from vpr.model.fileio import atomic_write_json
from vpr.model.lease import Lease, LeaseRecord, Leases
from vpr.model.preprocess import list_images
from vpr.model.registry import RegistryError, now_iso
from vpr.server.errors import Conflict, NotReady
from vpr.server.follow import ACTIVATION_LEASE, swap_under_lease
from vpr.server.metrics import Metrics
from vpr.server.runtime import Runtime

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
FINAL = ("succeeded", "failed")
PROGRESS_EVERY_S = 0.5
HANDOVER_WAIT_S = 2.0  # a held rebuild lease whose job file is not (yet, or no longer) running


def rebuild_key(index_name: str) -> str:
    """The lease of rebuilds of one index."""
    return f"rebuild.{index_name}"


class JobCancelled(RuntimeError):
    """Raised inside a running job (through its progress callback) to stop it."""


class RebuildRequest(BaseModel):
    """Body of POST /v1/admin/index/rebuild: one source of database images."""

    model_config = ConfigDict(extra="forbid")

    folder: Path | None = Field(
        None, description="a folder of database images under a data root (file stems become labels)"
    )
    recursive: bool = Field(False, description="with `folder`: include sub-folders")
    dataset: DatasetSpec | None = Field(None, description="a dataset whose database side is indexed")
    name: str | None = Field(None, description="index name; default: the served index's name")
    model: str | None = Field(
        None,
        description="model describing the database (NAME or NAME@VERSION); "
        "default: the model that built the served index",
    )
    factory: str = Field("Flat", description="FAISS index_factory spec, e.g. Flat, HNSW32, IVF1024,PQ64")
    batch_size: int = Field(8, ge=1, le=512)
    skip_bad: bool = Field(False, description="leave out undecodable images instead of failing")
    activate: bool = Field(True, description="serve the new version when it is built")

    @model_validator(mode="after")
    def _one_source(self) -> RebuildRequest:
        if (self.folder is None) == (self.dataset is None):
            raise ValueError("give exactly one of `folder` or `dataset`")
        return self


@dataclass
class Plan:
    """A rebuild as checked at request time; `items` is None only for a synthetic
    route the job writes first."""

    name: str
    model: str
    source: Path
    items: list[Any] | None = None
    root: Path | None = None

    def summary(self) -> dict[str, Any]:
        images = None if self.items is None else len(self.items)
        return {"name": self.name, "model": self.model, "source": str(self.source), "images": images}


class JobManager:
    """Jobs of this process, and every job in `jobs_dir`. `leases`: the shared
    home's leases (None: a lone server, no rebuild leases)."""

    def __init__(
        self,
        jobs_dir: Path,
        runtime: Runtime,
        metrics: Metrics | None = None,
        keep: int = 200,
        leases: Leases | None = None,
    ) -> None:
        self.dir = Path(jobs_dir)
        self.runtime = runtime
        self.metrics = metrics or Metrics()
        self.keep = keep
        self.leases = leases
        self._held: dict[str, Lease] = {}  # job id -> its rebuild lease
        self._jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # guards the in-memory jobs
        self._persist = threading.Lock()  # one job-file write at a time, in update order
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vpr-job")
        self._futures: list[Future] = []
        self._stopping = threading.Event()

    # ---- lifecycle ---------------------------------------------------------------
    def recover(self) -> int:
        """Mark jobs a stopped process left unfinished as failed (not those of
        live replicas: they still hold their lease)."""
        n = 0
        for path in sorted(self.dir.glob("*.json")):
            job = self._read(path)
            if job and job.get("state") not in FINAL and not self._owner_alive(job):
                job.update(
                    state="failed", finished=now_iso(), error="interrupted: the server stopped before the job finished"
                )
                atomic_write_json(path, job)
                n += 1
        if n:
            log.warning("marked %d interrupted job(s) as failed", n)
        return n

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel queued jobs and stop the running one at its next progress
        step (descriptors already computed are kept: a rebuild of the same
        images resumes from them)."""
        self._stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            queued = [j for j in self._jobs.values() if j["state"] == "queued"]
        for job in queued:
            self._update(job, state="failed", finished=now_iso(), error="cancelled: the server is shutting down")
        wait([f for f in self._futures if not f.done()], timeout=timeout)

    # ---- reading ------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        """A job of any replica sharing the home (this process's from memory)."""
        if not JOB_ID_RE.match(job_id):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                return json.loads(json.dumps(job))
        job = self._read(self.dir / f"{job_id}.json")
        if job is not None and self.leases is not None and job.get("state") not in FINAL and not self._owner_alive(job):
            job.update(
                state="failed",
                finished=now_iso(),
                error=f"interrupted: replica {job.get('replica', '?')} stopped before the job finished "
                "(its lease ended)",
            )
            self._write(job)  # what every replica will read from now on
        return job

    def _owner_alive(self, job: dict[str, Any]) -> bool:
        """Whether the (unfinished) job's owner still holds its lease; jobs from
        before leases (no `lease` field) have no live owner once read from disk."""
        key = job.get("lease")
        if self.leases is None or not isinstance(key, str):
            return False
        try:
            holder = self.leases.holder(key)
        except (OSError, ValueError):
            return False
        return holder is not None and holder.data.get("job") == job.get("id")

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs of every replica sharing the home."""
        files = sorted(self._files(), key=lambda pm: pm[1], reverse=True)[:limit]
        return [j for j in (self.get(p.stem) for p, _ in files) if j]

    def _files(self) -> list[tuple[Path, float]]:
        """Job files with their mtime (another replica may prune one meanwhile)."""
        out: list[tuple[Path, float]] = []
        for p in self.dir.glob("*.json"):
            try:
                out.append((p, p.stat().st_mtime))
            except FileNotFoundError:
                continue
        return out

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable job file (%s)", path, e)
            return None

    # ---- submitting -------------------------------------------------------------------
    def submit_rebuild(self, req: RebuildRequest) -> dict[str, Any]:
        """Validate what can be checked now (a 422 beats a failed job), take the
        index's rebuild lease, then queue. When another job (of any replica)
        holds that lease, that job is returned, marked `existing`."""
        plan = self._plan(req)
        job_id = uuid.uuid4().hex
        lease: Lease | None = None
        if self.leases is not None:
            got = self._take(rebuild_key(plan.name), job_id)
            if not isinstance(got, Lease):
                return {**got, "existing": True}
            lease = got
        owner = self.leases.owner if self.leases is not None else None
        job = {
            "id": job_id,
            "kind": "index.rebuild",
            "replica": owner.replica if owner is not None else None,
            "owner": owner.as_dict() if owner is not None else None,
            "lease": lease.key if lease is not None else None,
            "state": "queued",
            "created": now_iso(),
            "started": None,
            "finished": None,
            "progress": {"stage": "queued", "done": 0, "total": None},
            "request": json.loads(req.model_dump_json()),
            "plan": plan.summary(),
            "result": None,
            "error": None,
        }
        self._write(job)  # on disk before anyone can see it
        with self._lock:
            self._jobs[job["id"]] = job
            if lease is not None:
                self._held[job_id] = lease
        self._prune()
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(self._run, job, req, plan))
        log.info("job %s: rebuild of index %s with %s queued", job["id"], plan.name, plan.model)
        return json.loads(json.dumps(job))

    def _take(self, key: str, job_id: str) -> Lease | dict[str, Any]:
        """The lease `key` for job `job_id`, or the unfinished job that holds it."""
        assert self.leases is not None
        deadline = time.monotonic() + HANDOVER_WAIT_S
        while True:
            got = self.leases.acquire(key, {"job": job_id})
            if isinstance(got, Lease):
                return got
            running = self._holding_job(got)
            if running is not None:
                return running
            # Held, but its job file is not written yet or already final (the
            # holder is between two steps): look again shortly.
            if time.monotonic() >= deadline:
                raise Conflict(f"index rebuild lease {key} is held by {got.owner.replica}; try again", code="busy")
            time.sleep(0.05)

    def _holding_job(self, record: LeaseRecord) -> dict[str, Any] | None:
        held = record.data.get("job")
        job = self.get(held) if isinstance(held, str) else None
        return job if job is not None and job.get("state") not in FINAL else None

    def _plan(self, req: RebuildRequest) -> Plan:
        """Everything a request names, checked now: the index name, the model, the
        factory spec, the source under the data roots and the images it holds."""
        rt = self.runtime
        cur = rt.current
        name = req.name or (cur.index.ref.name if cur else None)
        model = req.model or (cur.index.manifest["model"] if cur else None)
        if name is None or model is None:
            raise ValueError("nothing is served yet: give the index `name` and the `model` that describes it")
        check_name(name)
        dim = rt.registry.manifest(rt.registry.resolve(model)).get("descriptor_dim")  # RegistryError: unknown
        if isinstance(dim, int):
            rt.store.validate_factory(req.factory, dim)  # FactoryError (a ValueError): a bad spec
        source = req.folder if req.folder is not None else req.dataset.path  # type: ignore[union-attr]
        source = self._allowed(Path(source))
        if req.folder is not None and not source.is_dir():
            raise FileNotFoundError(f"{source}: not a folder")
        if req.dataset is not None and not source.exists() and req.dataset.kind != "synthetic":
            raise FileNotFoundError(f"{source}: no such file or folder")
        plan = Plan(name, model, source)
        if req.dataset is None or req.dataset.kind != "synthetic":  # a synthetic route may first be written
            plan.items, plan.root = self._items(req, source)
            self._check_images(plan.items, req.factory)
        return plan

    def _allowed(self, path: Path) -> Path:
        """`path` resolved, if it lies under a data root; PermissionError (403) otherwise."""
        path = path.expanduser().resolve()
        roots = self.runtime.settings.resolved_data_roots()
        if not any(path.is_relative_to(r) for r in roots):
            raise PermissionError(
                f"{path}: outside the data roots this server may read ({', '.join(map(str, roots))}); "
                "set VPR_DATA_ROOTS to allow more"
            )
        return path

    def _check_images(self, items: list[Any], factory: str) -> None:
        """Every image under a data root (a link or a dataset option could point
        elsewhere), and enough of them to train `factory`."""
        for item in items:
            path = Path(getattr(item, "path", item))
            try:
                self._allowed(path)
            except PermissionError as e:
                raise PermissionError(f"image {path} resolves to {e}") from None
        need = min_train_vectors(factory)
        if len(items) < need:
            raise ValueError(f"factory {factory!r} needs at least {need} images to train; the source has {len(items)}")

    # ---- running -------------------------------------------------------------------------
    def _run(self, job: dict, req: RebuildRequest, plan: Plan) -> None:
        try:
            self._run_job(job, req, plan)
        finally:
            with self._lock:
                lease = self._held.pop(job["id"], None)
            if lease is not None and self.leases is not None:
                self.leases.release(lease)  # after the final state is on disk

    def _run_job(self, job: dict, req: RebuildRequest, plan: Plan) -> None:
        t0 = time.perf_counter()
        self._update(job, state="running", started=now_iso())
        try:
            result = self._rebuild(job, req, plan)
        except Exception as e:  # the job fails, the server does not
            if not isinstance(
                e, (ValueError, FileNotFoundError, PermissionError, RegistryError, NotReady, JobCancelled)
            ):
                log.exception("job %s failed", job["id"])
            else:
                log.error("job %s failed: %s", job["id"], e)
            self._update(
                job,
                state="failed",
                finished=now_iso(),
                error=f"{type(e).__name__}: {e}",
                seconds=round(time.perf_counter() - t0, 3),
            )
            self.metrics.jobs.labels(job["kind"], "failed").inc()
            return
        self._update(
            job,
            state="succeeded",
            finished=now_iso(),
            result=result,
            seconds=round(time.perf_counter() - t0, 3),
            progress={**job["progress"], "stage": "done"},
        )
        self.metrics.jobs.labels(job["kind"], "succeeded").inc()
        log.info("job %s succeeded: %s", job["id"], result)

    def _rebuild(self, job: dict, req: RebuildRequest, plan: Plan) -> dict[str, Any]:
        rt = self.runtime
        self._stage(job, "loading model")
        cur = rt.current
        ref = rt.registry.resolve(plan.model)
        model = cur.model if cur is not None and cur.model.ref == ref else rt.registry.load(ref, rt.device)
        if plan.items is None or plan.root is None:
            self._stage(job, "opening the synthetic route")
            plan.items, plan.root = self._items(req, plan.source)
            self._check_images(plan.items, req.factory)
        items, root = plan.items, plan.root
        log.info("job %s: describing %d images under %s with %s", job["id"], len(items), root, ref)
        self._stage(job, "describing", total=len(items))
        last = [0.0]
        with self._lock:
            lease = self._held.get(job["id"])

        def progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise JobCancelled(
                    "interrupted: the server is shutting down (a new rebuild of the same "
                    "images resumes from the descriptors computed so far)"
                )
            if lease is not None and lease.lost.is_set():
                raise JobCancelled(
                    f"stopped: its lease {lease.key} expired and another replica took it (a stalled renewal)"
                )
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done >= total:
                last[0] = now
                self._update(job, progress={"stage": "describing", "done": int(done), "total": int(total)})

        new: IndexRef = rt.store.build(
            plan.name,
            model,
            items,
            root,
            factory=req.factory,
            batch_size=req.batch_size,
            progress=progress,
            activate=False,
            device=rt.device,
            skip_bad=req.skip_bad,
        )
        manifest = rt.store.manifest(new)
        result: dict[str, Any] = {
            "index": str(new),
            "count": manifest["count"],
            "model": manifest["model"],
            "activated": False,
        }
        cur = rt.current
        if req.activate:
            self._stage(job, "activating")
            if cur is not None:
                try:
                    # what this swap published; under the activation lease, as admin activations
                    cur = swap_under_lease(rt, self.leases, None, str(new)).current
                except IndexMismatch as e:
                    raise IndexMismatch(f"built {new} but did not activate it: {e}") from None
            elif self.leases is not None:
                with self.leases.hold(ACTIVATION_LEASE, {"index": str(new)}, wait_s=self.leases.ttl_s):
                    rt.store.activate(new)
                rt.load()
                cur = rt.current
            else:
                rt.store.activate(new)
                rt.load()
                cur = rt.current
            result["activated"] = True
        result["served"] = {"model": cur.model_spec, "index": cur.index_spec} if cur else None
        return result

    def _items(self, req: RebuildRequest, source: Path) -> tuple[list[Any], Path]:
        if req.folder is not None:
            if req.recursive:
                return list_images_recursive(source), source
            return list_images(source), source
        assert req.dataset is not None  # RebuildRequest holds exactly one source
        ds = req.dataset.model_copy(update={"path": source}).open()  # the path as _plan allowed it
        if not ds.database:
            raise ValueError(f"{source}: the dataset has no database images")
        return list(ds.database), Path(ds.root)

    # ---- persistence ----------------------------------------------------------------------
    def _stage(self, job: dict, stage: str, total: int | None = None) -> None:
        """A new stage; the image counts stay visible after describing."""
        progress = {**job["progress"], "stage": stage}
        if total is not None:
            progress.update(done=0, total=total)
        self._update(job, progress=progress)

    def _update(self, job: dict, **changes: Any) -> None:
        """Write the changed job to its file, then show it: whatever the API has
        reported is on disk, so a process killed right after a report leaves a
        file that says at least as much."""
        with self._persist:
            with self._lock:
                snapshot = json.loads(json.dumps({**job, **changes, "updated": now_iso()}))
            self._write(snapshot)
            with self._lock:
                job.update(changes)
                job["updated"] = snapshot["updated"]

    def _write(self, job: dict) -> None:
        try:
            atomic_write_json(self.dir / f"{job['id']}.json", job)
        except OSError as e:  # a full disk must not kill the job itself
            log.error("cannot write job %s: %s", job["id"], e)

    def _prune(self) -> None:
        """Keep the newest `keep` finished job files."""
        files = [p for p, _ in sorted(self._files(), key=lambda pm: pm[1], reverse=True)]
        for path in files[self.keep :]:
            job = self._read(path)
            if job is None or job.get("state") in FINAL:
                path.unlink(missing_ok=True)
                with self._lock:
                    self._jobs.pop(path.stem, None)
