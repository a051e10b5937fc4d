"""Building from images with a real (tiny) registry model, resumably, and
the `vpr index` commands end to end."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CONFIG, random_images
from vpr.cli.main import main
from vpr.describe.describe import describe
from vpr.index.store import IndexMismatch, IndexStore
from vpr.model.network import build_model
from vpr.model.registry import Registry


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with a teacher, a student of it and an unrelated model, and a
    folder of database images."""
    base = tmp_path_factory.mktemp("world")
    home = base / "home"
    reg = Registry(home / "models")
    torch.manual_seed(0)
    reg.register("teacher", build_model(TINY_CONFIG), role="teacher")
    torch.manual_seed(1)
    reg.register("student", build_model(TINY_CONFIG), role="student", parent="teacher@1")
    other = {**TINY_CONFIG, "netvlad": {"clusters": 4}}
    reg.register("other", build_model(other), role="teacher")
    images = base / "db"
    random_images(images, 10, seed=4)
    return home, images


def test_build_describes_images_and_finds_each_one(world, tmp_path):
    home, images = world
    store = IndexStore(tmp_path / "indexes")
    teacher = Registry(home / "models").load("teacher@1")
    calls = []
    ref = store.build(
        "gp", teacher, sorted(images.glob("*.jpg")), images, batch_size=4, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (10, 10) and len(calls) >= 3
    index = store.load(ref, model=teacher)
    assert index.manifest["model"] == "teacher@1" and index.manifest["model_sha256"] == teacher.sha256
    assert index.dim == teacher.net.descriptor_dim == index.manifest["dim"]
    q = describe(teacher, sorted(images.glob("*.jpg"))[:4]).desc
    hits = index.search(q, 2)
    assert [h[0].meta["path"] for h in hits] == [f"img{i:03d}.jpg" for i in range(4)]
    assert all(h[0].score > 0.999 for h in hits)
    assert not list((store.root / ".work").iterdir()), "the work folder is removed once published"


def test_interrupted_description_resumes_from_its_chunks(world, tmp_path):
    home, images = world
    store = IndexStore(tmp_path / "indexes")
    store.settings.chunk_size = 3
    teacher = Registry(home / "models").load("teacher@1")
    paths = sorted(images.glob("*.jpg"))
    seen = []

    def dying(done, total):
        seen.append(done)
        if done >= 7:
            raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        store.build("gp", teacher, paths, images, batch_size=1, progress=dying)
    shards = sorted((store.root / ".work").rglob("shard-*/keys.npy"))
    kept = [len(np.load(k, allow_pickle=False)) for k in shards]
    assert kept == [3, 3]  # two finished chunks of 6 images; the 7th was in flight
    assert store.versions("gp") == []
    resumed = []
    store.build("gp", teacher, paths, images, batch_size=1, progress=lambda d, t: resumed.append(d))
    assert resumed[0] == 6 and resumed[-1] == 10 and len(resumed) == 5  # reported once, then 4 new images
    full = IndexStore(tmp_path / "clean")
    full.build("gp", teacher, paths, images)
    q = describe(teacher, paths[:5]).desc
    a, b = store.load("gp").search_ids(q, 3), full.load("gp").search_ids(q, 3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_undecodable_images_fail_clearly_or_are_skipped(world, tmp_path):
    home, images = world
    folder = tmp_path / "db"
    random_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    teacher = Registry(home / "models").load("teacher@1")
    store = IndexStore(tmp_path / "indexes")
    with pytest.raises(ValueError, match="broken.jpg: not a decodable image"):
        store.build("gp", teacher, sorted(folder.glob("*.jpg")), folder)
    ref = store.build("gp", teacher, sorted(folder.glob("*.jpg")), folder, skip_bad=True)
    assert store.load(ref).count == 3


def run(home: Path, *args: str) -> int:
    return main(["--home", str(home), "index", *map(str, args)])


def test_cli_build_list_show_search_add_remove_activate(world, tmp_path, capsys):
    home, images = world
    home = Path(home)
    assert run(home, "build", "--model", "teacher@1", "--name", "gp", "--images", images, "--factory", "HNSW8") == 0
    assert "built index gp@1 (active)" in capsys.readouterr().out
    assert run(home, "list") == 0
    out = capsys.readouterr().out
    assert "* gp@1" in out and "HNSW8" in out and "teacher@1" in out
    assert run(home, "show", "gp", "--verify", "--items", "2") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["count"] == 10 and shown["verified"] and len(shown["items"]) == 2
    query = images / "img003.jpg"
    assert run(home, "search", "gp", query, "-k", "3", "--json", "--param", "efSearch=32") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "teacher@1" and res["results"][0]["hits"][0]["path"] == "img003.jpg"
    # A student of the index's teacher may search it; an unrelated model may not.
    assert run(home, "search", "gp", query, "--model", "student@1") == 0
    assert "index gp@1, model student@1" in capsys.readouterr().out
    assert main(["--home", str(home), "index", "search", "gp", str(query), "--model", "other@1"]) == 2
    assert "neither that model nor a student of it" in capsys.readouterr().err
    # add more images (under the root), remove a place, roll back
    more = random_images(images / "more", 2, seed=9)
    try:
        assert run(home, "add", "gp", *more) == 0
        assert "index gp@2 written (active)" in capsys.readouterr().out
        assert run(home, "add", "gp", more[0]) == 2
        assert "already has 1 of these images" in capsys.readouterr().err
        assert run(home, "add", "gp", "--images", images, "--skip-existing") == 2
        assert "all 10 images are already in index gp@2" in capsys.readouterr().err
        assert run(home, "search", "gp", more[1], "-k", "1", "--json") == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["hits"][0]["path"] == "more/img001.jpg"
        assert run(home, "remove", "gp", "--label", "img003", "--path", "more/img000.jpg") == 0
        assert "gp@3" in capsys.readouterr().out
        assert IndexStore(home / "indexes").load("gp").count == 10
        assert run(home, "activate", "gp@1") == 0 and "active: gp@1" in capsys.readouterr().out
        assert run(home, "remove", "gp", "--id", "999") == 2
        assert "has no ids [999]" in capsys.readouterr().err
        assert (
            run(home, "build", "--model", "teacher@1", "--name", "gp2", "--images", images, "--factory", "IVF64,Flat")
            == 2
        )
        assert "needs at least 64 vectors to train, the database has 10" in capsys.readouterr().err
        assert run(home, "build", "--model", "teacher@1", "--name", "gp2", "--dataset", "nocolon") == 2
        assert "expected KIND:PATH" in capsys.readouterr().err
        assert run(home, "search", "gp", query, "--param", "nprobe") == 2
    finally:
        for p in more:
            p.unlink()
        (images / "more").rmdir()


def test_cli_dataset_items_are_converted_without_index_importing_train(world, tmp_path, monkeypatch, capsys):
    """`--dataset` goes through data.spec.DatasetSpec; any item with
    path/label/utm/utm_zone/latlon works (a stand-in reader here)."""
    from vpr.data.spec import DatasetSpec

    home, images = world

    @dataclass(frozen=True)
    class Item:
        path: Path
        label: str
        utm: tuple | None = None
        utm_zone: str | None = None
        latlon: tuple | None = None

    def open_fake(spec: DatasetSpec):
        assert spec.kind == "folder"
        db = [
            Item(p, f"place-{p.stem}", (100.0 + i, 200.0), "56J", (-27.5, 153.0))
            for i, p in enumerate(sorted(spec.path.glob("*.jpg")))
        ]
        return types.SimpleNamespace(name="fake", root=spec.path, database=db, queries=[], positives=[])

    monkeypatch.setattr(DatasetSpec, "open", open_fake)
    assert run(home, "build", "--model", "teacher@1", "--name", "ds", "--dataset", f"folder:{images}") == 0
    index = IndexStore(Path(home) / "indexes").load("ds")
    meta = index.meta([2])[2]
    assert (meta["label"], meta["utm_e"], meta["utm_zone"], meta["lat"]) == ("place-img002", 102.0, "56J", -27.5)
    assert index.manifest["root"] == str(images.resolve())
    assert "train" not in {m.split(".")[0] for m in _index_imports()}


def _index_imports() -> set[str]:
    """Top-level modules the index package's source imports."""
    import ast

    mods = set()
    for f in (Path(__file__).resolve().parents[2] / "index").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
    return mods


def test_student_search_is_checked_at_load(world, tmp_path):
    home, images = world
    reg = Registry(home / "models")
    store = IndexStore(tmp_path / "indexes")
    store.build("gp", reg.load("teacher@1"), sorted(images.glob("*.jpg"))[:4], images)
    assert store.load("gp", model=reg.load("student@1")).count == 4
    with pytest.raises(IndexMismatch, match="other@1 produces|neither that model"):
        store.load("gp", model=reg.load("other@1"))
