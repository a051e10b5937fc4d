"""HTTP query routes, probes, metrics and every bad input, against the real app
on a tiny registered model and index (see support.py)."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.server.support import build_home, image_bytes, wait_ready
from vpr.server.app import create_app
from vpr.server.batcher import QueueFull
from vpr.settings import ServerSettings

TOKEN = "test-admin-token-0123456789"
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    h = build_home(tmp_path_factory.mktemp("server"))
    settings = ServerSettings(
        home=h.home,
        model="student",
        device="cpu",
        max_body_bytes=256 * 1024,
        max_batch_body_bytes=1 << 20,
        max_batch_files=4,
        max_pixels=100_000,
        decode_threads=2,
        top_k_max=20,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, h


def test_probes_and_docs(served):
    client, h = served
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["state"] == "ready"
    assert ready["model"] == h.student and ready["index"] == h.index and ready["index_size"] == 8
    spec = client.get("/openapi.json").json()
    assert {"/v1/query", "/v1/query/batch", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "image/jpeg" in spec["paths"]["/v1/query"]["post"]["requestBody"]["content"]
    for path in ("/v1/query", "/v1/query/batch"):  # this server's own limits (top_k_max=20)
        (top_k,) = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "top_k"]
        assert top_k["description"] == "matches to return (1..20)"
        assert top_k["schema"] == {**top_k["schema"], "type": "integer", "minimum": 1, "maximum": 20, "default": 5}
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("i", [0, 5])
def test_query_raw_jpeg_finds_itself(served, i):
    client, h = served
    r = client.post("/v1/query", content=h.images[i].read_bytes(), headers=JPEG, params={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == h.student and body["index"] == h.index and body["top_k"] == 3
    res = body["results"]
    assert [m["rank"] for m in res] == [1, 2, 3]
    assert res[0]["id"] == i and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert res[0]["score"] > res[1]["score"] >= res[2]["score"]
    assert res[0]["label"] == f"place {i}" and res[0]["path"] == h.images[i].name
    pos = res[0]["position"]
    assert pos["utm_e"] == pytest.approx(500_000.0 + 10 * i) and pos["utm_zone"] == "56H"
    assert pos["lat"] == pytest.approx(-27.47 + i * 1e-4)
    t = body["timings_ms"]
    assert set(t) == {"decode", "queue", "embed", "search", "total"}
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["embed"]


def test_query_multipart_png_webp_and_default_top_k(served):
    client, h = served
    r = client.post("/v1/query", files={"file": ("q.png", image_bytes(h.images[2], "PNG"), "image/png")})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 5  # the default
    assert r.json()["results"][0]["id"] == 2
    r = client.post("/v1/query", content=image_bytes(h.images[3], "WEBP"), headers={"content-type": "image/webp"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 3
    # a multipart part sent as octet-stream is sniffed
    r = client.post("/v1/query", files={"image": ("x", h.images[4].read_bytes(), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 4


def test_top_k_larger_than_the_index_returns_everything(served):
    client, h = served
    r = client.post("/v1/query", content=h.images[1].read_bytes(), headers=JPEG, params={"top_k": 20})
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["results"]]
    assert sorted(ids) == list(range(8))


@pytest.mark.parametrize("top_k", ["0", "-3", "21", "abc", "2.5"])
def test_bad_top_k_is_422(served, top_k):
    client, h = served
    r = client.post("/v1/query", content=h.images[0].read_bytes(), headers=JPEG, params={"top_k": top_k})
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request" and "top_k" in r.json()["detail"]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "ctype,data",
    [
        ("text/plain", b"hello"),
        ("application/octet-stream", b"\xff\xd8\xff\xe0"),
        (None, b"\xff\xd8\xff\xe0"),
        ("image/gif", _gif()),
        ("image/jpeg", _gif()),  # the bytes are a GIF whatever the header says
        ("application/json", b'{"image": 1}'),
    ],
)
def test_unsupported_media_type_is_415(served, ctype, data):
    client, _ = served
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/v1/query", content=data, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type" and "image/jpeg" in r.json()["detail"]


def test_unsupported_part_type_is_415(served):
    client, _ = served
    r = client.post("/v1/query", files={"file": ("a.gif", _gif(), "image/gif")})
    assert r.status_code == 415 and "a.gif" in r.json()["detail"]


def test_corrupt_truncated_and_empty_images_are_400(served):
    client, h = served
    jpeg = h.images[0].read_bytes()
    for data, ctype in [
        (jpeg[: len(jpeg) // 2], "image/jpeg"),
        (jpeg[:40], "image/jpeg"),
        (np.random.default_rng(0).bytes(3000), "image/png"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "image/png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    ]:
        r = client.post("/v1/query", content=data, headers={"content-type": ctype})
        assert r.status_code == 400, (ctype, r.text)
        assert r.json()["error"] == "bad_image" and "not a decodable image" in r.json()["detail"]
    r = client.post("/v1/query", content=b"", headers=JPEG)
    assert r.status_code == 400 and r.json()["error"] == "empty_body"


def test_multipart_problems_are_400(served):
    client, h = served
    two = [
        ("a", ("a.jpg", h.images[0].read_bytes(), "image/jpeg")),
        ("b", ("b.jpg", h.images[1].read_bytes(), "image/jpeg")),
    ]
    r = client.post("/v1/query", files=two)
    assert r.status_code == 400 and "exactly one" in r.json()["detail"]
    r = client.post(
        "/v1/query", content=b"--xyz\r\nnot really\r\n", headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert r.status_code == 400
    r = client.post("/v1/query", content=b"whatever", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"].lower()
    r = client.post("/v1/query", data={"top_k": "3"}, files={"file": ("e.jpg", b"", "image/jpeg")})
    assert r.status_code == 400


def test_body_over_limit_is_413_declared_or_not(served):
    client, _ = served
    big = b"\xff\xd8\xff" + b"\0" * (300 * 1024)
    r = client.post("/v1/query", content=big, headers=JPEG)  # Content-Length declared
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # no Content-Length: chunked transfer, counted as received
        for _ in range(40):
            yield b"\0" * 16 * 1024

    r = client.post("/v1/query", content=chunks(), headers=JPEG)
    assert r.status_code == 413 and "exceeds the limit of 262144" in r.json()["detail"]
    r = client.post("/v1/query", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG that declares a huge canvas (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_413(served):
    client, _ = served
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), "gray").save(buf, format="PNG")  # 160k pixels > 100k, few bytes
    r = client.post("/v1/query", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"] == "image_too_large" and "400x400" in r.json()["detail"]
    r = client.post("/v1/query", content=_png_header_only(50_000, 50_000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"] == "image_too_large"
    r = client.post("/v1/query", content=_png_header_only(1000, 1000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "1000x1000" in r.json()["detail"]


def test_batch_query(served):
    client, h = served
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in h.images[:3]]
    r = client.post("/v1/query/batch", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == h.student and body["index"] == h.index and body["top_k"] == 2
    assert [it["results"][0]["id"] for it in body["items"]] == [0, 1, 2]
    assert all(len(it["results"]) == 2 and h.images[i].name in it["file"] for i, it in enumerate(body["items"]))
    assert all(it["timings_ms"]["embed"] >= 0 for it in body["items"])


def test_batch_errors(served):
    client, h = served
    good = ("files", ("ok.jpg", h.images[0].read_bytes(), "image/jpeg"))
    r = client.post("/v1/query/batch", content=h.images[0].read_bytes(), headers=JPEG)
    assert r.status_code == 415
    r = client.post("/v1/query/batch", files=[good] * 5)  # max_batch_files = 4
    assert r.status_code == 400 and "Too many files" in r.json()["detail"]
    r = client.post("/v1/query/batch", data={"a": "b"}, files=[])
    assert r.status_code in (400, 415)


def test_queue_full_is_503_with_retry_after(served, monkeypatch):
    client, h = served

    def full(*a, **k):
        raise QueueFull("the model queue is full (64 items waiting)")

    monkeypatch.setattr(client.app.state.batcher, "submit", full)
    r = client.post("/v1/query", content=h.images[0].read_bytes(), headers=JPEG)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded"


def test_metrics_count_routes_statuses_and_versions(served):
    client, h = served
    client.post("/v1/query", content=b"x", headers={"content-type": "text/plain"})
    client.post("/v1/query", content=h.images[0].read_bytes(), headers=JPEG)
    text = client.get("/metrics").text
    assert re.search(r'vpr_http_requests_total\{method="POST",route="/v1/query",status="415"\} [1-9]', text)
    assert re.search(r'vpr_http_requests_total\{method="POST",route="/v1/query",status="200"\} [1-9]', text)
    assert 'vpr_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/query",status="200"}' in text
    assert "vpr_index_size 8.0" in text and "vpr_ready 1.0" in text
    assert f'vpr_active_version_info{{kind="model",version="{h.student}"}} 1.0' in text
    assert f'vpr_active_version_info{{kind="index",version="{h.index}"}} 1.0' in text
    assert re.search(r'vpr_query_stage_seconds_count\{stage="embed"\} [1-9]', text)
    assert "vpr_stream_frames_dropped_total" in text and "vpr_model_batch_size_bucket" in text
    # unknown paths do not create a label per path
    client.get("/no/such/path/123")
    assert "/no/such/path" not in client.get("/metrics").text


def test_admin_routes_are_off_without_a_token(served):
    client, _ = served
    assert client.get("/v1/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert client.post("/v1/admin/index/rebuild", json={}).status_code == 404


def test_every_error_type_has_its_own_http_answer():
    """Each typed error maps to one status (the most specific type wins); 503s
    say when to retry, 401s how to authenticate."""
    from vpr.server import errors as e
    from vpr.server.inputs import BodyTooLarge

    expected = {
        e.BadRequest: 400,
        e.BadImage: 400,
        e.Unauthorized: 401,
        e.Forbidden: 403,
        e.NotFound: 404,
        e.RequestTimeout: 408,
        e.Conflict: 409,
        e.TooLarge: 413,
        e.UnsupportedMedia: 415,
        e.InvalidRequest: 422,
        e.Unavailable: 503,
        e.NotReady: 503,
        e.Overloaded: 503,
        e.ShuttingDown: 503,
        e.QueryTimeout: 504,
    }
    kinds = {v for v in vars(e).values() if isinstance(v, type) and issubclass(v, e.ApiError) and v is not e.ApiError}
    assert kinds == set(expected)
    for kind, status in expected.items():
        assert e.http_status(kind("why")) == status, kind
    assert e.http_status(BodyTooLarge(10)) == 413 and BodyTooLarge(10).code == "body_too_large"
    assert e.http_headers(e.Overloaded("full"), 7) == {"Retry-After": "7"}
    assert e.http_headers(e.Unauthorized("no"), 7)["WWW-Authenticate"].startswith("Bearer")
    assert e.http_headers(e.NotFound("gone"), 7) == {}
    assert e.NotReady("x").code == "not_ready" and e.TooLarge("x", code="image_too_large").code == "image_too_large"


# ---- a server with nothing to serve ----------------------------------------------------
def test_empty_home_starts_not_ready_with_a_reason(tmp_path):
    app = create_app(ServerSettings(home=tmp_path / "empty", device="cpu"))
    with TestClient(app) as client:
        for _ in range(200):
            r = client.get("/readyz")
            if r.json()["state"] == "not_ready":
                break
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "no index" in r.json()["reason"]
        assert client.get("/healthz").status_code == 200
        q = client.post("/v1/query", content=b"\xff\xd8\xff", headers=JPEG)
        assert q.status_code == 503 and q.json()["error"] == "not_ready" and "no index" in q.json()["detail"]
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({"codec": "jpeg"}))
            msg = ws.receive_json()
            assert msg["type"] == "error" and msg["error"] == "not_ready" and msg["close_code"] == 1013
        assert "vpr_ready 0.0" in client.get("/metrics").text


# ---- settings ---------------------------------------------------------------------------------
def test_settings_env_overrides_and_token_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VPR_TOP_K_MAX", "7")
    monkeypatch.setenv("VPR_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("VPR_HOME", str(tmp_path / "h"))
    s = ServerSettings()
    assert s.top_k_max == 7 and s.max_batch_size == 3 and s.home == tmp_path / "h"
    assert s.jobs_dir == tmp_path / "h" / "jobs" and s.resolved_admin_token() is None
    token_file = tmp_path / "token"
    token_file.write_text("  file-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("VPR_ADMIN_TOKEN_FILE", str(token_file))
    assert ServerSettings().resolved_admin_token() == "file-token-0123456789abcdef"
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServerSettings().resolved_admin_token()
    monkeypatch.setenv("VPR_ADMIN_TOKEN", "x" * 20)
    with pytest.raises(ValueError, match="not both"):
        ServerSettings()
    monkeypatch.delenv("VPR_ADMIN_TOKEN_FILE")
    with pytest.raises(ValueError, match="device"):
        ServerSettings(device="tpu")
    with pytest.raises(ValueError, match="top_k_default"):
        ServerSettings(top_k_default=9, top_k_max=5)
    monkeypatch.setenv("VPR_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("VPR_ADMIN_TOKEN")
    with pytest.raises(ValueError, match="cannot read the admin token file"):
        create_app(ServerSettings())


# ---- the model runtime ------------------------------------------------------------------------
def test_micro_batching_and_the_bounded_queue(served):
    """Items that wait while the model is busy run as one batch; a full queue
    refuses at once; stopping fails what is still queued."""
    from tests.server.support import gated
    from vpr.server.batcher import BatcherStopped, MicroBatcher
    from vpr.server.serving import Serving

    client, h = served
    rt, service = client.app.state.runtime, client.app.state.service
    cur = rt.current
    model, net = gated(cur.model)
    serving = Serving(model, cur.index, rt.device)
    xs = [service.decode(serving, p.read_bytes(), p.name).tensor for p in h.images[:5]]
    wide = service.decode(serving, image_bytes(h.images[5], "PNG"), "png").tensor[:, :, :80]  # another shape
    b = MicroBatcher(max_batch_size=8, max_wait_ms=0, queue_size=4)
    b.start()
    try:
        first = b.submit(xs[0], serving, 2)
        assert net.entered.wait(10)  # the worker is inside the forward pass of [x0]
        waiting = [b.submit(x, serving, 1) for x in xs[1:4]] + [b.submit(wide, serving, 1)]
        with pytest.raises(QueueFull):
            b.submit(xs[4], serving, 1)
        net.gate.set()
        a0 = first.result(30)
        answers = [f.result(30) for f in waiting]
    finally:
        net.gate.set()
        b.stop()
    assert a0.batch_size == 1 and [hit.id for hit in a0.hits][:1] == [0] and len(a0.hits) == 2
    assert [a.batch_size for a in answers] == [3, 3, 3, 1]  # same-shaped items shared one forward pass
    assert [a.hits[0].id for a in answers[:3]] == [1, 2, 3] and len(answers[0].hits) == 1
    assert all(a.queue_ms > 0 and a.embed_ms > 0 for a in answers)
    with pytest.raises(BatcherStopped):
        b.submit(xs[0], serving, 1)


def test_serving_selection(served, tmp_path):
    """Without settings: the active version of the newest student compatible with the only index."""
    import shutil

    from vpr.index.store import IndexStore
    from vpr.server.errors import NotReady
    from vpr.server.runtime import Runtime

    _, h = served
    home = tmp_path / "copy"
    shutil.copytree(h.home / "models", home / "models")
    shutil.copytree(h.home / "indexes", home / "indexes")
    rt = Runtime(ServerSettings(home=home, device="cpu"))
    assert rt.select() == (h.student, "places")  # student@1 is the active version
    assert Runtime(ServerSettings(home=home, device="cpu", model=h.teacher)).select() == (h.teacher, "places")
    # a second index: ambiguous unless the model narrows it down or one is named
    m = rt.registry.manifest(h.other)
    IndexStore(home / "indexes").build_from_descriptors(
        "others", np.eye(2, m["descriptor_dim"], dtype=np.float32), h.images[:2], h.db, m
    )
    with pytest.raises(NotReady, match="several indexes"):
        rt.select()
    assert Runtime(ServerSettings(home=home, device="cpu", model=h.other)).select() == (h.other, "others")
    assert Runtime(ServerSettings(home=home, device="cpu", index="places")).select() == (h.student, "places")
    rt = Runtime(ServerSettings(home=home, device="cpu", index="places", model=h.other))
    assert not rt.load() and rt.current is None and "neither that model nor a student" in rt.status.reason


# ---- every decodable image gets an answer (issue 13) ------------------------------------------
def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1000, 60), (60, 1000), (1, 1), (1, 300), (300, 2), (15, 15)])
@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_extreme_sizes_and_aspect_ratios_get_an_answer(served, size, fmt, ctype):
    client, h = served
    img = Image.open(h.images[2]).convert("RGB").resize(size)
    r = client.post("/v1/query", content=_encoded(img, fmt), headers={"content-type": ctype}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


def test_exif_rotated_photo_finds_its_place_like_the_upright_one(served):
    """A phone stores the pixels sideways with orientation 6: same answer as upright."""
    client, h = served
    upright = Image.open(h.images[4]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _encoded(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    want = client.post("/v1/query", content=_encoded(upright, "PNG"), headers={"content-type": "image/png"}).json()
    got = client.post("/v1/query", content=sideways, headers={"content-type": "image/png"})
    assert got.status_code == 200, got.text
    assert got.json()["results"] == want["results"] and want["results"][0]["id"] == 4


def test_transparent_sixteen_bit_cmyk_and_animated_images_are_answered(served):
    client, h = served
    rgb = Image.open(h.images[1]).convert("RGB")
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    frames = [rgb, Image.new("RGB", rgb.size, "blue")]
    cases = {
        "rgba": (_encoded(rgb.convert("RGBA"), "PNG"), "image/png"),
        "palette+transparency": (_encoded(rgb.convert("P"), "PNG", transparency=0), "image/png"),
        "la": (_encoded(rgb.convert("LA"), "PNG"), "image/png"),
        "16-bit": (_encoded(grey16, "PNG"), "image/png"),
        "cmyk": (_encoded(rgb.convert("CMYK"), "JPEG", quality=95), "image/jpeg"),
        "apng": (_encoded(rgb, "PNG", save_all=True, append_images=frames[1:]), "image/png"),
        "animated webp": (_encoded(rgb, "WEBP", save_all=True, append_images=frames[1:], lossless=True), "image/webp"),
    }
    for name, (data, ctype) in cases.items():
        r = client.post("/v1/query", content=data, headers={"content-type": ctype})
        assert r.status_code == 200, (name, r.text)
        if name in ("rgba", "apng", "animated webp"):  # the same pixels as the place itself
            assert r.json()["results"][0]["id"] == 1 and r.json()["results"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_bomb_error_quotes_the_configured_limit(served):
    client, _ = served
    r = client.post("/v1/query", content=_png_header_only(60_000, 60_000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "limit of 100000" in r.json()["detail"]
    assert "178956970" not in r.json()["detail"] and "3600000000" in r.json()["detail"]


def test_top_k_as_a_form_field_and_as_answered(served):
    client, h = served
    jpeg = ("q.jpg", h.images[0].read_bytes(), "image/jpeg")
    r = client.post("/v1/query", data={"top_k": "2"}, files={"file": jpeg})
    assert r.status_code == 200 and len(r.json()["results"]) == 2 and r.json()["top_k"] == 2
    r = client.post("/v1/query/batch", data={"top_k": "3"}, files=[("files", jpeg), ("files", jpeg)])
    assert r.status_code == 200 and r.json()["top_k"] == 3
    assert [len(it["results"]) for it in r.json()["items"]] == [3, 3]
    # both places: they must agree
    r = client.post("/v1/query", data={"top_k": "2"}, files={"file": jpeg}, params={"top_k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/v1/query", data={"top_k": "2"}, files={"file": jpeg}, params={"top_k": 4})
    assert r.status_code == 422 and "top_k" in r.json()["detail"]
    for bad in ("0", "21", "x", "2.5"):
        r = client.post("/v1/query", data={"top_k": bad}, files={"file": jpeg})
        assert r.status_code == 422 and "top_k" in r.json()["detail"], bad
    r = client.post("/v1/query", data={"topk": "2"}, files={"file": jpeg})
    assert r.status_code == 400 and "topk" in r.json()["detail"]
    # more than the index holds: the reply says how many it could give
    r = client.post("/v1/query", content=h.images[1].read_bytes(), headers=JPEG, params={"top_k": 20})
    assert len(r.json()["results"]) == 8 and r.json()["top_k"] == 8
    r = client.post("/v1/query/batch", files=[("files", jpeg)], params={"top_k": 20})
    assert r.json()["top_k"] == 8 and len(r.json()["items"][0]["results"]) == 8


def test_batch_answers_each_item(served):
    """Bad items get their own error; the good ones their results."""
    client, h = served
    big = io.BytesIO()
    Image.new("RGB", (400, 400), "gray").save(big, format="PNG")
    ok0 = ("files", ("ok0.jpg", h.images[0].read_bytes(), "image/jpeg"))
    files = [
        ok0,
        ("files", ("broken.jpg", b"\xff\xd8\xff\xe0junk", "image/jpeg")),
        ("files", ("big.png", big.getvalue(), "image/png")),
        ("files", ("ok3.jpg", h.images[3].read_bytes(), "image/jpeg")),
    ]
    r = client.post("/v1/query/batch", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"]
    assert [it["file"].split(":")[1] for it in items] == ["ok0.jpg", "broken.jpg", "big.png", "ok3.jpg"]
    assert body["failed"] == 2
    assert items[0]["results"][0]["id"] == 0 and items[3]["results"][0]["id"] == 3 and items[0]["error"] is None
    assert items[0]["timings_ms"]["embed"] >= 0 and len(items[3]["results"]) == 2
    errors = [(it["error"]["error"], it["error"]["status"]) for it in items[1:3]]
    assert errors == [("bad_image", 400), ("image_too_large", 413)]
    assert all(it["results"] == [] and it["timings_ms"] is None for it in items[1:3])
    assert "broken.jpg" in items[1]["error"]["detail"]
    r = client.post("/v1/query/batch", files=[("files", ("anim.gif", _gif(), "image/gif")), ok0])
    assert r.status_code == 200 and r.json()["failed"] == 1
    assert r.json()["items"][0]["error"]["status"] == 415 and r.json()["items"][1]["results"][0]["id"] == 0
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"error", "timings_ms"} <= set(schema["BatchItem"]["properties"]) and "failed" in schema["BatchResponse"][
        "properties"
    ]


class PoisonNet(torch.nn.Module):
    """Wraps a VPRNet; a batch holding any NaN input fails, like a forward pass
    that cannot take one of its inputs."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = net, net.config

    @property
    def descriptor_dim(self) -> int:
        return self.inner.descriptor_dim

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if torch.isnan(x).any():
            raise RuntimeError("Output size is too small")
        return self.inner(x, return_features=return_features)


def test_one_failing_item_does_not_fail_its_batch_mates(served):
    """The batch [good, poison, good] fails as a whole; each item is retried
    alone, so only the poisoned one gets an error (ItemFailed -> 400)."""
    from tests.server.support import gated
    from vpr.model.registry import LoadedModel
    from vpr.server.batcher import ItemFailed, MicroBatcher
    from vpr.server.serving import Serving

    client, h = served
    rt, service = client.app.state.runtime, client.app.state.service
    cur = rt.current
    poison_model = LoadedModel(cur.model.ref, PoisonNet(cur.model.net), cur.model.manifest)
    model, net = gated(poison_model)
    serving = Serving(model, cur.index, rt.device)
    xs = [service.decode(serving, p.read_bytes(), p.name).tensor for p in h.images[:4]]
    bad = torch.full_like(xs[0], float("nan"))
    b = MicroBatcher(max_batch_size=8, max_wait_ms=0, queue_size=8)
    b.start()
    try:
        first = b.submit(xs[0], serving, 1)
        assert net.entered.wait(10)  # the next three wait together behind it
        waiting = [b.submit(x, serving, 1) for x in (xs[1], bad, xs[2])]
        net.gate.set()
        assert first.result(30).hits[0].id == 0
        one, two = waiting[0].result(30), waiting[2].result(30)
        with pytest.raises(ItemFailed, match="could not process"):
            waiting[1].result(30)
    finally:
        net.gate.set()
        b.stop()
    assert (one.hits[0].id, two.hits[0].id) == (1, 2)
    assert one.batch_size == two.batch_size == 1  # answered alone after the batch failed


def test_an_item_the_model_cannot_process_is_a_400_and_the_server_goes_on(served, monkeypatch):
    from concurrent.futures import Future

    from vpr.server.batcher import ItemFailed

    client, h = served

    def failing(*a, **k):
        f: Future = Future()
        f.set_exception(ItemFailed("the model could not process this input (RuntimeError: too small)"))
        return f

    monkeypatch.setattr(client.app.state.batcher, "submit", failing)
    r = client.post("/v1/query", content=h.images[0].read_bytes(), headers=JPEG)
    assert r.status_code == 400 and r.json()["error"] == "unprocessable_image" and "too small" in r.json()["detail"]
    monkeypatch.undo()
    assert client.post("/v1/query", content=h.images[0].read_bytes(), headers=JPEG).json()["results"][0]["id"] == 0


def test_bytes_are_decoded_only_as_the_format_their_signature_announces(served):
    """A multi-picture JPEG (a camera's MPO) is a JPEG; a file that starts like a
    JPEG but is not one is a bad image, never retried with another decoder."""
    client, h = served
    place = Image.open(h.images[7]).convert("RGB")
    mpo = _encoded(place, "MPO", save_all=True, append_images=[place.rotate(90)], quality=95)
    r = client.post("/v1/query", content=mpo, headers=JPEG)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 7
    tga = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(tga, format="TGA")
    r = client.post("/v1/query", content=b"\xff\xd8\xff" + tga.getvalue()[3:], headers=JPEG)
    assert r.status_code == 400 and r.json()["error"] == "bad_image"
