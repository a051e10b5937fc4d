"""Bounds on slow clients at the connection level, below the ASGI app.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) and caps
open connections (`limit_concurrency`), but it has no deadline for the
request head: every byte received cancels the keep-alive timer, so a client
that sends nothing, or one header byte now and then, holds its connection
for ever. ASGI middleware cannot help, since the app is called only once the
headers are complete. `header_deadline_protocol` adds that deadline to
uvicorn's httptools protocol: a request's head must have arrived within
`header_timeout_s` of the connection opening (or of the first byte after the
previous response), else the connection is closed. The body is bounded by
`inputs.BodyLimitMiddleware`; a websocket, once upgraded, by its own protocol
and the stream's hello timeout.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's head."""

    header_timeout_s = 10.0  # set per server by `header_deadline_protocol`
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.transport.get_protocol() is not self or self.cycle is not before:
            self._disarm()  # a request's head is complete (or the connection is a websocket now)
        elif self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info("closing connection from %s: no complete request head within %g s", client, self.header_timeout_s)
            self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's `http` option, with this server's deadline."""

    class Configured(HeaderDeadlineProtocol):
        pass

    Configured.header_timeout_s = header_timeout_s
    Configured.__name__ = Configured.__qualname__ = "HeaderDeadlineProtocol"
    return Configured
