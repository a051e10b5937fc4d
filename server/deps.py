"""FastAPI dependencies: the server's parts, as `create_app` put them on `app.state`.

Routes declare what they use (`service: ServiceDep`); nothing is global, so
several apps can live in one process (tests, benchmarks). The parameter is an
`HTTPConnection` so that websocket routes get them too.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends
from starlette.requests import HTTPConnection

from vpr.server.batcher import MicroBatcher
from vpr.server.jobs import JobManager
from vpr.server.metrics import Metrics
from vpr.server.runtime import Runtime
from vpr.server.service import QueryService
from vpr.server.stream import OpenStreams
from vpr.settings import ServerSettings

T = TypeVar("T")


def _part(conn: HTTPConnection, name: str, kind: type[T]) -> T:
    part = getattr(conn.app.state, name)
    if not isinstance(part, kind):
        raise TypeError(f"app.state.{name} is a {type(part).__name__}, not a {kind.__name__} (see create_app)")
    return part


def get_settings(conn: HTTPConnection) -> ServerSettings:
    return _part(conn, "settings", ServerSettings)


def get_metrics(conn: HTTPConnection) -> Metrics:
    return _part(conn, "metrics", Metrics)


def get_runtime(conn: HTTPConnection) -> Runtime:
    return _part(conn, "runtime", Runtime)


def get_batcher(conn: HTTPConnection) -> MicroBatcher:
    return _part(conn, "batcher", MicroBatcher)


def get_service(conn: HTTPConnection) -> QueryService:
    return _part(conn, "service", QueryService)


def get_jobs(conn: HTTPConnection) -> JobManager:
    return _part(conn, "jobs", JobManager)


def get_streams(conn: HTTPConnection) -> OpenStreams:
    return _part(conn, "streams", OpenStreams)


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
ServiceDep = Annotated[QueryService, Depends(get_service)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
StreamsDep = Annotated[OpenStreams, Depends(get_streams)]
