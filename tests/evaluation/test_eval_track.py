"""`vpr eval --track`: each query folder a sequence through the tracker, `track_recall` in the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.evaluation.worlds import route_and_teacher
from vpr.cli.main import main
from vpr.data.datasets import Item, PlaceDataset
from vpr.evaluation.evaluate import NOT_FOUND, database_hubness, query_sequences, recall_from_ranks, tracked_ranks
from vpr.settings import TrackSettings

TINY_CONFIG = {
    "backbone": {"name": "resnet18", "cut": "layer3"},
    "netvlad": {"clusters": 8},
    "preprocess": {"mode": "imagenet", "max_side": 96},
}


def walk_dataset(n: int, queries: list[Item]) -> PlaceDataset:
    db = [Item(Path(f"/db/{i:03d}.jpg"), f"{i}") for i in range(n)]
    pos = [np.array([int(q.label)]) for q in queries]
    return PlaceDataset("walk", Path("/"), db, queries, pos)


def test_query_sequences_are_folders_sorted_by_name() -> None:
    names = ["b/2.jpg", "a/10.jpg", "b/1.jpg", "a/09.jpg"]
    seqs = query_sequences([Item(Path("/q") / n, n) for n in names])
    assert [s.tolist() for s in seqs] == [[3, 1], [2, 0]]


def test_tracker_mends_an_ambiguous_frame() -> None:
    """A walk along 20 places in database order; one frame looks more like a
    place 7 steps back than like its own: per frame it is wrong, tracked it is right."""
    db = np.eye(20, dtype=np.float32)
    q = db.copy() + 0.05
    q[10] = 0.6 * db[3] + 0.55 * db[10]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ds = walk_dataset(20, [Item(Path(f"/q/{i:03d}.jpg"), f"{i}") for i in range(20)])
    seqs = query_sequences(ds.queries)
    from vpr.evaluation.evaluate import first_positive_ranks

    frame = first_positive_ranks(db, q, ds.positives, 5)
    tracked = tracked_ranks(db, q, ds, seqs, TrackSettings(), 5, database_hubness(db, ds))
    assert frame[10] != 0 and tracked[10] == 0
    assert recall_from_ranks(tracked, (1,))[1] > recall_from_ranks(frame, (1,))[1]
    assert NOT_FOUND not in tracked


def test_each_folder_is_its_own_sequence() -> None:
    """Two folders walking different parts: the second starts afresh (no motion from the first's end)."""
    db = np.eye(30, dtype=np.float32)
    items = [Item(Path(f"/a/{i:03d}.jpg"), f"{i}") for i in range(10)]
    items += [Item(Path(f"/b/{i:03d}.jpg"), f"{i}") for i in range(20, 30)]
    q = np.stack([db[int(it.label)] for it in items])
    ds = walk_dataset(30, items)
    tracked = tracked_ranks(db, q, ds, query_sequences(items), TrackSettings(), 1, database_hubness(db, ds))
    assert (tracked == 0).all()


MODE = "route"  # the synthetic route's places have positions along their id order


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaltrack")
    route, home, reg, t_ref, teacher = route_and_teacher(root)
    s_ref = reg.register("stud", teacher, "student", parent=str(t_ref))
    return {"route": route, "home": home, "teacher": str(t_ref), "student": str(s_ref)}


def test_cli_eval_track_report_and_plot(world, tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["--home", str(world["home"].home), "eval", "--dataset", f"synthetic:{world['route']}"]
    args += ["--db-model", world["teacher"], "--query-model", world["teacher"], "--query-model", world["student"]]
    args += ["--quality", "orig,h36-h264-qp30", "--track", "--json", str(out), "--plot", str(png), "--no-progress"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == 4
    for r in report["results"]:
        assert set(r["track_recall"]) == set(r["recall"]) == {"1", "5", "10", "20"}
        assert all(0.0 <= v <= 1.0 for v in r["track_recall"].values())
        assert r["track"]["sequences"] == 1 and r["track"]["sequence_encoded"] == (r["quality"] != "orig")
        assert r["track"]["mode"] == MODE and r["track"]["hubness"] is True  # the report says how it tracked
        mean, spread = r["track"]["step_similarity"]  # and what standing vs moving was read against
        assert -1.0 <= mean <= 1.0 and spread > 0 and r["track"]["frame_motion"] is True
    video = [r for r in report["results"] if r["quality"] == "h36-h264-qp30"]
    assert video[0]["mean_bitrate_kbps"] > 0
    # the sequence was encoded once as a video: its frames are kept, one PNG per query
    frames = list((world["home"].cache_dir / "sequences").glob("*/frame-*.png"))
    assert len(frames) == report["dataset"]["queries"]
    assert png.is_file() and png.stat().st_size > 0
    table = capsys.readouterr().out
    assert "T@1" in table


@pytest.mark.slow
def test_sequence_encode_costs_less_than_single_frames(world, tmp_path: Path) -> None:
    """One encode of the whole sequence uses inter-frame prediction: it costs fewer
    bytes per frame than the same frames encoded one by one (what eval does without --track)."""
    reports = {}
    for flag in ([], ["--track"]):
        out = tmp_path / f"r{len(flag)}.json"
        args = ["--home", str(world["home"].home), "eval", "--dataset", f"synthetic:{world['route']}"]
        args += ["--db-model", world["teacher"], "--query-model", world["teacher"], "--quality", "h36-h264-qp30"]
        assert main([*args, *flag, "--json", str(out), "--no-progress"]) == 0
        reports[len(flag)] = json.loads(out.read_text())["results"][0]
    assert "track_recall" not in reports[0]
    assert reports[1]["mean_bytes"] < reports[0]["mean_bytes"]
