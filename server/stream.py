"""`WS /v1/stream`: place recognition on a live video stream.

Protocol (client -> server):
  1. a text message `{"codec": "jpeg"|"h264", "top_k": 5, "fps": 30}`
     (`top_k` and `fps` optional; `fps` only dates frames in the replies);
  2. binary messages: one JPEG per message, or an H.264 Annex-B byte stream
     cut anywhere (one PyAV decoder per connection reassembles it);
  3. optionally a text message `{"type": "end"}`: the server answers the
     frame it holds, sends a summary and closes normally.

Server -> client, all JSON text: `ready` (after the hello), `result` (one per
processed frame), `warning` (a frame that could not be decoded), `end`
(summary), `error` (then the socket closes with the code in the message).

Newest-frame-only: while the model is busy the server keeps just the newest
frame; older unprocessed ones are dropped and counted, so latency stays at
one forward pass however fast the client sends. An error is confined to its
connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from vpr.model.preprocess import ImageDecodeError, ImageTooLarge
from vpr.server.batcher import BatcherStopped, QueueFull
from vpr.server.inputs import sniff
from vpr.server.results import answer_json
from vpr.server.runtime import NotReady, Runtime

log = logging.getLogger(__name__)

# Close codes (RFC 6455 section 7.4.1, plus 1013 from the IANA registry).
NORMAL, UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1003, 1007, 1008, 1009, 1011, 1013


class StreamError(Exception):
    """Ends one stream: sent to the client as JSON, then the socket closes."""

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

    def _decode(self, packets) -> list[av.VideoFrame]:
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


class StreamSession:
    """One websocket connection: a receiver task and a processor task sharing
    a one-slot mailbox (the newest frame)."""

    def __init__(self, ws: WebSocket, runtime: Runtime) -> None:
        self.ws, self.runtime = ws, runtime
        self.settings, self.metrics = runtime.settings, runtime.metrics
        self.hello: StreamHello | None = None
        self.top_k = self.settings.top_k_default
        self.decoder: H264Decoder | None = None
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
        self.metrics.streams.inc()
        self.runtime.streams += 1
        tasks: list[asyncio.Task] = []
        try:
            if self.runtime.streams > self.settings.stream_max_connections:
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
                if t.exception() is not None:
                    raise t.exception()
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
            self.metrics.streams.dec()
            self.runtime.streams -= 1
            if tasks:  # not gather(): it re-raises the host's cancellation badly under anyio
                await asyncio.wait(tasks, timeout=5)

    def counts(self) -> dict[str, int]:
        return {"received": self.received, "processed": self.processed, "dropped": self.dropped, "bad_frames": self.bad}

    # ---- hello ------------------------------------------------------------------
    async def _handshake(self) -> None:
        try:
            msg = await asyncio.wait_for(self.ws.receive(), self.settings.stream_hello_timeout_s)
        except TimeoutError:
            raise StreamError(POLICY, "no_hello", f"no hello message within {self.settings.stream_hello_timeout_s:g} s")
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
        if self.runtime.current is None:
            raise StreamError(TRY_LATER, "not_ready", self.runtime.status.reason or "not ready")
        if hello.codec == "h264":
            s = self.settings
            self.decoder = H264Decoder(s.max_pixels, s.stream_probe_bytes, s.stream_max_bad_frames)
        cur = self.runtime.current
        await self._send(
            {
                "type": "ready",
                "codec": hello.codec,
                "top_k": self.top_k,
                "fps": hello.fps,
                "model": cur.model_spec if cur else None,
                "index": cur.index_spec if cur else None,
                "max_message_bytes": self.settings.stream_max_message_bytes,
            }
        )

    # ---- receiving ------------------------------------------------------------------
    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
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
                        self._offer(await loop.run_in_executor(self.runtime.pool, self.decoder.flush))
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
                self._offer(await loop.run_in_executor(self.runtime.pool, self.decoder.feed, data))

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
        loop = asyncio.get_running_loop()
        try:
            with self.runtime.lease() as serving:
                try:
                    x, decode_ms = await loop.run_in_executor(self.runtime.pool, self._prepare, frame, serving)
                except ImageTooLarge as e:
                    raise StreamError(TOO_BIG, "frame_too_large", f"frame {frame.number}: {e}") from None
                except ImageDecodeError as e:
                    await self._bad_frame(frame, str(e))
                    return
                try:
                    fut = self.runtime.batcher.submit(x, serving, self.top_k, source="stream")
                except QueueFull:
                    self._drop("queue_full")
                    return
                try:
                    answer = await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.query_timeout_s)
                except TimeoutError:
                    self._drop("timeout")
                    return
                self.processed += 1
                self.metrics.frames_processed.labels(self.codec).inc()
                fps = self.hello.fps if self.hello else None
                timings = {
                    "decode": decode_ms,
                    "queue": answer.queue_ms,
                    "embed": answer.embed_ms,
                    "search": answer.search_ms,
                }
                latency = (time.perf_counter() - frame.received) * 1000
                await self._send(
                    {
                        "type": "result",
                        "frame": frame.number,
                        "pts": frame.pts,
                        "time_s": round(frame.number / fps, 6) if fps else None,
                        **answer_json(answer.hits, serving),
                        "latency_ms": round(latency, 3),
                        "timings_ms": {k: round(v, 3) for k, v in {**timings, "total": latency}.items()},
                        **self.counts(),
                    }
                )
        except NotReady as e:
            raise StreamError(TRY_LATER, "not_ready", str(e)) from None
        except BatcherStopped as e:
            raise StreamError(TRY_LATER, "shutting_down", str(e)) from None

    def _prepare(self, frame: Frame, serving):
        if frame.video is not None:
            rgb: np.ndarray = frame.video.to_ndarray(format="rgb24")
            frame.video = None  # release the decoder's buffer early
            return self.runtime.prepare_array(rgb, serving)
        assert frame.data is not None
        kind = sniff(frame.data)
        if kind != "image/jpeg":  # Pillow's other decoders are never reached (see inputs.check_media)
            raise ImageDecodeError(
                f"frame {frame.number}: not a decodable image ({kind or 'not JPEG'} data on a jpeg stream)"
            )
        return self.runtime.prepare(frame.data, serving, source=f"frame {frame.number}")

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
        try:
            await self._send(payload)
        except _Gone:
            pass

    async def _close(self, code: int) -> None:
        try:
            await self.ws.close(code)
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass


class _Gone(Exception):
    """The client went away; nothing more to send."""


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in e.errors())
    return str(e)
