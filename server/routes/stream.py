"""`WS /v1/stream`: place recognition on a live video stream (protocol: server/stream.py)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from vpr.server.deps import MetricsDep, ServiceDep, SettingsDep, StreamsDep
from vpr.server.stream import StreamSession

router = APIRouter()


@router.websocket("/v1/stream")
async def stream(
    ws: WebSocket, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep, streams: StreamsDep
) -> None:
    """Place recognition on a live stream (protocol: server/stream.py)."""
    await StreamSession(ws, service, settings, metrics, streams).run()
