"""`WS /v1/stream`: place recognition on a live video stream.

Protocol (client -> server):
  1. a text message `{"codec": "jpeg"|"h264", "top_k": 5, "fps": 30, "track": true}`
     (`top_k`, `fps` and `track` optional; `fps` only dates frames in the
     replies; `"track": false` asks for frame-only answers);
  2. binary messages: one JPEG per message, or an H.264 Annex-B byte stream
     cut anywhere (one PyAV decoder per connection reassembles it);
  3. optionally a text message `{"type": "end"}`: the server answers the
     frame it holds, sends a summary and closes normally.

Server -> client, all JSON text: `ready` (after the hello), `result` (one per
processed frame), `warning` (a frame that could not be decoded), `end`
(summary), `error` (then the socket closes with the code in the message).

Each `result` holds the frame's own `results` and `track`: where the
stream's causal tracker (track/tracker.py, one per connection) places the
walker after this frame (`id`, `label`, `path`, `position`, `confidence`,
`localized`, `frames`, `mode`, `update_ms`), or null when tracking is off
(`VPR_TRACK_ENABLED=0` or the hello's `"track": false`). Dropped frames are
not observed; the tracker counts them through the frame numbers.

Newest-frame-only: while the model is busy the server keeps just the newest
frame; older unprocessed ones are dropped and counted, so latency stays at
one forward pass however fast the client sends. An error is confined to its
connection.

Each frame then goes through the query service (server/service.py), like an
HTTP query; this module keeps what is the stream's own: the hello, PyAV
decoding, the newest-frame mailbox, and close codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import av
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from vpr.server.errors import (
    BadImage,
    NotReady,
    Overloaded,
    QueryTimeout,
    TooLarge,
    Unavailable,
)
from vpr.server.inputs import sniff
from vpr.server.metrics import Metrics
from vpr.server.service import Prepared, QueryService, Upload, answered_top_k
from vpr.server.serving import Serving
from vpr.server.sessions import Track
from vpr.settings import ServerSettings

log = logging.getLogger(__name__)

# Close codes (RFC 6455 section 7.4.1, plus 1013 from the IANA registry).
NORMAL, UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1003, 1007, 1008, 1009, 1011, 1013


class StreamError(Exception):
    """Ends one stream: sent to the client as JSON, then the socket closes.

    The stream's own protocol errors are raised as these; the query service's
    typed errors become one in `StreamSession._answer` (or a warning, or a
    dropped frame): TooLarge -> 1009, Unavailable (not ready, shutting down)
    -> 1013, BadImage -> a `bad_frame` warning (1007 after too many), a
    frame the model could not process -> an `unprocessable_image` warning
    (the stream goes on), Overloaded / QueryTimeout -> the frame is dropped."""

    def __init__(self, close_code: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.close_code, self.error, self.detail = close_code, error, detail


class StreamHello(BaseModel):
    """The first message of a stream."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["hello"] = "hello"
    codec: Literal["jpeg", "h264"]
    top_k: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)
    track: bool | None = None  # false: frame-only answers (None: the server's VPR_TRACK_ENABLED)


class H264Decoder:
    """Annex-B H.264 in arbitrary chunks -> decoded frames, for one connection.

    Blocking (call it from a worker thread, one call at a time). Refuses a
    stream that is clearly not Annex-B, that keeps failing to decode, or that
    yields no frame at all within `probe_bytes`.
    """

    def __init__(self, max_pixels: int, probe_bytes: int, max_bad: int) -> None:
        self.ctx = av.CodecContext.create("h264", "r")
        self.ctx.thread_count = 1  # many connections: one thread each is fairer
        self.max_pixels, self.probe_bytes, self.max_bad = max_pixels, probe_bytes, max_bad
        self.bytes_in = 0
        self.frames_out = 0
        self.bad_in_a_row = 0
        self._head = b""

    def feed(self, chunk: bytes) -> list[av.VideoFrame]:
        if len(self._head) < 16:
            self._head += chunk[:16]
            self._check_head()
        self.bytes_in += len(chunk)
        try:
            packets = self.ctx.parse(chunk)
        except av.error.FFmpegError as e:
            raise StreamError(INVALID_DATA, "bad_stream", f"H.264 parser failed: {e}") from None
        frames = self._decode(packets)
        if not self.frames_out and self.bytes_in > self.probe_bytes:
            raise StreamError(
                INVALID_DATA,
                "bad_stream",
                f"no decodable H.264 frame in the first {self.bytes_in} bytes; send an Annex-B "
                "byte stream (start codes 00 00 01), e.g. `ffmpeg -i in.mp4 -c:v copy -bsf:v "
                "h264_mp4toannexb -f h264 -`",
            )
        return frames

    def flush(self) -> list[av.VideoFrame]:
        try:
            frames = self._decode(self.ctx.parse(b""))
            frames.extend(self.ctx.decode(None))
        except av.error.FFmpegError:
            return []
        return self._checked(frames)

    def _check_head(self) -> None:
        head = self._head
        if head[4:8] == b"ftyp":
            raise StreamError(
                INVALID_DATA,
                "bad_stream",
                "this is an MP4 file, not an H.264 Annex-B stream; "
                "demux it and send the video bitstream (h264_mp4toannexb)",
            )
        if len(head) >= 4 and not (head.startswith(b"\x00\x00\x01") or head.startswith(b"\x00\x00\x00\x01")):
            # Annex-B streams start with a start code; anything else is not one.
            raise StreamError(
                INVALID_DATA, "bad_stream", "the stream does not start with an H.264 Annex-B start code (00 00 01)"
            )

    def _decode(self, packets: Iterable[av.Packet[Any]]) -> list[av.VideoFrame]:
        frames: list[av.VideoFrame] = []
        for packet in packets:
            try:
                frames.extend(self.ctx.decode(packet))
                self.bad_in_a_row = 0
            except av.error.FFmpegError as e:
                self.bad_in_a_row += 1
                log.debug("undecodable H.264 packet: %s", e)
                if self.bad_in_a_row > self.max_bad:
                    raise StreamError(
                        INVALID_DATA, "bad_stream", f"{self.bad_in_a_row} H.264 packets in a row failed to decode ({e})"
                    ) from None
        return self._checked(frames)

    def _checked(self, frames: list[av.VideoFrame]) -> list[av.VideoFrame]:
        for f in frames:
            if f.width * f.height > self.max_pixels:
                raise StreamError(
                    TOO_BIG,
                    "frame_too_large",
                    f"frame {f.width}x{f.height} exceeds the pixel limit of {self.max_pixels}",
                )
        self.frames_out += len(frames)
        return frames


@dataclass
class Frame:
    number: int
    received: float  # perf_counter when its last byte arrived
    data: bytes | None = None  # a JPEG
    video: av.VideoFrame | None = None  # a decoded H.264 frame
    pts: int | None = None


class OpenStreams:
    """How many streams are open (touched on the event loop only)."""

    def __init__(self, metrics: Metrics) -> None:
        self.count = 0
        self.metrics = metrics

    def opened(self) -> int:
        """Count one more; returns how many are open now, this one included."""
        self.count += 1
        self.metrics.streams.inc()
        return self.count

    def closed(self) -> None:
        self.count -= 1
        self.metrics.streams.dec()


class StreamSession:
    """One websocket connection: a receiver task and a processor task sharing
    a one-slot mailbox (the newest frame)."""

    def __init__(
        self, ws: WebSocket, service: QueryService, settings: ServerSettings, metrics: Metrics, streams: OpenStreams
    ) -> None:
        self.ws, self.service, self.settings, self.metrics, self.streams = ws, service, settings, metrics, streams
        self.hello: StreamHello | None = None
        self.top_k = self.settings.top_k_default
        self.decoder: H264Decoder | None = None
        self.track: Track | None = None  # this stream's tracker (after the hello, when tracking)
        self.pending: Frame | None = None
        self.wake = asyncio.Event()
        self.ended = False
        self.received = self.processed = self.dropped = self.bad = 0

    @property
    def codec(self) -> str:
        return self.hello.codec if self.hello else "none"

    # ---- entry ------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        open_now = self.streams.opened()
        tasks: list[asyncio.Task[None]] = []
        try:
            if open_now > self.settings.stream_max_connections:
                raise StreamError(
                    TRY_LATER,
                    "too_many_streams",
                    f"{self.settings.stream_max_connections} streams are open already; retry later",
                )
            await self._handshake()
            tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._process())]
            receiver, processor = tasks
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                failure = t.exception()
                if failure is not None:
                    raise failure
            if receiver.done() and self.ended:
                await processor
                await self._send({"type": "end", **self.counts()})
                await self._close(NORMAL)
        except StreamError as e:
            self.metrics.stream_errors.labels(e.error).inc()
            log.info("stream closed: %s (%s)", e.detail, e.error)
            await self._send_quietly(
                {"type": "error", "error": e.error, "detail": e.detail, "close_code": e.close_code, **self.counts()}
            )
            await self._close(e.close_code)
        except (WebSocketDisconnect, _Gone):
            pass
        except Exception as e:
            self.metrics.stream_errors.labels("internal").inc()
            log.exception("stream failed")
            await self._send_quietly(
                {"type": "error", "error": "internal", "detail": f"{type(e).__name__}: {e}", "close_code": INTERNAL}
            )
            await self._close(INTERNAL)
        finally:
            for t in tasks:
                t.cancel()
            # Drop references only: a worker thread may still be inside the
            # decoder; it is freed when that call returns.
            self.decoder = None
            self.pending = None
            self.streams.closed()
            if tasks:  # not gather(): it re-raises the host's cancellation badly under anyio
                await asyncio.wait(tasks, timeout=5)

    def counts(self) -> dict[str, int]:
        return {"received": self.received, "processed": self.processed, "dropped": self.dropped, "bad_frames": self.bad}

    # ---- hello ------------------------------------------------------------------
    async def _handshake(self) -> None:
        try:
            msg = await asyncio.wait_for(self.ws.receive(), self.settings.stream_hello_timeout_s)
        except TimeoutError:
            raise StreamError(
                POLICY, "no_hello", f"no hello message within {self.settings.stream_hello_timeout_s:g} s"
            ) from None
        if msg["type"] == "websocket.disconnect":
            raise _Gone()
        text = msg.get("text")
        if text is None:
            raise StreamError(
                POLICY,
                "bad_hello",
                'the first message must be JSON text: {"codec": "jpeg"|"h264", "top_k": N, "fps": F}',
            )
        try:
            hello = StreamHello.model_validate(json.loads(text))
        except (ValueError, ValidationError) as e:
            raise StreamError(POLICY, "bad_hello", f"bad hello message: {_short(e)}") from None
        if hello.top_k is not None and hello.top_k > self.settings.top_k_max:
            raise StreamError(POLICY, "bad_hello", f"top_k {hello.top_k} exceeds the maximum {self.settings.top_k_max}")
        if hello.fps is not None and hello.fps > self.settings.stream_max_fps:
            raise StreamError(
                POLICY, "bad_hello", f"fps {hello.fps:g} exceeds the maximum {self.settings.stream_max_fps:g}"
            )
        self.hello = hello
        self.top_k = hello.top_k or self.settings.top_k_default
        try:
            with self.service.lease() as serving:
                model, index = serving.model_spec, serving.index_spec
                stated_top_k = answered_top_k(serving, self.top_k)  # never more than the index holds
        except NotReady as e:
            raise StreamError(TRY_LATER, e.code, e.detail) from None
        if hello.codec == "h264":
            s = self.settings
            self.decoder = H264Decoder(s.max_pixels, s.stream_probe_bytes, s.stream_max_bad_frames)
        if self.settings.track.enabled and hello.track is not False:
            self.track = self.service.sessions.stream_track()
        await self._send(
            {
                "type": "ready",
                "codec": hello.codec,
                "top_k": stated_top_k,
                "fps": hello.fps,
                "model": model,
                "index": index,
                "max_message_bytes": self.settings.stream_max_message_bytes,
                "track": self.track is not None,
            }
        )

    # ---- receiving ------------------------------------------------------------------
    async def _receive(self) -> None:
        limit = self.settings.stream_max_message_bytes
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise _Gone()
            data = msg.get("bytes")
            if data is None:
                self._control(msg.get("text") or "")
                if self.ended:
                    if self.decoder is not None:
                        self._offer(await self.service.offload(self.decoder.flush))
                    self.wake.set()
                    return
                continue
            if len(data) > limit:
                raise StreamError(
                    TOO_BIG, "message_too_large", f"binary message of {len(data)} bytes exceeds the limit of {limit}"
                )
            if self.decoder is None:
                self._offer_one(Frame(self.received, time.perf_counter(), data=data))
            else:
                self._offer(await self.service.offload(self.decoder.feed, data))

    def _control(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "end":
            self.ended = True
            return
        raise StreamError(
            UNSUPPORTED, "bad_message", 'after the hello, send binary frames; the only text message is {"type": "end"}'
        )

    def _offer(self, frames: list[av.VideoFrame]) -> None:
        now = time.perf_counter()
        for f in frames:
            self._offer_one(Frame(self.received, now, video=f, pts=f.pts))

    def _offer_one(self, frame: Frame) -> None:
        """Keep only the newest frame; the one it replaces is dropped."""
        self.received += 1
        self.metrics.frames_received.labels(self.codec).inc()
        if self.pending is not None:
            self._drop("superseded")
        self.pending = frame
        self.wake.set()

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.metrics.frames_dropped.labels(self.codec, reason).inc()

    # ---- processing ------------------------------------------------------------------
    async def _process(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            frame, self.pending = self.pending, None
            if frame is not None:
                await self._answer(frame)
            if self.ended and self.pending is None:
                return
            if self.pending is not None:
                self.wake.set()

    async def _answer(self, frame: Frame) -> None:
        """One frame through the query service; its errors become a warning, a
        dropped frame, or the end of the stream."""
        try:
            with self.service.lease() as serving:
                try:
                    prepared = await self._prepare(frame, serving)
                except BadImage as e:
                    await self._bad_frame(frame, e.detail)
                    return
                try:
                    k = self.service.search_k(self.top_k, self.track)
                    (answer,) = await self.service.search(serving, [prepared], k, source="stream")
                except Overloaded:
                    self._drop("queue_full")
                    return
                except QueryTimeout:
                    self._drop("timeout")
                    return
                except BadImage as e:  # the model could not process this frame: the stream goes on
                    self._drop("unprocessable")
                    await self._send({"type": "warning", "error": e.code, "frame": frame.number, "detail": e.detail})
                    return
                self.processed += 1
                self.metrics.frames_processed.labels(self.codec).inc()
                body = self.service.answer(
                    serving,
                    prepared,
                    answer,
                    started=frame.received,
                    top_k=self.top_k,
                    track=self.track,
                    at=frame.number,
                )
        except TooLarge as e:
            raise StreamError(TOO_BIG, "frame_too_large", e.detail) from None  # names the frame
        except Unavailable as e:  # not ready, shutting down
            raise StreamError(TRY_LATER, e.code, e.detail) from None
        fps = self.hello.fps if self.hello else None
        await self._send(
            {
                "type": "result",
                "frame": frame.number,
                "pts": frame.pts,
                "time_s": round(frame.number / fps, 6) if fps else None,
                "track": None,  # frame-only answers; `body` holds the tracked place when tracking
                **body,
                "latency_ms": body["timings_ms"]["total"],
                **self.counts(),
            }
        )

    async def _prepare(self, frame: Frame, serving: Serving) -> Prepared:
        if frame.video is not None:
            return await self.service.offload(self._video_input, frame, serving)
        assert frame.data is not None
        kind = sniff(frame.data)
        if kind != "image/jpeg":  # a jpeg stream carries JPEGs only
            raise BadImage(f"frame {frame.number}: not a decodable image ({kind or 'not JPEG'} data on a jpeg stream)")
        return await self.service.prepare(serving, Upload(frame.data, kind, f"frame {frame.number}"))

    def _video_input(self, frame: Frame, serving: Serving) -> Prepared:
        """Blocking (the pool): colour conversion, then the service's preprocessing."""
        assert frame.video is not None
        rgb = frame.video.to_ndarray(format="rgb24")
        frame.video = None  # release the decoder's buffer early
        return self.service.decode_frame(serving, rgb)

    async def _bad_frame(self, frame: Frame, detail: str) -> None:
        self.bad += 1
        self.metrics.frames_dropped.labels(self.codec, "undecodable").inc()
        if self.bad > self.settings.stream_max_bad_frames:
            raise StreamError(
                INVALID_DATA,
                "bad_stream",
                f"{self.bad} undecodable frames (limit {self.settings.stream_max_bad_frames}); last: {detail}",
            )
        await self._send({"type": "warning", "error": "bad_frame", "frame": frame.number, "detail": detail})

    # ---- sending ----------------------------------------------------------------------
    async def _send(self, payload: dict[str, Any]) -> None:
        if self.ws.application_state != WebSocketState.CONNECTED or self.ws.client_state != WebSocketState.CONNECTED:
            raise _Gone()
        try:
            await self.ws.send_text(json.dumps(payload))
        except (WebSocketDisconnect, RuntimeError, OSError):
            raise _Gone() from None

    async def _send_quietly(self, payload: dict[str, Any]) -> None:
        with contextlib.suppress(_Gone):
            await self._send(payload)

    async def _close(self, code: int) -> None:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self.ws.close(code)


class _Gone(Exception):
    """The client went away; nothing more to send."""


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in e.errors())
    return str(e)
