"""Python client of the server, and the `vpr query` / `vpr stream` commands.

    with VPRClient("http://127.0.0.1:8000") as c:
        c.wait_ready()
        print(c.query("photo.jpg", top_k=3)["results"][0])
        summary = c.stream("walk.mp4", codec="h264", on_message=print)

Streaming reads a video file with PyAV and sends it at its frame rate: for
`h264` the video bitstream itself (MP4 H.264 is converted to Annex-B with the
h264_mp4toannexb bitstream filter, no re-encoding; other codecs are
re-encoded to H.264), for `jpeg` one JPEG per frame. Results are handed to
`on_message` as they arrive, while frames keep being sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from vpr.settings import ClientSettings

log = logging.getLogger(__name__)

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
CHUNK = 64 * 1024  # H.264 bytes per websocket message (the server reassembles any cut)


class ServerError(Exception):
    """An error answer of the server (status, machine code, human detail)."""

    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class UnreadableImage(OSError):
    """A local image that cannot be read (missing, a folder, no permission, an
    empty folder given as images...): about this path only, never the server."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def default_url() -> str:
    return ClientSettings().url


def content_type_for(path: Path, data: bytes) -> str:
    """By suffix, else by the leading bytes; the server checks again anyway."""
    from vpr.server.inputs import sniff

    return CONTENT_TYPES.get(path.suffix.lower()) or sniff(data) or "application/octet-stream"


class VPRClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> VPRClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- plumbing ---------------------------------------------------------------
    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": "bad_response", "detail": response.text[:200]}
        if response.status_code >= 400:
            raise ServerError(response.status_code, body.get("error", "error"), body.get("detail"))
        return body

    def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            return self._json(self._http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise ConnectionError(f"{self.url}: {e or type(e).__name__}") from e

    # ---- probes ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """The readiness document (ready or not; no exception for 503)."""
        try:
            return self._http.get("/readyz").json()
        except httpx.TransportError as e:
            raise ConnectionError(f"{self.url}: {e or type(e).__name__}") from e

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> dict[str, Any]:
        """Poll /readyz until ready; the last reason in the error otherwise."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.ready()
                if last.get("ready"):
                    return last
            except ConnectionError as e:
                last = str(e)
            time.sleep(interval)
        raise TimeoutError(f"{self.url} not ready after {timeout:g} s: {last}")

    # ---- queries ------------------------------------------------------------------------
    def query(self, image: Path | str | bytes, top_k: int | None = None, content_type: str | None = None) -> dict:
        """Top matches of one image (a path, or bytes with their content type)."""
        data, ctype = _image(image, content_type)
        params = {"top_k": top_k} if top_k else {}
        return self._request("POST", "/v1/query", content=data, headers={"Content-Type": ctype}, params=params)

    def query_batch(self, images: Sequence[Path | str | bytes], top_k: int | None = None) -> dict:
        files = []
        for i, image in enumerate(images):
            data, ctype = _image(image, None)
            name = Path(image).name if not isinstance(image, bytes) else f"image{i}"
            files.append(("files", (name, data, ctype)))
        params = {"top_k": top_k} if top_k else {}
        return self._request("POST", "/v1/query/batch", files=files, params=params)

    # ---- admin ------------------------------------------------------------------------------
    def models(self) -> dict:
        return self._request("GET", "/v1/admin/models")

    def activate_model(self, model: str, index: str | None = None) -> dict:
        return self._request("POST", "/v1/admin/models/activate", json={"model": model, "index": index})

    def activate_index(self, index: str, model: str | None = None) -> dict:
        return self._request("POST", "/v1/admin/index/activate", json={"index": index, "model": model})

    def rebuild(self, **request: Any) -> dict:
        """Start a rebuild (see server.jobs.RebuildRequest); returns the job id."""
        body = {k: (str(v) if isinstance(v, Path) else v) for k, v in request.items() if v is not None}
        return self._request("POST", "/v1/admin/index/rebuild", json=body)

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/admin/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 600.0, interval: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(interval)

    # ---- streaming ------------------------------------------------------------------------------
    def stream(
        self,
        video: Path | str,
        codec: str = "h264",
        top_k: int | None = None,
        realtime: bool = True,
        speed: float = 1.0,
        on_message: Callable[[dict], None] | None = None,
        max_frames: int | None = None,
        timeout: float = 60.0,
    ) -> dict:
        """Stream a video file; returns the server's final message (`end` or
        `error`), with `messages` (results received) and `sent` added."""
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        if codec not in ("h264", "jpeg"):
            raise ValueError(f"bad codec {codec!r}; choose h264 or jpeg")
        video = Path(video)
        if not video.is_file():
            raise FileNotFoundError(f"{video}: no such video file")
        fps = video_fps(video)
        source = h264_chunks(video, max_frames) if codec == "h264" else jpeg_frames(video, max_frames)
        ws_url = "ws" + self.url[len("http") :] + "/v1/stream"
        hello = {"codec": codec, "fps": fps, **({"top_k": top_k} if top_k else {})}
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = connect(ws_url, max_size=None, additional_headers=headers, open_timeout=timeout)
        except OSError as e:
            raise ConnectionError(f"{ws_url}: {e}") from e
        with ws:
            try:
                ws.send(json.dumps(hello))
                first = json.loads(ws.recv(timeout))
            except (ConnectionClosed, TimeoutError) as e:
                raise ConnectionError(f"{ws_url}: no answer to the hello ({e})") from e
            if on_message:
                on_message(first)
            if first.get("type") == "error":
                raise ServerError(first.get("close_code", 0), first.get("error", "error"), first.get("detail"))
            sent = {"messages": 0, "bytes": 0, "error": None}
            sender = threading.Thread(target=_send_all, args=(ws, source, realtime, speed, sent), daemon=True)
            sender.start()
            results = 0
            final: dict = {}
            try:
                for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("type") == "result":
                        results += 1
                    if on_message:
                        on_message(msg)
                    if msg.get("type") in ("end", "error"):
                        final = msg
                        break
            except ConnectionClosed as e:
                final = {
                    "type": "error",
                    "error": "closed",
                    "detail": f"the server closed the stream ({e})",
                    "close_code": e.rcvd.code if e.rcvd else None,
                }
            sender.join(timeout=5)
        if sent["error"] is not None and not final:
            raise ConnectionError(f"streaming failed: {sent['error']}")
        return {**final, "messages": results, "sent": sent["messages"], "sent_bytes": sent["bytes"]}


def _image(image: Path | str | bytes, content_type: str | None) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        from vpr.server.inputs import sniff

        return image, content_type or sniff(image) or "application/octet-stream"
    path = Path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImage(path, "no such image file") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise UnreadableImage(path, f"cannot read ({e.strerror or type(e).__name__})") from None
    return data, content_type or content_type_for(path, data)


def expand_images(paths: Sequence[Path]) -> Iterator[Path | UnreadableImage]:
    """The images to send, in order: a folder stands for its images (by suffix,
    sorted by name; not its subfolders). A folder that cannot be listed or holds
    no image comes out as an `UnreadableImage`, so that the caller reports it
    and goes on."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        try:
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in CONTENT_TYPES and not p.is_dir())
        except OSError as e:
            yield UnreadableImage(path, f"cannot list the folder ({e.strerror or type(e).__name__})")
            continue
        if not images:
            yield UnreadableImage(path, f"no images ({', '.join(CONTENT_TYPES)}) in this folder")
        yield from images


def _send_all(ws: Any, source: Iterator[tuple[float, bytes]], realtime: bool, speed: float, sent: dict) -> None:
    """Send (time_s, payload) items at their time (or at once), then `end`."""
    start = time.monotonic()
    try:
        for t, payload in source:
            if realtime and speed > 0:
                delay = start + t / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            ws.send(payload)
            sent["messages"] += 1
            sent["bytes"] += len(payload)
        ws.send(json.dumps({"type": "end"}))
    except Exception as e:  # the server closed (its error comes through recv), or the video failed
        sent["error"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception):
            ws.close()  # ends the receiving loop when the server is still waiting for frames


# ---- video sources -------------------------------------------------------------------------
def video_fps(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path}: no video stream")
        rate = c.streams.video[0].average_rate or c.streams.video[0].guessed_rate or Fraction(30)
        return float(rate)


def h264_chunks(path: Path, max_frames: int | None = None) -> Iterator[tuple[float, bytes]]:
    """(send time s, Annex-B bytes) of the video stream, split into <= CHUNK pieces."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path}: no video stream")
        vs = c.streams.video[0]
        if vs.codec_context.name != "h264":
            yield from _reencode_h264(c, vs, max_frames)
            return
        bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", vs)
        rate = float(vs.average_rate or 30)
        n = 0
        for packet in c.demux(vs):
            for p in bsf.filter(packet if packet.size else None):
                if max_frames is not None and n >= max_frames:
                    return
                data = bytes(p)
                t = float(p.dts * p.time_base) if p.dts is not None and p.time_base else n / rate
                for i in range(0, len(data), CHUNK):
                    yield max(t, 0.0), data[i : i + CHUNK]
                n += 1


def _reencode_h264(container: Any, vs: Any, max_frames: int | None) -> Iterator[tuple[float, bytes]]:
    import av

    rate = vs.average_rate or Fraction(30)
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height = vs.codec_context.width // 2 * 2, vs.codec_context.height // 2 * 2
    enc.pix_fmt, enc.time_base, enc.framerate = "yuv420p", 1 / Fraction(rate), Fraction(rate)
    enc.options = {"preset": "veryfast", "tune": "zerolatency"}
    for n, frame in enumerate(container.decode(vs)):
        if max_frames is not None and n >= max_frames:
            break
        f = frame.reformat(width=enc.width, height=enc.height, format="yuv420p")
        f.pts = n
        for p in enc.encode(f):
            yield n / float(rate), bytes(p)
    for p in enc.encode(None):
        yield (n + 1) / float(rate), bytes(p)


def jpeg_frames(path: Path, max_frames: int | None = None, quality: int = 85) -> Iterator[tuple[float, bytes]]:
    """(presentation time s, JPEG bytes) of every frame."""
    import io

    import av

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path}: no video stream")
        vs = c.streams.video[0]
        rate = float(vs.average_rate or 30)
        for n, frame in enumerate(c.decode(vs)):
            if max_frames is not None and n >= max_frames:
                break
            buf = io.BytesIO()
            frame.to_image().save(buf, format="JPEG", quality=quality)
            t = float(frame.time) if frame.time is not None else n / rate
            yield max(t, 0.0), buf.getvalue()


# ---- what the CLI prints --------------------------------------------------------------------------
def format_match(m: dict) -> str:
    pos = m.get("position") or {}
    where = ""
    if pos.get("lat") is not None:
        where = f"  ({pos['lat']:.6f}, {pos['lon']:.6f})"
    elif pos.get("utm_e") is not None:
        where = (
            f"  (UTM {pos['utm_e']:.1f} E, {pos['utm_n']:.1f} N{' ' + pos['utm_zone'] if pos.get('utm_zone') else ''})"
        )
    return f"  {m['rank']:>2}. {m['score']:.4f}  {m.get('label') or '-'}  {m.get('path') or ''}{where}"


def format_stream_message(msg: dict) -> str:
    kind = msg.get("type")
    if kind == "result":
        best = msg["results"][0] if msg.get("results") else None
        when = f" t={msg['time_s']:.2f}s" if msg.get("time_s") is not None else ""
        top = format_match(best).strip() if best else "no match"
        return f"frame {msg['frame']:>5}{when}  {top}  latency {msg['latency_ms']:.0f} ms  dropped {msg['dropped']}"
    if kind == "ready":
        return f"streaming ({msg['codec']}) to {msg['model']} / {msg['index']}, top_k={msg['top_k']}"
    if kind == "end":
        return (
            f"end: {msg['received']} frames received, {msg['processed']} processed, "
            f"{msg['dropped']} dropped, {msg.get('bad_frames', 0)} undecodable"
        )
    if kind == "warning":
        return f"warning: frame {msg.get('frame')}: {msg.get('detail')}"
    if kind == "error":
        return f"error ({msg.get('error')}, close code {msg.get('close_code')}): {msg.get('detail')}"
    return json.dumps(msg)


def query_command(
    url: str | None,
    images: Sequence[Path],
    top_k: int | None = None,
    as_json: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """`vpr query`: each image in turn (a folder: its images, sorted); an image the
    server refuses or that cannot be read is reported in one line, the rest go
    on. Exit status 0 when all succeeded, 1 otherwise."""
    failed = 0

    def report(path: Path, reason: str) -> None:
        nonlocal failed
        failed += 1
        out(json.dumps({"image": str(path), "error": reason}) if as_json else f"{path}: error: {reason}")

    with VPRClient(url) as client:
        for path in expand_images(images):
            if isinstance(path, UnreadableImage):
                report(path.path, path.reason)
                continue
            try:
                answer = client.query(path, top_k=top_k)
            except UnreadableImage as e:  # about this image only: report it, go on
                report(path, e.reason)
                continue
            except ServerError as e:
                report(path, str(e))
                continue
            if as_json:
                out(json.dumps({"image": str(path), **answer}))
                continue
            t = answer["timings_ms"]
            out(
                f"{path}: {answer['model']} / {answer['index']}  ({t['total']:.0f} ms: decode {t['decode']:.0f}, "
                f"embed {t['embed']:.0f}, search {t['search']:.0f})"
            )
            for m in answer["results"]:
                out(format_match(m))
    return 1 if failed else 0


def stream_command(
    url: str | None,
    video: Path,
    codec: str = "h264",
    top_k: int | None = None,
    realtime: bool = True,
    speed: float = 1.0,
    as_json: bool = False,
    max_frames: int | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """`vpr stream`: prints each message as it arrives; 0 when the stream ended cleanly."""

    def show(msg: dict) -> None:
        out(json.dumps(msg) if as_json else format_stream_message(msg))

    with VPRClient(url) as client:
        final = client.stream(
            video, codec=codec, top_k=top_k, realtime=realtime, speed=speed, on_message=show, max_frames=max_frames
        )
    return 0 if final.get("type") == "end" else 1
