"""Admin routes under /v1/admin, behind a token.

The token comes from VPR_ADMIN_TOKEN or a token file (VPR_ADMIN_TOKEN_FILE);
with neither, `create_app` does not include this router at all (404), so a
deployment without a token exposes nothing. Clients send it as
`Authorization: Bearer <token>` or `X-API-Key: <token>`; both missing and
wrong tokens get the same 401. The comparison is constant-time over
fixed-length digests, so neither the content nor the length of the token
leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection

from vpr.index.store import IndexMismatch
from vpr.model import store
from vpr.model.lease import Leases
from vpr.model.registry import RegistryError
from vpr.server.deps import JobsDep, MetricsDep, RuntimeDep
from vpr.server.errors import (
    ApiError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    NotReady,
    Unauthorized,
)
from vpr.server.follow import swap_under_lease
from vpr.server.jobs import RebuildRequest
from vpr.server.results import ErrorResponse
from vpr.server.runtime import Runtime
from vpr.server.serving import Serving

log = logging.getLogger(__name__)


class ActivateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME (its active version) or NAME@VERSION")
    index: str | None = Field(None, description="optionally swap the index in the same step")


class ActivateIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = Field(description="NAME (its active version) or NAME@VERSION")
    model: str | None = Field(None, description="optionally swap the model in the same step")


# ---- the token ---------------------------------------------------------------------------------
def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class AdminToken:
    """The admin token, kept only as a digest."""

    def __init__(self, token: str) -> None:
        self._expected = _digest(token)

    def accepts(self, given: str | None) -> bool:
        # Compare digests even when nothing was sent: same work either way.
        return hmac.compare_digest(_digest(given or ""), self._expected) and given is not None


def presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def get_admin_token(conn: HTTPConnection) -> AdminToken:
    token = conn.app.state.admin_token
    assert isinstance(token, AdminToken)  # the router is included only with a token (create_app)
    return token


async def require_admin(
    request: Request, token: Annotated[AdminToken, Depends(get_admin_token)], metrics: MetricsDep
) -> None:
    given = presented_token(request)
    if not token.accepts(given):
        metrics.admin_auth_failures.inc()
        client = request.client.host if request.client else "?"
        log.warning(
            "admin request %s %s from %s refused: %s token",
            request.method,
            request.url.path,
            client,
            "wrong" if given else "no",
        )
        raise Unauthorized("admin routes need a valid token as 'Authorization: Bearer <token>' or 'X-API-Key: <token>'")


# ---- errors of the registry, the index store and the runtime ------------------------------------
def admin_error(e: Exception) -> ApiError:
    """The typed error a client can act on; re-raises what is none of ours (a bug: 500)."""
    text = str(e)
    if isinstance(e, NotReady):  # here a state conflict, not "retry later"
        return Conflict(text, code="not_ready")
    if isinstance(e, ApiError):
        return e
    if isinstance(e, IndexMismatch):
        return Conflict(text, code="incompatible")
    if isinstance(e, store.StoreError):  # models and indexes alike
        return _store_error(e)
    if isinstance(e, PermissionError):
        return Forbidden(text)
    if isinstance(e, (FileNotFoundError, ValueError)):
        return InvalidRequest(text)
    raise e


def _store_error(e: store.StoreError) -> ApiError:
    """Unknown (404), malformed (422) or unusable (409), as the stores type them."""
    if isinstance(e, store.NotFound):
        return NotFound(str(e))
    if isinstance(e, store.BadSpec):
        return InvalidRequest(str(e))
    return Conflict(str(e), code="unusable")


# ---- routes -------------------------------------------------------------------------------------------
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong token"},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS, dependencies=[Depends(require_admin)])


def served(runtime: Runtime) -> dict[str, Any]:
    return described(runtime.current)


def described(pair: Serving | None) -> dict[str, Any]:
    return {
        "model": pair.model_spec if pair else None,
        "index": pair.index_spec if pair else None,
        "index_size": pair.index.count if pair else None,
    }


async def swap(runtime: Runtime, model: str | None, index: str | None, leases: Leases | None = None) -> dict[str, Any]:
    """Hot-swap off the event loop (loading weights takes seconds), holding the
    shared home's activation lease (replicas follow the change, server/follow.py).
    The reply's `previous` and `served` are the pairs this swap replaced and
    published, as the runtime recorded them in one step (another activation may
    follow at once)."""
    try:
        done = await run_in_threadpool(swap_under_lease, runtime, leases, model, index)
    except Exception as e:
        raise admin_error(e) from None
    return {"previous": described(done.previous), "served": described(done.current)}


@router.get("/models", summary="Registered models and which one is served")
def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    reg, cur = runtime.registry, runtime.current
    out: list[dict[str, Any]] = []
    for name in reg.names():
        active = reg.active(name)
        for v in reg.versions(name):
            try:
                m = reg.manifest(f"{name}@{v}")
            except RegistryError as e:
                out.append({"ref": f"{name}@{v}", "error": str(e)})
                continue
            compatible = None
            if cur is not None:
                try:
                    cur.index.check_model(m)
                    compatible = True
                except IndexMismatch:
                    compatible = False
            out.append(
                {
                    "ref": f"{name}@{v}",
                    "role": m.get("role"),
                    "parent": m.get("parent"),
                    "descriptor_dim": m.get("descriptor_dim"),
                    "created": m.get("created"),
                    "active": bool(active and active.version == v),
                    "served": bool(cur and cur.model_spec == f"{name}@{v}"),
                    "compatible_with_served_index": compatible,
                    "metrics": m.get("metrics") or {},
                }
            )
    return {"models": out, "served": served(runtime)}


@router.post("/models/activate", summary="Hot-swap the query model (optionally with the index)")
async def activate_model(body: ActivateModel, runtime: RuntimeDep, request: Request) -> dict[str, Any]:
    return await swap(runtime, body.model, body.index, getattr(request.app.state, "leases", None))


@router.get("/indexes", summary="Index versions and which one is served")
def list_indexes(runtime: RuntimeDep) -> dict[str, Any]:
    store = runtime.store
    return {"indexes": {name: store.info(name) for name in store.names()}, "served": served(runtime)}


@router.post("/index/activate", summary="Hot-swap the index to an existing version (e.g. roll back)")
async def activate_index(body: ActivateIndex, runtime: RuntimeDep, request: Request) -> dict[str, Any]:
    return await swap(runtime, body.model, body.index, getattr(request.app.state, "leases", None))


@router.post(
    "/index/rebuild",
    status_code=202,
    summary="Rebuild the index in the background (or get the rebuild of that index already running on any replica)",
)
def rebuild(body: RebuildRequest, request: Request, response: Response, jobs: JobsDep) -> dict[str, Any]:
    try:
        job = jobs.submit_rebuild(body)
    except Exception as e:
        raise admin_error(e) from None
    url = str(request.url_for("get_job", job_id=job["id"]).path)
    response.headers["Location"] = url
    # `existing`: a rebuild of this index was already running (on any replica): this is that job.
    return {
        "job": job["id"],
        "state": job["state"],
        "status_url": url,
        "existing": bool(job.get("existing")),
        "replica": job.get("replica"),
    }


@router.get("/jobs", summary="Recent jobs, newest first")
def list_jobs(jobs: JobsDep, limit: int = 50) -> dict[str, Any]:
    return {"jobs": jobs.recent(max(1, min(limit, 500)))}


@router.get("/jobs/{job_id}", name="get_job", summary="State, progress, result or error of a job")
def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    job = jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


@router.post("/reload", summary="Select and load model and index again (after CLI changes)")
async def reload(runtime: RuntimeDep) -> dict[str, Any]:
    if not await run_in_threadpool(runtime.load):
        raise Conflict(f"reload failed: {runtime.last_error}; still serving {served(runtime)}", code="not_ready")
    return {"reloaded": True, "served": served(runtime)}
