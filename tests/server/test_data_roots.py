"""Data roots and place-image access: what the server may read from the disk.

By default only `$VPR_HOME/data` and `$VPR_HOME/demo` are data roots: rebuild
jobs index nothing else, and the place-image route serves nothing else and
only to whom `VPR_PLACE_IMAGES` allows, while an index built from a folder
elsewhere is still searched.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.server.support import Home, build_home, entries_for, place_images, wait_ready
from vpr.index.store import IndexStore
from vpr.model.registry import Registry
from vpr.server.app import create_app
from vpr.settings import ServerSettings

TOKEN = "data-roots-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    """Index `places` from a folder beside the home (as `vpr index build --images
    /data/photos` would make), index `demo` from the demo's own folder."""
    h = build_home(tmp_path_factory.mktemp("roots"))
    demo_images = place_images(h.home / "demo" / "route" / "database", 4, seed=3)
    teacher = Registry(h.home / "models").load(h.teacher)
    IndexStore(h.home / "indexes").build("demo", teacher, entries_for(demo_images), root=demo_images[0].parent)
    return h


@contextmanager
def serving(h: Home, **settings: object) -> Iterator[TestClient]:
    s = ServerSettings(home=h.home, model="student", device="cpu", warmup=False, decode_threads=2, **settings)  # type: ignore[arg-type]
    with TestClient(create_app(s)) as client:
        wait_ready(client)
        yield client


def test_data_roots_read_as_a_path_list_or_json(monkeypatch, tmp_path):
    """Like PATH (os.pathsep-separated) or a JSON list; unset or empty: the home's data and demo folders."""
    monkeypatch.setenv("VPR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPR_DATA_ROOTS", os.pathsep.join(["/data/photos", "~/pictures", ""]))
    assert ServerSettings().data_roots == [Path("/data/photos"), Path("~/pictures")]
    assert ServerSettings().resolved_data_roots() == [Path("/data/photos"), Path.home() / "pictures"]
    monkeypatch.setenv("VPR_DATA_ROOTS", '["/data/photos", "/srv/db"]')
    assert ServerSettings().data_roots == [Path("/data/photos"), Path("/srv/db")]
    monkeypatch.setenv("VPR_DATA_ROOTS", "/only")
    assert ServerSettings().data_roots == [Path("/only")]
    for unset in ("", "  "):
        monkeypatch.setenv("VPR_DATA_ROOTS", unset)
        home = (tmp_path / "home").resolve()
        assert ServerSettings().resolved_data_roots() == [home / "data", home / "demo"]
    monkeypatch.setenv("VPR_DATA_ROOTS", '["/a", ')
    with pytest.raises(ValidationError, match="not a JSON list"):
        ServerSettings()


def test_place_images_by_token_needs_a_token(tmp_path):
    with pytest.raises(ValidationError, match="needs an admin token"):
        ServerSettings(home=tmp_path, place_images="token")
    with pytest.raises(ValidationError, match="place_images"):
        ServerSettings(home=tmp_path, place_images="private")
    assert ServerSettings(home=tmp_path, place_images="token", admin_token=TOKEN).place_images == "token"


def test_an_index_from_elsewhere_is_searched_but_its_images_are_not_served(home):
    """The default roots do not hold the `places` images: search works, images are 403
    until VPR_DATA_ROOTS names their folder."""
    with serving(home, index="places") as client:
        r = client.post("/v1/query", content=home.images[3].read_bytes(), headers=JPEG)
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 3
        r = client.get("/v1/places/3/image")
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "VPR_DATA_ROOTS" in r.json()["detail"] and str(home.db) not in r.json()["detail"]
    with serving(home, index="places", data_roots=[home.db]) as client:
        r = client.get("/v1/places/3/image")
        assert r.status_code == 200 and r.content == home.images[3].read_bytes()


def test_the_demo_folder_is_a_default_root(home):
    with serving(home, index="demo") as client:
        r = client.get("/v1/places/2/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == (home.home / "demo" / "route" / "database" / "place02.jpg").read_bytes()


def test_place_image_access_is_a_setting(home):
    with serving(home, index="demo", place_images="token", admin_token=TOKEN) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.get("/v1/places/1/image", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", headers
        assert client.get("/v1/places/1/image", headers=AUTH).status_code == 200
        assert client.get("/v1/places/1/image", headers={"X-API-Key": TOKEN}).status_code == 200
    with serving(home, index="demo", place_images="off") as client:
        r = client.get("/v1/places/1/image")
        assert r.status_code == 404 and "VPR_PLACE_IMAGES" in r.json()["detail"]
        assert client.post("/v1/query", content=home.images[0].read_bytes(), headers=JPEG).status_code == 200


def test_rebuilds_read_only_under_the_default_roots(home, tmp_path):
    """Nothing outside $VPR_HOME/data and $VPR_HOME/demo by default, relative paths
    and links included; a folder under $VPR_HOME/data is indexed."""
    inside = home.home / "data" / "more"
    shutil.copytree(home.db, inside)
    (home.home / "data" / "escape").symlink_to(home.db, target_is_directory=True)
    (home.home / "data" / "mixed").mkdir()
    shutil.copy(home.images[0], home.home / "data" / "mixed" / "a.jpg")
    (home.home / "data" / "mixed" / "b.jpg").symlink_to(home.images[1])
    with serving(home, index="places", admin_token=TOKEN) as client:
        for folder in ("../../etc", "/etc", str(home.db), str(home.home / "data" / "escape"), str(home.home)):
            r = client.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": folder})
            assert r.status_code == 403 and "outside the data roots" in r.json()["detail"], (folder, r.text)
        r = client.post("/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(home.home / "data" / "mixed")})
        assert r.status_code == 403 and "b.jpg" in r.json()["detail"], r.text  # a link to a file elsewhere
        r = client.post(
            "/v1/admin/index/rebuild", headers=AUTH, json={"dataset": {"kind": "folder", "path": str(home.db)}}
        )
        assert r.status_code == 403, r.text
        r = client.post(
            "/v1/admin/index/rebuild", headers=AUTH, json={"folder": str(inside), "name": "more", "activate": False}
        )
        assert r.status_code == 202, r.text
        job = _finished(client, r.json()["job"])
        assert job["state"] == "succeeded" and job["result"]["count"] == len(home.images), job
        assert job["plan"]["images"] == len(home.images)


def _finished(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/admin/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")
