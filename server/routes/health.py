"""Probes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vpr.server.deps import BatcherDep, MetricsDep, RuntimeDep, SettingsDep
from vpr.server.results import Readiness

router = APIRouter(tags=["probes"])


# HEAD answers as GET does, without a body (load balancers and `curl -I` probe with it);
# it is left out of the schema so that each operation id stays unique.
@router.get("/healthz", summary="Liveness: the process answers")
@router.head("/healthz", include_in_schema=False)
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model and index loaded",
    responses={503: {"model": Readiness}},
)
@router.head("/readyz", include_in_schema=False)
def readyz(runtime: RuntimeDep, settings: SettingsDep, request: Request) -> JSONResponse:
    follower = getattr(request.app.state, "follower", None)  # server/follow.py, set by create_app
    cur, st = runtime.current, runtime.status
    body = Readiness(
        ready=cur is not None,
        state="ready" if cur is not None else st.state,
        reason=None if cur is not None else st.reason,
        model=cur.model_spec if cur else None,
        index=cur.index_spec if cur else None,
        index_size=cur.index.count if cur else None,
        device=str(runtime.device),
        engine={**cur.engine.info(), "setting": settings.engine, "note": cur.engine_note} if cur else None,
        replica=getattr(request.app.state, "replica", None),
        follow=follower.state.as_dict() if follower is not None else None,
    )
    headers = {} if cur is not None else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body.model_dump(), status_code=200 if cur is not None else 503, headers=headers)


@router.get("/metrics", summary="Prometheus metrics")
def metrics_route(metrics: MetricsDep, batcher: BatcherDep) -> Response:
    metrics.queue_depth.set(batcher.depth)
    data, ctype = metrics.render()
    return Response(data, media_type=ctype)
