"""Admin routes under /v1/admin, behind a token.

The token comes from VPR_ADMIN_TOKEN or a token file (VPR_ADMIN_TOKEN_FILE);
with neither, the routes are not mounted at all (404), so a deployment
without a token exposes nothing. Clients send it as `Authorization: Bearer
<token>` or `X-API-Key: <token>`; both missing and wrong tokens get the same
401. The comparison is constant-time over fixed-length digests, so neither
the content nor the length of the token leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from vpr.index.store import IndexMismatch, IndexStoreError
from vpr.model.registry import RegistryError
from vpr.server.inputs import ApiError
from vpr.server.jobs import JobManager, RebuildRequest
from vpr.server.results import ErrorResponse
from vpr.server.runtime import NotReady, Runtime

log = logging.getLogger(__name__)


class ActivateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME (its active version) or NAME@VERSION")
    index: str | None = Field(None, description="optionally swap the index in the same step")


class ActivateIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = Field(description="NAME (its active version) or NAME@VERSION")
    model: str | None = Field(None, description="optionally swap the model in the same step")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def token_guard(token: str, runtime: Runtime):
    expected = _digest(token)

    async def require_admin(request: Request) -> None:
        given = presented_token(request)
        # Compare digests even when nothing was sent: same work either way.
        ok = hmac.compare_digest(_digest(given or ""), expected) and given is not None
        if not ok:
            runtime.metrics.admin_auth_failures.inc()
            client = request.client.host if request.client else "?"
            log.warning(
                "admin request %s %s from %s refused: %s token",
                request.method,
                request.url.path,
                client,
                "wrong" if given else "no",
            )
            raise ApiError(
                401,
                "unauthorized",
                "admin routes need a valid token as 'Authorization: Bearer <token>' or 'X-API-Key: <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="vpr-admin"'},
            )

    return require_admin


def lookup_error(e: Exception) -> ApiError:
    """Registry / store / runtime errors -> the HTTP answer a client can act on."""
    text = str(e)
    if isinstance(e, IndexMismatch):
        return ApiError(409, "incompatible", text)
    if isinstance(e, NotReady):
        return ApiError(409, "not_ready", text)
    if isinstance(e, (RegistryError, IndexStoreError)):
        if "not found" in text or "no model named" in text or "no index named" in text:
            return ApiError(404, "not_found", text)
        if text.startswith("bad "):
            return ApiError(422, "invalid_request", text)
        return ApiError(409, "unusable", text)
    if isinstance(e, PermissionError):
        return ApiError(403, "forbidden", text)
    if isinstance(e, FileNotFoundError):
        return ApiError(422, "invalid_request", text)
    if isinstance(e, ValueError):
        return ApiError(422, "invalid_request", text)
    raise e


def admin_router(runtime: Runtime, jobs: JobManager, token: str) -> APIRouter:
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "missing or wrong token"},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    }
    router = APIRouter(
        prefix="/v1/admin", tags=["admin"], responses=errors, dependencies=[Depends(token_guard(token, runtime))]
    )

    def served() -> dict[str, Any]:
        cur = runtime.current
        return {
            "model": cur.model_spec if cur else None,
            "index": cur.index_spec if cur else None,
            "index_size": cur.index.count if cur else None,
        }

    async def swap(model: str | None, index: str | None) -> dict[str, Any]:
        """Hot-swap off the event loop (loading weights takes seconds)."""
        before = served()
        try:
            await run_in_threadpool(runtime.swap, model, index)
        except Exception as e:
            raise lookup_error(e) from None
        return {"previous": before, "served": served()}

    @router.get("/models", summary="Registered models and which one is served")
    def list_models() -> dict[str, Any]:
        reg, cur = runtime.registry, runtime.current
        out = []
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
        return {"models": out, "served": served()}

    @router.post("/models/activate", summary="Hot-swap the query model (optionally with the index)")
    async def activate_model(body: ActivateModel) -> dict[str, Any]:
        return await swap(body.model, body.index)

    @router.get("/indexes", summary="Index versions and which one is served")
    def list_indexes() -> dict[str, Any]:
        return {"indexes": {name: runtime.store.info(name) for name in runtime.store.names()}, "served": served()}

    @router.post("/index/activate", summary="Hot-swap the index to an existing version (e.g. roll back)")
    async def activate_index(body: ActivateIndex) -> dict[str, Any]:
        return await swap(body.model, body.index)

    @router.post("/index/rebuild", status_code=202, summary="Rebuild the index in the background")
    def rebuild(body: RebuildRequest, request: Request, response: Response) -> dict[str, Any]:
        try:
            job = jobs.submit_rebuild(body)
        except Exception as e:
            raise lookup_error(e) from None
        url = str(request.url_for("get_job", job_id=job["id"]).path)
        response.headers["Location"] = url
        return {"job": job["id"], "state": job["state"], "status_url": url}

    @router.get("/jobs", summary="Recent jobs, newest first")
    def list_jobs(limit: int = 50) -> dict[str, Any]:
        return {"jobs": jobs.list(max(1, min(limit, 500)))}

    @router.get("/jobs/{job_id}", name="get_job", summary="State, progress, result or error of a job")
    def get_job(job_id: str) -> dict[str, Any]:
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return job

    @router.post("/reload", summary="Select and load model and index again (after CLI changes)")
    async def reload() -> dict[str, Any]:
        if not await run_in_threadpool(runtime.load):
            raise ApiError(409, "not_ready", f"reload failed: {runtime.last_error}; still serving {served()}")
        return {"reloaded": True, "served": served()}

    return router
