"""The versioned store models and indexes share: names, resolution, version
claiming under concurrency, the active pointer, leftovers of killed writers,
pruning. (What is a registry's or an index's own is tested with them.)"""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from vpr.model.store import MANIFEST_FILE, Ref, StoreError, VersionedStore, check_name


class ThingError(StoreError):
    pass


def make(root: Path, **kw) -> VersionedStore:
    return VersionedStore(root, "thing", error=ThingError, **kw)


def publish(store: VersionedStore, name: str, payload: str = "x") -> Ref:
    with store.stage(name) as tmp:
        (tmp / "payload.txt").write_text(payload)
        return store.publish(tmp, {"payload": payload})


def test_ref_prints_as_name_at_version():
    assert str(Ref("gp", 3)) == "gp@3" and Ref("gp", 3) == Ref("gp", 3)


@pytest.mark.parametrize("bad", ["", "..", "../x", ".hidden", "_x", "-x", "a/b", "a b", "x" * 65, "a@1"])
def test_bad_names_are_refused_before_touching_the_disk(tmp_path, bad):
    store = make(tmp_path / "things")
    for use in (store.versions, store.active, store.cleanup, lambda n: store.dir(Ref(n, 1))):
        with pytest.raises(ThingError, match=r"^bad thing name"):
            use(bad)
    with pytest.raises(ThingError, match=r"^bad thing name"), store.stage(bad):
        pass
    assert not (tmp_path / "things").exists()
    assert check_name("ok.name-1_x") == "ok.name-1_x"


def test_publish_claims_numbers_and_records_name_and_version(tmp_path):
    store = make(tmp_path)
    assert [publish(store, "a", p) for p in "xyz"] == [Ref("a", 1), Ref("a", 2), Ref("a", 3)]
    manifest = json.loads((tmp_path / "a" / "2" / MANIFEST_FILE).read_text())
    assert manifest == {"name": "a", "version": 2, "payload": "y"}
    assert (store.dir(Ref("a", 2)) / "payload.txt").read_text() == "y"
    assert store.names() == ["a"] and store.versions("a") == [1, 2, 3]
    assert store.read_manifest(Ref("a", 3))["payload"] == "z"


def test_resolve_rules(tmp_path):
    store = make(tmp_path / "things")
    with pytest.raises(ThingError, match=r"no thing named 'a' in .*things \(known: none\)"):
        store.resolve("a")
    publish(store, "a")
    publish(store, "a")
    publish(store, "b")
    assert store.resolve("a") == Ref("a", 2)  # no active version: the newest
    assert store.resolve("a@1") == Ref("a", 1) and store.resolve(Ref("a", 1)) == Ref("a", 1)
    assert store.activate("a@1") == Ref("a", 1)
    assert store.active("a") == Ref("a", 1) and store.resolve("a") == Ref("a", 1)
    with pytest.raises(ThingError, match=r"thing a@9 not found in .*things \(versions: a@1, a@2\)"):
        store.resolve("a@9")
    with pytest.raises(ThingError, match="bad version in 'a@x'"):
        store.resolve("a@x")
    with pytest.raises(ThingError, match=r"no thing named 'c' .*\(known: a, b\)"):
        store.resolve("c")
    with pytest.raises(ThingError, match=r"thing a@9 not found"):
        store.activate("a@9")
    assert store.active("a") == Ref("a", 1)  # a refused activation changes nothing


def test_without_latest_fallback_a_bare_name_needs_an_active_version(tmp_path):
    store = make(tmp_path, latest_if_inactive=False)
    publish(store, "a")
    with pytest.raises(ThingError, match="thing 'a' has no active version; activate one of a@1"):
        store.resolve("a")
    store.activate("a@1")
    assert store.resolve("a") == Ref("a", 1)


def test_only_folders_with_a_manifest_are_versions_and_stray_numbers_are_skipped(tmp_path):
    store = make(tmp_path)
    publish(store, "a")
    (tmp_path / "a" / "5").mkdir()  # a bare number: not a version, and its number is not reused
    (tmp_path / "empty").mkdir()  # a name without versions is not listed
    (tmp_path / ".work").mkdir()  # nor anything hidden
    assert store.versions("a") == [1] and store.names() == ["a"]
    assert publish(store, "a") == Ref("a", 6)


def test_corrupt_manifest_is_a_store_error(tmp_path):
    store = make(tmp_path)
    ref = publish(store, "a")
    (store.dir(ref) / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ThingError, match="corrupt manifest"):
        store.read_manifest(ref)


def test_a_failed_stage_leaves_nothing_and_is_undone(tmp_path):
    undone: list[str] = []
    store = make(tmp_path, discard=lambda d: undone.append((d / "payload.txt").read_text()))
    with pytest.raises(RuntimeError, match="boom"), store.stage("a") as tmp:
        (tmp / "payload.txt").write_text("outside state")
        raise RuntimeError("boom")
    assert undone == ["outside state"] and store.versions("a") == []
    assert [p.name for p in (tmp_path / "a").iterdir()] == [".lock"]
    # An error after publication (e.g. a failed activation) must not undo the published version.
    with pytest.raises(KeyboardInterrupt), store.stage("a") as tmp:
        (tmp / "payload.txt").write_text("published")
        store.publish(tmp, {})
        raise KeyboardInterrupt
    assert undone == ["outside state"] and store.versions("a") == [1]


def test_leftovers_of_killed_writers_are_removed_by_the_next_writer(tmp_path):
    undone: list[Path] = []
    store = make(tmp_path, discard=lambda d: undone.append(d))
    publish(store, "a")
    tmp = tmp_path / "a" / ".tmp-killed"  # a writer killed while staging
    tmp.mkdir()
    (tmp / "half").write_bytes(b"half")
    old = tmp_path / "a" / ".old-1-killed"  # a prune killed between rename and delete
    old.mkdir()
    assert store.versions("a") == [1] and store.resolve("a") == Ref("a", 1)  # never seen by readers
    assert publish(store, "a") == Ref("a", 2)
    assert not tmp.exists() and not old.exists()
    assert undone == [tmp]  # only an unpublished version has outside state to undo


def test_cleanup_of_every_name(tmp_path):
    store = make(tmp_path)
    for name in ("a", "b"):
        publish(store, name)
        (tmp_path / name / ".tmp-x").mkdir()
    assert store.cleanup() == 2 and store.cleanup("a") == 0
    assert make(tmp_path / "nothing").cleanup() == 0


def test_concurrent_writers_in_threads_get_distinct_versions(tmp_path):
    store = make(tmp_path)
    refs: list[Ref] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(5):
                refs.append(publish(store, "a", f"{i}-{j}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(r.version for r in refs) == list(range(1, 21)) == store.versions("a")
    payloads = {(store.dir(r) / "payload.txt").read_text() for r in refs}
    assert len(payloads) == 20  # each version holds what its writer staged


def test_claiming_by_rename_is_safe_without_the_lock(tmp_path):
    """Two folders published at once (as on a filesystem where flock does
    nothing) still land on distinct numbers: a rename onto a taken number fails."""
    store = make(tmp_path)
    publish(store, "a")
    base = tmp_path / "a"
    folders = []
    for i in range(8):
        d = base / f".tmp-race{i}"
        d.mkdir()
        (d / "payload.txt").write_text(str(i))
        folders.append(d)
    barrier = threading.Barrier(len(folders))
    refs: list[Ref] = []

    def go(d: Path) -> None:
        barrier.wait()
        refs.append(store.publish(d, {}))

    threads = [threading.Thread(target=go, args=(d,)) for d in folders]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r.version for r in refs) == list(range(2, 10)) == store.versions("a")[1:]
    for r in refs:
        assert store.read_manifest(r)["version"] == r.version


def _write_versions(root: str, n: int) -> None:
    store = VersionedStore(Path(root), "thing")
    for _ in range(n):
        publish(store, "a")


def test_concurrent_writers_in_processes_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_versions, args=(str(tmp_path), 4)) for _ in range(3)]
    [p.start() for p in procs]
    [p.join(60) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert make(tmp_path).versions("a") == list(range(1, 13))
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_activations_leave_one_valid_pointer(tmp_path):
    store = make(tmp_path)
    for _ in range(3):
        publish(store, "a")
    threads = [threading.Thread(target=lambda v=v: [store.activate(f"a@{v}") for _ in range(30)]) for v in (1, 2, 3, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert store.active("a") in {Ref("a", 1), Ref("a", 2), Ref("a", 3)}
    assert not [p for p in (tmp_path / "a").iterdir() if "tmp" in p.name]


def test_prune_keeps_the_newest_and_the_active_and_reports_what_went(tmp_path):
    store = make(tmp_path)
    for p in "abcde":
        publish(store, "n", p)
    store.activate("n@1")
    seen: list[list[dict]] = []
    removed = store.prune("n", keep=2, on_pruned=seen.append)
    assert removed == [Ref("n", 2), Ref("n", 3)] and store.versions("n") == [1, 4, 5]
    assert [m["payload"] for m in seen[0]] == ["b", "c"]
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == [".lock", "1", "4", "5", "active"]
    assert store.prune("n", keep=2) == [] and store.resolve("n") == Ref("n", 1)
    with pytest.raises(ValueError, match="keep at least one version"):
        store.prune("n", keep=0)
    assert publish(store, "n") == Ref("n", 6)  # numbers are never reused


def test_registry_and_index_store_errors_say_what_is_wrong_by_type(tmp_path):
    """Callers (the admin API) tell unknown from malformed by type, not by message."""
    from vpr.index.store import IndexNotFound, IndexStore, IndexStoreError
    from vpr.model.registry import ModelNotFound, Registry, RegistryError
    from vpr.model.store import BadSpec, NotFound

    reg, idx = Registry(tmp_path / "models"), IndexStore(tmp_path / "indexes")
    for store, family, unknown in ((reg, RegistryError, ModelNotFound), (idx, IndexStoreError, IndexNotFound)):
        with pytest.raises(unknown) as caught:
            store.resolve("nothing")
        assert isinstance(caught.value, family) and isinstance(caught.value, NotFound)
        with pytest.raises(NotFound):
            store.resolve("nothing@3")
        for bad in ("../x", "x@v1"):
            with pytest.raises(BadSpec) as caught:
                store.resolve(bad)
            assert isinstance(caught.value, family) and not isinstance(caught.value, NotFound)
