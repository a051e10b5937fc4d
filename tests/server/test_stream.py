"""WS /v1/stream: JPEG frames, H.264 Annex-B encoded here with PyAV, the
real GoPro walk (when ../shared is present), newest-frame-only dropping, and
every way a stream can be bad (each closes only its own connection)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.server.support import build_home, encode_h264, encode_mp4, frames_of, gated, wait_ready
from vpr.server.app import create_app
from vpr.server.batcher import BatcherStopped, QueueFull
from vpr.server.client import h264_chunks, video_fps
from vpr.server.serving import Serving
from vpr.settings import ServerSettings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    h = build_home(root)
    settings = ServerSettings(
        home=h.home,
        model="student",
        device="cpu",
        decode_threads=2,
        stream_max_bad_frames=2,
        stream_probe_bytes=512 * 1024,
        stream_max_message_bytes=256 * 1024,
        stream_hello_timeout_s=1,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, h, root


def read_all(ws, limit: int = 5000) -> tuple[list[dict], int]:
    """Messages until the server closes; (messages, close code)."""
    msgs = []
    for _ in range(limit):
        m = ws.receive()
        if m["type"] == "websocket.close":
            return msgs, m["code"]
        msgs.append(json.loads(m["text"]))
    raise AssertionError("the server never closed the stream")


def start(ws, **hello) -> dict:
    ws.send_text(json.dumps(hello))
    ready = ws.receive_json()
    assert ready["type"] == "ready", ready
    return ready


def results(msgs: list[dict]) -> list[dict]:
    return [m for m in msgs if m["type"] == "result"]


def test_ready_states_top_k_no_larger_than_the_index(served):
    client, h, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        ready = start(ws, codec="jpeg", top_k=100)
        assert ready["top_k"] == len(h.images) < 100
        ws.send_bytes(h.images[0].read_bytes())
        assert len(ws.receive_json()["results"]) == len(h.images)


def test_jpeg_frames(served):
    client, h, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        ready = start(ws, codec="jpeg", top_k=2, fps=5)
        assert ready["model"] == h.student and ready["index"] == h.index and ready["top_k"] == 2
        for i in range(4):
            ws.send_bytes(h.images[i].read_bytes())
            msg = ws.receive_json()  # one at a time: nothing is dropped
            assert msg["type"] == "result" and msg["frame"] == i and msg["time_s"] == pytest.approx(i / 5)
            assert [r["id"] for r in msg["results"]][0] == i and len(msg["results"]) == 2
            assert msg["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
            assert msg["latency_ms"] > 0 and msg["dropped"] == 0 and msg["model"] == h.student
            assert set(msg["timings_ms"]) == {"decode", "queue", "embed", "search", "total"}
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000 and msgs[-1] == {"type": "end", "received": 4, "processed": 4, "dropped": 0, "bad_frames": 0}


def test_h264_stream_in_arbitrary_chunks(served):
    client, h, _ = served
    stream = encode_h264(frames_of(h.images, repeat=2), fps=10)
    rng = np.random.default_rng(3)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="h264", top_k=1, fps=10)
        pos = 0
        while pos < len(stream):
            n = int(rng.integers(1, 3000))
            ws.send_bytes(stream[pos : pos + n])
            pos += n
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000, msgs[-1]
    end = msgs[-1]
    assert end["type"] == "end" and end["received"] == 16 and end["bad_frames"] == 0
    got = results(msgs)
    assert end["processed"] == len(got) >= 1 and end["processed"] + end["dropped"] == 16
    assert got[-1]["frame"] == 15  # the newest frame is always answered
    for m in got:
        assert m["results"][0]["id"] == m["frame"] // 2, m  # lossy, but still its own place
        assert m["time_s"] == pytest.approx(m["frame"] / 10)
    frames = [m["frame"] for m in got]
    assert frames == sorted(set(frames))


def test_newest_frame_only_while_busy(served):
    """Frame 0 holds the model; frames 1..9 arrive meanwhile: only 9 is kept."""
    client, h, _ = served
    rt = client.app.state.runtime
    orig = rt.current
    model, net = gated(orig.model)
    rt._publish(Serving(model, orig.index, rt.device))
    metrics = client.app.state.metrics.registry

    def received() -> float:
        return metrics.get_sample_value("vpr_stream_frames_received_total", {"codec": "jpeg"}) or 0

    try:
        with client.websocket_connect("/v1/stream") as ws:
            start(ws, codec="jpeg", top_k=1)
            before = received()
            ws.send_bytes(h.images[0].read_bytes())
            assert net.entered.wait(10)
            for i in range(1, 10):
                ws.send_bytes(h.images[i % 8].read_bytes())
            deadline = time.monotonic() + 10
            while received() < before + 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            ws.send_text(json.dumps({"type": "end"}))
            net.gate.set()
            msgs, code = read_all(ws)
    finally:
        net.gate.set()
        rt._publish(orig.__class__(orig.model, orig.index, rt.device))
    assert code == 1000
    got = results(msgs)
    assert [m["frame"] for m in got] == [0, 9]
    assert [m["results"][0]["id"] for m in got] == [0, 1]
    assert msgs[-1] == {"type": "end", "received": 10, "processed": 2, "dropped": 8, "bad_frames": 0}
    assert got[-1]["dropped"] == 8
    text = client.get("/metrics").text
    assert 'vpr_stream_frames_dropped_total{codec="jpeg",reason="superseded"}' in text


def _expect_error(ws, error: str, code: int) -> dict:
    msgs, close = read_all(ws)
    assert close == code, msgs
    assert msgs and msgs[-1]["type"] == "error" and msgs[-1]["error"] == error, msgs
    assert msgs[-1]["close_code"] == code
    return msgs[-1]


def _still_works(client, h) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg", top_k=1)
        ws.send_bytes(h.images[6].read_bytes())
        msg = ws.receive_json()
        assert msg["type"] == "result" and msg["results"][0]["id"] == 6


@pytest.mark.parametrize(
    "payload,needle",
    [
        (np.random.default_rng(0).bytes(5000), "start code"),
        (b"\x00\x00\x00\x18ftypmp42" + bytes(200), "MP4"),
        (b"\x00\x00\x00\x01" + bytes(40_000), "no decodable H.264 frame"),
        (
            b"".join(b"\x00\x00\x00\x01" + bytes([0x65]) + np.random.default_rng(i).bytes(700) for i in range(60)),
            "failed to decode",
        ),
    ],
)
def test_garbage_h264_closes_with_an_error_and_the_next_stream_works(served, payload, needle):
    client, h, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="h264")
        for i in range(0, len(payload), 4096):
            ws.send_bytes(payload[i : i + 4096])
        for _ in range(10):  # the probe limit is 512 KiB: keep feeding zeros until refused
            ws.send_bytes(bytes(64 * 1024))
        err = _expect_error(ws, "bad_stream", 1007)
        assert needle in err["detail"]
    _still_works(client, h)


def test_bad_jpeg_frames_warn_then_close(served):
    client, h, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg")
        for i in range(2):  # stream_max_bad_frames = 2: warned about
            ws.send_bytes(b"\xff\xd8\xff\xe0 not a jpeg " + bytes([i]))
            warning = ws.receive_json()
            assert warning["type"] == "warning" and warning["frame"] == i and "not a decodable" in warning["detail"]
        ws.send_bytes(h.images[1].read_bytes())
        assert ws.receive_json()["results"][0]["id"] == 1
        ws.send_bytes(b"GIF89a....")  # wrong format on a jpeg stream: the third bad frame
        err = _expect_error(ws, "bad_stream", 1007)
        assert err["bad_frames"] == 3
    _still_works(client, h)


@pytest.mark.parametrize(
    "first,needle",
    [
        (b"\xff\xd8\xff", "JSON text"),
        ("not json", "bad hello"),
        ({"codec": "vp9"}, "codec"),
        ({"codec": "jpeg", "top_k": 0}, "top_k"),
        ({"codec": "jpeg", "top_k": 101}, "exceeds the maximum"),
        ({"codec": "jpeg", "fps": -1}, "fps"),
        ({"codec": "jpeg", "colour": "red"}, "colour"),
    ],
)
def test_bad_hello_is_a_policy_violation(served, first, needle):
    client, _, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        if isinstance(first, bytes):
            ws.send_bytes(first)
        else:
            ws.send_text(first if isinstance(first, str) else json.dumps(first))
        err = _expect_error(ws, "bad_hello" if needle != "JSON text" else "bad_hello", 1008)
        assert needle in err["detail"]


def test_no_hello_times_out(served):
    client, _, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        err = _expect_error(ws, "no_hello", 1008)
        assert "no hello" in err["detail"]


def test_protocol_errors_after_the_hello(served):
    client, h, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg")
        ws.send_text('{"type": "pause"}')
        _expect_error(ws, "bad_message", 1003)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg")
        ws.send_bytes(bytes(300 * 1024))
        err = _expect_error(ws, "message_too_large", 1009)
        assert "262144" in err["detail"]
    _still_works(client, h)


def test_service_errors_drop_the_frame_or_close_the_stream(served, monkeypatch):
    """The query service's typed errors, as a stream answers them: a full
    queue drops the frame (the stream goes on), a stopped batcher ends it (1013)."""
    client, h, _ = served
    batcher, metrics = client.app.state.batcher, client.app.state.metrics.registry
    labels = {"codec": "jpeg", "reason": "queue_full"}
    before = metrics.get_sample_value("vpr_stream_frames_dropped_total", labels) or 0

    def full(*a, **k):
        raise QueueFull("the model queue is full (64 items waiting)")

    monkeypatch.setattr(batcher, "submit", full)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg")
        ws.send_bytes(h.images[0].read_bytes())
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000 and msgs == [{"type": "end", "received": 1, "processed": 0, "dropped": 1, "bad_frames": 0}]
    assert metrics.get_sample_value("vpr_stream_frames_dropped_total", labels) == before + 1

    def stopped(*a, **k):
        raise BatcherStopped("the model runtime is not running")

    monkeypatch.setattr(batcher, "submit", stopped)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg")
        ws.send_bytes(h.images[0].read_bytes())
        err = _expect_error(ws, "shutting_down", 1013)
        assert "not running" in err["detail"]
    monkeypatch.undo()
    _still_works(client, h)


def test_client_disconnect_mid_stream(served):
    client, h, _ = served
    stream = encode_h264(frames_of(h.images[:3]), fps=10)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="h264")
        ws.send_bytes(stream[: len(stream) // 2])
    deadline = time.monotonic() + 10
    gauge = client.app.state.metrics.registry.get_sample_value
    while gauge("vpr_stream_connections") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gauge("vpr_stream_connections") == 0
    _still_works(client, h)


def test_client_sources_convert_mp4_to_annex_b(served):
    """The client's MP4 -> Annex-B path (h264_mp4toannexb) feeds the server."""
    client, h, root = served
    mp4 = encode_mp4(root / "route.mp4", frames_of(h.images[:4], repeat=3), fps=12)
    assert video_fps(mp4) == pytest.approx(12)
    chunks = list(h264_chunks(mp4))
    assert chunks[0][1].startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="h264", top_k=1, fps=12)
        for _, data in chunks:
            ws.send_bytes(data)
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000 and msgs[-1]["received"] == 12
    assert all(m["results"][0]["id"] == m["frame"] // 3 for m in results(msgs))


def test_gopro_walk_end_to_end(served, shared_dir):
    client, _, _ = served
    video = shared_dir / "videos" / "gopro_walk" / "walk.mp4"
    if not video.is_file():
        pytest.skip(f"{video} is not present")
    fps = video_fps(video)
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="h264", fps=fps)
        sent = 0
        for _, data in h264_chunks(video):
            ws.send_bytes(data)
            sent += len(data)
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000, msgs[-1]
    end = msgs[-1]
    assert end["received"] == 315 and end["bad_frames"] == 0  # every frame of the walk decoded
    got = results(msgs)
    assert got and end["processed"] == len(got) and end["processed"] + end["dropped"] == 315
    assert got[-1]["frame"] == 314 and got[-1]["time_s"] == pytest.approx(314 / fps, abs=1e-3)
    assert all(len(m["results"]) == 5 and m["latency_ms"] > 0 for m in got)


def test_stream_connection_limit(served, monkeypatch):
    client, h, _ = served
    monkeypatch.setattr(client.app.state.settings, "stream_max_connections", 1)
    with client.websocket_connect("/v1/stream") as first:
        start(first, codec="jpeg")
        with client.websocket_connect("/v1/stream") as second:
            err = _expect_error(second, "too_many_streams", 1013)
            assert "retry later" in err["detail"]
        first.send_bytes(h.images[2].read_bytes())
        assert first.receive_json()["results"][0]["id"] == 2
    _still_works(client, h)


# ---- every decodable frame gets an answer (issue 13) ------------------------------------------
def _jpeg(img, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_extreme_aspect_ratio_and_tiny_frames_are_answered(served):
    """A 1000x60 strip once closed the stream with 1011; every size gets a result."""
    from PIL import Image

    client, h, _ = served
    place = Image.open(h.images[5]).convert("RGB")
    sizes = [(1000, 60), (60, 1000), (1, 1), (2, 500), (15, 15)]
    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg", top_k=2)
        for i, size in enumerate(sizes):
            ws.send_bytes(_jpeg(place.resize(size)))
            msg = ws.receive_json()
            assert msg["type"] == "result" and msg["frame"] == i and len(msg["results"]) == 2, (size, msg)
        ws.send_bytes(h.images[5].read_bytes())
        assert ws.receive_json()["results"][0]["id"] == 5
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000 and msgs[-1]["processed"] == len(sizes) + 1 and msgs[-1]["bad_frames"] == 0


def test_a_frame_the_model_cannot_process_is_a_warning_and_the_stream_goes_on(served, monkeypatch):
    from concurrent.futures import Future

    from vpr.server.batcher import ItemFailed

    client, h, _ = served
    batcher = client.app.state.batcher

    def failing(*a, **k):
        f: Future = Future()
        f.set_exception(ItemFailed("the model could not process this input (RuntimeError: too small)"))
        return f

    with client.websocket_connect("/v1/stream") as ws:
        start(ws, codec="jpeg", top_k=1)
        monkeypatch.setattr(batcher, "submit", failing)
        for i in range(4):  # more than stream_max_bad_frames (2): not a bad stream
            ws.send_bytes(h.images[0].read_bytes())
            warning = ws.receive_json()
            assert warning["type"] == "warning" and warning["frame"] == i, warning
            assert warning["error"] == "unprocessable_image" and "too small" in warning["detail"]
        monkeypatch.undo()
        ws.send_bytes(h.images[2].read_bytes())
        assert ws.receive_json()["results"][0]["id"] == 2
        ws.send_text(json.dumps({"type": "end"}))
        msgs, code = read_all(ws)
    assert code == 1000 and msgs[-1] == {"type": "end", "received": 5, "processed": 1, "dropped": 4, "bad_frames": 0}
