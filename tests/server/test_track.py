"""The tracker through the server: `track` in websocket results and in HTTP
answers of a session (`X-VPR-Session`), sessions' expiry, limits and isolation.

The served student has its teacher's weights, so a database image sent as a
query comes back first with score 1: walking the database images in order
is a walk along the route, and the tracked place must follow it."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.server.support import build_home, encode_h264, frames_of, wait_ready
from vpr.server.app import create_app
from vpr.server.sessions import Sessions
from vpr.settings import ServerSettings, TrackSettings

N_PLACES = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    h = build_home(tmp_path_factory.mktemp("track"), n_images=N_PLACES)
    settings = ServerSettings(
        home=h.home, model="student", device="cpu", decode_threads=2, track=TrackSettings(max_sessions=3)
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, h


def post(client, path, session: str | None = None, **params):
    headers = {"content-type": "image/jpeg"}
    if session is not None:
        headers["X-VPR-Session"] = session
    return client.post("/v1/query", content=path.read_bytes(), headers=headers, params=params)


def check_track(track: dict, frames: int) -> None:
    assert set(track) == {"id", "label", "path", "position", "confidence", "localized", "frames", "mode", "update_ms"}
    assert 0.0 <= track["confidence"] <= 1.0 and isinstance(track["localized"], bool)
    assert track["frames"] == frames and track["mode"] == "route"  # UTM positions along the id order
    assert track["update_ms"] >= 0


def test_stream_results_keep_results_and_add_track(served):
    client, h = served
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"codec": "jpeg", "top_k": 2}))
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["track"] is True
        for i in range(8):
            ws.send_bytes(h.images[i].read_bytes())
            msg = ws.receive_json()
            assert msg["type"] == "result" and len(msg["results"]) == 2  # the tracker's candidates stay inside
            assert msg["results"][0]["id"] == i
            check_track(msg["track"], i + 1)
            assert msg["track"]["id"] == i and msg["track"]["label"] == f"place {i}"
            assert msg["track"]["position"]["utm_e"] == pytest.approx(500_000.0 + 10 * i)
        assert msg["track"]["localized"]


def test_stream_hello_asks_for_frame_only_answers(served):
    client, h = served
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"codec": "jpeg", "track": False}))
        assert ws.receive_json()["track"] is False
        ws.send_bytes(h.images[0].read_bytes())
        msg = ws.receive_json()
        assert msg["type"] == "result" and msg["track"] is None and msg["results"][0]["id"] == 0


def test_h264_stream_is_tracked(served):
    client, h = served
    data = encode_h264(frames_of(h.images[:6]), fps=10)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"codec": "h264", "fps": 10}))
        assert ws.receive_json()["track"] is True
        ws.send_bytes(data)
        ws.send_text(json.dumps({"type": "end"}))
        msgs = []
        while True:
            m = ws.receive()
            if m["type"] == "websocket.close":
                break
            msgs.append(json.loads(m["text"]))
    res = [m for m in msgs if m["type"] == "result"]
    assert res, msgs
    for k, m in enumerate(res):  # dropped frames are not observed: `frames` counts processed ones
        check_track(m["track"], k + 1)
    assert res[-1]["track"]["id"] == res[-1]["frame"]


def test_http_session_gets_a_track_and_sessions_are_isolated(served):
    client, h = served
    for i in range(4):
        r = post(client, h.images[i], session="walk-a")
        assert r.status_code == 200, r.text
        check_track(r.json()["track"], i + 1)
        assert r.json()["track"]["id"] == i
    r = post(client, h.images[9], session="walk-b")  # another session starts afresh
    check_track(r.json()["track"], 1)
    assert r.json()["track"]["id"] == 9
    r = post(client, h.images[4], session="walk-a")  # and did not disturb the first
    check_track(r.json()["track"], 5)
    assert r.json()["track"]["id"] == 4


def test_the_tracker_sees_each_frame_descriptor_and_the_index_step(served):
    """Standing vs moving (`frame_motion`) needs the frame's own descriptor and the
    index's step similarity: both reach a session's tracker."""
    client, h = served
    for i in (5, 6):
        assert post(client, h.images[i], session="motion").status_code == 200
    service = client.app.state.service
    tracker = service.sessions._tracks["motion"].tracker
    index = client.app.state.runtime.current.index
    assert index.step is not None and tracker.profile.step == index.step
    assert tracker.last_desc is not None and tracker.last_desc.shape == (index.dim,)
    assert abs(float(tracker.last_desc.astype("float32") @ tracker.last_desc.astype("float32")) - 1.0) < 1e-2


def test_http_without_session_or_with_track_false_is_frame_only(served):
    client, h = served
    r = post(client, h.images[0])
    assert r.status_code == 200 and r.json()["track"] is None
    post(client, h.images[0], session="quiet")
    r = post(client, h.images[1], session="quiet", track="false")
    assert r.status_code == 200 and r.json()["track"] is None
    r = post(client, h.images[2], session="quiet")
    check_track(r.json()["track"], 2)  # the frame-only request did not update the session


def test_bad_session_id_is_refused(served):
    client, h = served
    r = post(client, h.images[0], session="no spaces/or slashes")
    assert r.status_code == 400 and r.json()["error"] == "bad_session"
    r = post(client, h.images[0], session="x" * 129)
    assert r.status_code == 400 and r.json()["error"] == "bad_session"


def test_sessions_are_bounded_and_expire(served):
    client, h = served
    sessions: Sessions = client.app.state.service.sessions
    now = [1000.0]
    sessions.clock = lambda: now[0]
    sessions._tracks.clear()
    for name in ("s1", "s2", "s3"):
        post(client, h.images[0], session=name)
    post(client, h.images[1], session="s1")  # s1 is now the most recently used
    r = post(client, h.images[0], session="s4")  # full (max 3): s2, the least recently used, goes
    assert len(sessions) == 3 and set(sessions._tracks) == {"s3", "s1", "s4"}
    r = post(client, h.images[2], session="s1")
    check_track(r.json()["track"], 3)  # kept
    r = post(client, h.images[1], session="s2")
    check_track(r.json()["track"], 1)  # forgotten: starts again
    now[0] += sessions.settings.session_idle_s + 1  # everyone idle too long
    r = post(client, h.images[3], session="s1")
    check_track(r.json()["track"], 1)
    assert len(sessions) == 1 and sessions.expired >= 3
    # memory: each session's belief is bounded by the support setting
    for i in range(N_PLACES):
        post(client, h.images[i], session="s1")
    assert sessions.nbytes < 3 * 64 * (sessions.settings.support + 8) * 8


def test_tracking_off_server_wide(tmp_path):
    h = build_home(tmp_path, n_images=4)
    settings = ServerSettings(home=h.home, model="student", device="cpu", track=TrackSettings(enabled=False))
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = post(client, h.images[0], session="s")
        assert r.status_code == 200 and r.json()["track"] is None
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({"codec": "jpeg"}))
            assert ws.receive_json()["track"] is False
            ws.send_bytes(h.images[1].read_bytes())
            assert ws.receive_json()["track"] is None


def test_openapi_documents_the_session_header(served):
    client, _ = served
    schema = client.get("/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/v1/query"]["post"]["parameters"]}
    assert (
        params["X-VPR-Session"]["in"] == "header"
        and "VPR_TRACK_SESSION_IDLE_S" in params["X-VPR-Session"]["description"]
    )
    assert params["track"]["in"] == "query"
    assert "track" in schema["components"]["schemas"]["QueryResponse"]["properties"]
