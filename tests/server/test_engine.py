"""The engine in the server: VPR_ENGINE picks it, /readyz and every answer report
it, an engine that cannot run here falls back with the reason, an unknown
name stops the server before it starts."""

from __future__ import annotations

import importlib.util

import pytest
from fastapi.testclient import TestClient

from tests.server.support import build_home, wait_ready
from vpr.model.engines import auto_engine
from vpr.model.registry import Registry
from vpr.server.app import create_app
from vpr.settings import ServerSettings

JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def served_home(tmp_path_factory):
    return build_home(tmp_path_factory.mktemp("engine"))


def settings(h, **kw) -> ServerSettings:
    return ServerSettings(home=h.home, model="student", device="cpu", decode_threads=1, **kw)


def test_readyz_and_answers_report_the_engine(served_home):
    h = served_home
    with TestClient(create_app(settings(h, engine="eager-fp32-cl"))) as client:
        ready = wait_ready(client)
        assert ready["engine"] == {
            "name": "eager-fp32-cl",
            "device": "cpu",
            "cache_kind": "cpu-eager-fp32-cl",
            "setting": "eager-fp32-cl",
            "note": None,
        }
        r = client.post("/v1/query", content=h.images[2].read_bytes(), headers=JPEG, params={"top_k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["engine"] == "eager-fp32-cl" and body["results"][0]["id"] == 2
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # fp32: the index's own numbers
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in h.images[:2]]
        assert client.post("/v1/query/batch", files=files).json()["engine"] == "eager-fp32-cl"


def test_auto_is_the_device_default(served_home, monkeypatch):
    monkeypatch.delenv("VPR_ENGINE")  # the suite pins eager fp32 (tests/conftest.py): this test is of the default
    h = served_home
    with TestClient(create_app(settings(h))) as client:
        engine = wait_ready(client)["engine"]
        assert engine["setting"] == "auto" and engine["name"] == auto_engine("cpu") and engine["note"] is None
        r = client.post("/v1/query", content=h.images[2].read_bytes(), headers=JPEG, params={"top_k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["engine"] == auto_engine("cpu") and body["results"][0]["id"] == 2
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-2)  # bf16 where it is the default


def test_a_missing_runtime_falls_back_with_the_reason(served_home, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with TestClient(create_app(settings(served_home, engine="onnx-fp32"))) as client:
        engine = wait_ready(client)["engine"]
        assert engine["name"] == auto_engine("cpu") and engine["setting"] == "onnx-fp32"
        assert "needs onnxruntime, which is not installed" in engine["note"] and "pip install" in engine["note"]
        r = client.post("/v1/query", content=served_home.images[0].read_bytes(), headers=JPEG)
        assert r.status_code == 200 and r.json()["engine"] == auto_engine("cpu")


def test_an_unknown_engine_stops_the_server(served_home):
    with pytest.raises(ValueError, match="unknown engine 'turbo'"):
        create_app(settings(served_home, engine="turbo"))


def test_the_onnx_engine_serves_the_registered_export(served_home):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (the optional onnx extra)")
    from vpr.model.export import export_model

    h = served_home
    entry = export_model(Registry(h.home / "models"), h.student, "onnx")
    with TestClient(create_app(settings(h, engine="onnx-fp32"))) as client:
        engine = wait_ready(client)["engine"]
        assert engine["name"] == "onnx-fp32" and engine["note"] is None
        assert engine["artifact_sha256"] == entry["sha256"] and engine["cache_kind"].endswith(entry["sha256"][:16])
        for i in (1, 4):
            r = client.post("/v1/query", content=h.images[i].read_bytes(), headers=JPEG)
            body = r.json()
            assert body["engine"] == "onnx-fp32" and body["results"][0]["id"] == i
            assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
