"""Dataset readers, UTM conversion, video+GPS conversion, synthetic routes (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpr.cli.main import main
from vpr.data.datasets import open_dataset
from vpr.data.geo import latlon_to_utm, utm_to_latlon, zone_number
from vpr.data.names import dvgl_name, parse_dvgl_name
from vpr.data.synthetic import ROUTE_FILE, make_route
from vpr.data.video_dataset import read_gps_csv, video_to_dataset


def write_image(path: Path, seed: int = 0, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ---- UTM ----------------------------------------------------------------------


def test_utm_known_points_and_round_trip():
    # CN Tower, the example of the UTM article: 17T 630084 4833439
    e, n, zone, band = latlon_to_utm(43 + 38 / 60 + 33.24 / 3600, -(79 + 23 / 60 + 13.7 / 3600))
    assert (zone, band) == (17, "T")
    assert e == pytest.approx(630084, abs=1.0) and n == pytest.approx(4833439, abs=1.0)
    e, n, zone, band = latlon_to_utm(0.0, 0.0)  # the classic 31N 166021.443 0
    assert (zone, band) == (31, "N") and e == pytest.approx(166021.443, abs=0.01) and n == pytest.approx(0, abs=1e-6)
    e, n, zone, band = latlon_to_utm(-33.8568, 151.2153)  # Sydney: southern false northing
    assert (zone, band) == (56, "H") and 6_000_000 < n < 10_000_000
    lat, lon = utm_to_latlon(e, n, zone, south=True)
    assert lat == pytest.approx(-33.8568, abs=1e-7) and lon == pytest.approx(151.2153, abs=1e-7)
    assert zone_number(60.0, 5.0) == 32 and zone_number(78.0, 10.0) == 33  # Norway, Svalbard
    lats, lons = np.array([45.0, 45.001]), np.array([9.0, 9.0])
    e, n, _, _ = latlon_to_utm(lats, lons)
    assert np.hypot(*(np.diff(e), np.diff(n))).item() == pytest.approx(111.1, abs=0.5)  # 0.001 deg of latitude
    with pytest.raises(ValueError, match="outside UTM"):
        latlon_to_utm(85.0, 0.0)


# ---- dvgl folders ---------------------------------------------------------------


def make_folder_dataset(root: Path) -> None:
    for i, x in enumerate([0.0, 10.0, 20.0, 60.0]):
        write_image(root / "database" / dvgl_name(500000 + x, 4000000.0, 33, "T", 45.1, 9.2, tile=str(i)), i)
    for i, x in enumerate([3.0, 19.0, 200.0]):
        write_image(root / "queries" / "sub" / dvgl_name(500000 + x, 4000000.0, 33, "T"), 10 + i)


def test_folder_reader_positives_by_radius(tmp_path: Path):
    make_folder_dataset(tmp_path / "ds")
    ds = open_dataset("folder", tmp_path / "ds")
    assert len(ds.database) == 4 and len(ds.queries) == 3
    east = [i.utm[0] - 500000 for i in ds.database]
    by_x = {round(x): k for k, x in enumerate(east)}
    qx = [round(i.utm[0] - 500000) for i in ds.queries]
    pos = dict(zip(qx, ds.positives))
    # within 25 m, nearest first; query at 200 m has no positive
    assert [round(east[k]) for k in pos[3]] == [0, 10, 20]
    assert [round(east[k]) for k in pos[19]] == [20, 10, 0]
    assert pos[200].size == 0 and pos[200].dtype == np.int64
    assert ds.database[by_x[0]].utm_zone == "33T" and ds.database[by_x[0]].latlon == (45.1, 9.2)
    assert ds.queries[0].path.is_absolute() and ds.queries[0].label.startswith("sub/")
    small = open_dataset("folder", tmp_path / "ds", radius=5)
    assert [round(east[k]) for k in dict(zip(qx, small.positives))[19]] == [20]
    assert ds.summary()["queries_without_positive"] == 1


def test_folder_reader_dvgl_images_test_layout(tmp_path: Path):
    make_folder_dataset(tmp_path / "pitts" / "images" / "test")
    ds = open_dataset("folder", tmp_path / "pitts")
    assert len(ds.database) == 4


def test_folder_reader_bad_input(tmp_path: Path):
    root = tmp_path / "ds"
    make_folder_dataset(root)
    bad = write_image(root / "database" / "no_coordinates.jpg")
    with pytest.raises(ValueError, match=r"no_coordinates\.jpg: file name does not follow"):
        open_dataset("folder", root)
    bad.unlink()
    write_image(root / "database" / "@abc@4000000@33@T@.jpg")
    with pytest.raises(ValueError, match=r"@abc@4000000@33@T@\.jpg: UTM east/north"):
        open_dataset("folder", root)
    write_image(tmp_path / "half" / "database" / dvgl_name(1, 2))
    with pytest.raises(FileNotFoundError, match="half/queries: missing"):
        open_dataset("folder", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        open_dataset("folder", tmp_path / "absent")
    with pytest.raises(ValueError, match="has no option"):
        open_dataset("folder", root, tolerance=2)
    with pytest.raises(ValueError, match="unknown dataset kind 'nope'"):
        open_dataset("nope", root)


def test_folder_reader_refuses_mixed_zones(tmp_path: Path):
    root = tmp_path / "ds"
    write_image(root / "database" / dvgl_name(500000, 4000000, 32, "T"))
    write_image(root / "queries" / dvgl_name(500000, 4000000, 33, "T"))
    with pytest.raises(ValueError, match="different UTM zones"):
        open_dataset("folder", root)


def test_dvgl_name_round_trip(tmp_path: Path):
    name = dvgl_name(
        512345.678, 4012345.2, 11, "S", 33.1, -117.3, pano_id="walk@1", tile="7", heading=-10, timestamp="1.5"
    )
    assert name.count("@") == 15 and name.endswith("@.jpg")
    utm, zone, latlon = parse_dvgl_name(Path(name))
    assert utm == (512345.68, 4012345.2) and zone == "11S" and latlon == (33.1, -117.3)
    assert name.split("@")[9] == "350.0"  # heading wrapped into 0..360


# ---- Pittsburgh .mat --------------------------------------------------------------


def write_mat(path: Path, db_names, utm_db, q_names, utm_q, thr=25.0, drop=None):
    from scipy.io import savemat

    s = {
        "whichSet": "test",
        "dbImage": np.array(db_names, dtype=object),
        "utmDb": np.array(utm_db, float).T,
        "qImage": np.array(q_names, dtype=object),
        "utmQ": np.array(utm_q, float).T,
        "numDb": len(db_names),
        "numQ": len(q_names),
        "posDistThr": thr,
        "posDistSqThr": thr**2,
        "nonTrivPosDistSqThr": 100,
    }
    if drop:
        del s[drop]
    savemat(str(path), {"dbStruct": s})


def test_mat_reader(tmp_path: Path):
    root = tmp_path / "pitts"
    db_names = ["000/a.jpg", "000/b.jpg", "001/c.jpg"]
    q_names = ["000/q1.jpg", "000/q2.jpg"]
    for i, n in enumerate(db_names):
        write_image(root / n, i)
    for i, n in enumerate(q_names):
        write_image(root / "queries_real" / n, 10 + i)
    utm_db = [[0, 0], [10, 0], [100, 0]]
    write_mat(
        root / "pitts_test.mat",
        db_names,
        [[585000 + x, 4477000 + y] for x, y in utm_db],
        q_names,
        [[585001, 4477000], [585300, 4477000]],
        thr=12.0,
    )
    ds = open_dataset("mat", root / "pitts_test.mat")
    assert [i.label for i in ds.database] == ["000/a", "000/b", "001/c"]
    assert ds.queries[0].path == (root / "queries_real" / "000/q1.jpg").resolve()
    assert ds.info["radius_m"] == 12.0 and ds.info["which_set"] == "test"
    assert ds.positives[0].tolist() == [0, 1] and ds.positives[1].size == 0
    assert ds.database[1].utm == (585010.0, 4477000.0)
    wide = open_dataset("mat", root / "pitts_test.mat", radius=500)
    assert sorted(wide.positives[1].tolist()) == [0, 1, 2]


def test_mat_reader_single_entries_and_roots(tmp_path: Path):
    imgs = tmp_path / "images"
    write_image(imgs / "d.jpg")
    write_image(imgs / "q.jpg", 1)
    write_mat(tmp_path / "one.mat", ["d.jpg"], [[1.0, 2.0]], ["q.jpg"], [[1.0, 3.0]])
    ds = open_dataset("mat", tmp_path / "one.mat", images_root=imgs, queries_root=imgs)
    assert len(ds.database) == 1 and ds.positives[0].tolist() == [0]


def test_mat_reader_bad_input(tmp_path: Path):
    write_mat(tmp_path / "nofield.mat", ["a.jpg"], [[0, 0]], ["q.jpg"], [[0, 0]], drop="utmQ")
    with pytest.raises(ValueError, match=r"nofield\.mat: dbStruct has no field 'utmQ'"):
        open_dataset("mat", tmp_path / "nofield.mat", check_files="false")
    write_mat(tmp_path / "missing.mat", ["a.jpg", "b.jpg"], [[0, 0], [1, 1]], ["q.jpg"], [[0, 0]])
    with pytest.raises(FileNotFoundError, match=r"missing\.mat: 2 of 2 database images are missing"):
        open_dataset("mat", tmp_path / "missing.mat")
    (tmp_path / "junk.mat").write_bytes(b"this is not matlab")
    with pytest.raises(ValueError, match=r"junk\.mat: not a readable MATLAB"):
        open_dataset("mat", tmp_path / "junk.mat")
    from scipy.io import savemat

    savemat(str(tmp_path / "other.mat"), {"x": np.eye(2)})
    with pytest.raises(ValueError, match="no 'dbStruct' variable"):
        open_dataset("mat", tmp_path / "other.mat")
    with pytest.raises(FileNotFoundError, match="no such .mat file"):
        open_dataset("mat", tmp_path / "absent.mat")


# ---- traversals ---------------------------------------------------------------------


def make_traversals(root: Path, n_db: int = 6, n_q: int = 6) -> None:
    for i in range(n_db):
        write_image(root / "ref" / f"Image{i:03d}.jpg", i)
    for i in range(n_q):
        write_image(root / "qry" / f"Image{i:03d}.jpg", 100 + i)


def test_traversal_with_ground_truth_csv(tmp_path: Path):
    make_traversals(tmp_path)
    (tmp_path / "ground_truth.csv").write_text(
        "query_index,positive_reference_indices\n0,0 1\n1,0 1 2\n2,\n3,3\n5,4 5\n"
    )
    ds = open_dataset("traversal", tmp_path, database="ref", queries="qry")
    assert [p.tolist() for p in ds.positives] == [[0, 1], [0, 1, 2], [], [3], [], [4, 5]]
    assert ds.database[2].label == "Image002" and ds.queries[5].path.name == "Image005.jpg"
    assert ds.summary()["queries_without_positive"] == 2


@pytest.mark.parametrize(
    "body, message",
    [
        ("query_index,positive_reference_indices\n0,0 9\n", r"line 2: reference index 9 is out of range 0\.\.5"),
        ("query_index,positive_reference_indices\n0,0\n7,1\n", r"line 3: query index 7 is out of range"),
        ("query_index,positive_reference_indices\n0,0\n0,1\n", r"line 3: query index 0 appears twice"),
        ("query_index,positive_reference_indices\nzero,1\n", r"line 2: indices must be integers"),
        ("query_index,positive_reference_indices\n0,1,2\n", r"line 2: expected 2 columns"),
        ("q,refs\n0,1\n", r"line 1: expected the header"),
    ],
)
def test_traversal_ground_truth_errors_name_file_and_line(tmp_path: Path, body, message):
    make_traversals(tmp_path)
    gt = tmp_path / "gt.csv"
    gt.write_text(body)
    with pytest.raises(ValueError, match=r"gt\.csv: " + message):
        open_dataset("traversal", tmp_path, database="ref", queries="qry", ground_truth=gt)


def test_aligned_traversals_with_tolerance(tmp_path: Path):
    make_traversals(tmp_path)
    ds = open_dataset("traversal", tmp_path, database="ref", queries="qry", tolerance=1)
    assert [p.tolist() for p in ds.positives] == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5]]
    zero = open_dataset("traversal", tmp_path, database="ref", queries="qry", tolerance="0")
    assert [p.tolist() for p in zero.positives] == [[i] for i in range(6)]
    with pytest.raises(ValueError, match="not both"):
        open_dataset("traversal", tmp_path, database="ref", queries="qry", tolerance=1, ground_truth="x.csv")
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        open_dataset("traversal", tmp_path, database="ref", queries="qry")
    with pytest.raises(FileNotFoundError, match=r"nothere: not a folder"):
        open_dataset("traversal", tmp_path, database="nothere", queries="qry", tolerance=1)
    make_traversals(tmp_path / "uneven", 6, 4)
    with pytest.raises(ValueError, match="same number of frames"):
        open_dataset("traversal", tmp_path / "uneven", database="ref", queries="qry", tolerance=1)


def test_gardens_point_walking(shared_dir: Path):
    root = shared_dir / "datasets" / "gardens_point_walking"
    ds = open_dataset("traversal", root, database="day_left", queries="night_right")
    assert len(ds.database) == 200 and len(ds.queries) == 200
    assert ds.positives[0].tolist() == [0, 1, 2] and ds.positives[100].tolist() == [98, 99, 100, 101, 102]
    aligned = open_dataset("traversal", root, database="day_left", queries="day_right", tolerance=2)
    assert all(np.array_equal(a, b) for a, b in zip(aligned.positives, ds.positives))


# ---- video + GPS ----------------------------------------------------------------------


def encode_clip(path: Path, frames: int = 30, fps: int = 10, size=(64, 48)) -> None:
    """A short H.264 MP4 of a moving pattern, written with PyAV."""
    import av

    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            x = np.arange(w)[None, :, None]
            arr = ((np.sin((x + 3 * i) / 4.0) + 1) * 120 + np.zeros((h, w, 3))).astype(np.uint8)
            arr[: h // 4, :, 0] = (i * 8) % 255
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_gps(
    path: Path, speed: float = 1.0, duration: float = 3.0, lat0: float = 45.0, lon0: float = 9.0, extra_rows: str = ""
) -> None:
    """Walking north at `speed` m/s, fixes every 0.1 s (plus a no-fix row)."""
    lines = ["time_s,lat,lon,alt_m,speed2d_mps", "0.000,0,0,0,0"]  # before the first fix
    for k in range(int(duration * 10)):
        t = 0.03 + k * 0.1  # off the frame times, so no frame sits exactly on a threshold
        lines.append(f"{t:.3f},{lat0 + speed * t / 111_132.0:.9f},{lon0:.9f},10.0,{speed}")
    path.write_text("\n".join(lines) + "\n" + extra_rows)


def test_video_to_dataset_samples_by_distance(tmp_path: Path):
    video, gps = tmp_path / "walk.mp4", tmp_path / "gps.csv"
    encode_clip(video, frames=30, fps=10)
    write_gps(gps, speed=1.0)
    out = tmp_path / "mapped"
    r = video_to_dataset(video, gps, out, spacing=0.5, split_queries=True, progress=False)
    assert r.frames_decoded == 30
    # GPS covers 0.03..2.93 s: the frame at 0.0 s has no position
    assert r.frames_outside_gps == 1
    db = [s for s in r.samples if s.subset == "database"]
    qs = [s for s in r.samples if s.subset == "queries"]
    dists = [s.position["dist"] for s in db]
    # 1 m/s from t=0.03 s: database thresholds 0, 0.5, ... 2.5 m -> frames at 0.1, 0.6, ... 2.6 s;
    # query thresholds 0.25, 0.75, ... 2.75 m -> frames at 0.3, 0.8, ... 2.8 s
    assert [s.frame_index for s in db] == [1, 6, 11, 16, 21, 26]
    assert [s.frame_index for s in qs] == [3, 8, 13, 18, 23, 28]
    assert dists == pytest.approx([0.07, 0.57, 1.07, 1.57, 2.07, 2.57], abs=0.01)
    ds = open_dataset("folder", out, radius=0.3)
    assert len(ds.database) == 6 and len(ds.queries) == 6
    north = sorted(i.utm[1] for i in ds.database)
    assert np.diff(north) == pytest.approx([0.5] * 5, abs=0.02)
    assert {i.utm_zone for i in ds.database} == {"32T"} and all(p.size == 2 for p in ds.positives[:-1])
    assert all(abs(i.latlon[1] - 9.0) < 1e-6 for i in ds.database)
    with Image.open(ds.database[0].path) as im:
        assert im.size == (64, 48)
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"] == {"database": 6, "queries": 6} and info["spacing_m"] == 0.5
    assert info["gps_rows_dropped"] == 1
    with pytest.raises(ValueError, match="exists and is not empty"):
        video_to_dataset(video, gps, out, spacing=0.5, progress=False)
    r2 = video_to_dataset(video, gps, out, spacing=1.0, max_side=32, overwrite=True, progress=False)
    assert r2.database == 3 and r2.queries == 0
    assert not (out / "queries").exists()


def test_video_to_dataset_from_the_cli(tmp_path: Path, capsys):
    video, gps = tmp_path / "walk.mp4", tmp_path / "gps.csv"
    encode_clip(video, frames=20, fps=10)
    write_gps(gps, speed=2.0, duration=2.0)
    assert (
        main(
            [
                "dataset",
                "from-video",
                str(video),
                str(gps),
                str(tmp_path / "ds"),
                "--spacing",
                "1",
                "--no-progress",
                "--queries-video",
                str(video),
                "--queries-gps",
                str(gps),
            ]
        )
        == 0
    )
    assert "database and" in capsys.readouterr().out
    ds = open_dataset("folder", tmp_path / "ds", radius=0.5)
    assert len(ds.database) == len(ds.queries) == 4
    assert main(["dataset", "from-video", str(video), str(gps), str(tmp_path / "ds2"), "--queries-gps", str(gps)]) == 2
    assert "--queries-gps needs --queries-video" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("time,lat,lon\n0,45,9\n1,45.1,9\n", r"line 1: missing column\(s\) time_s"),
        ("time_s,lat,lon\n0,45,9\n0,45.1,9\n", r"line 3: time_s 0\.0 does not increase"),
        ("time_s,lat,lon\n0,45,9\n1,north,9\n", r"line 3: time_s, lat, lon must be numbers"),
        ("time_s,lat,lon\n0,45,9\n1,89,9\n", r"line 3: lat 89\.0, lon 9\.0 outside"),
        ("time_s,lat,lon\n0,45,9\n", r"needs at least 2 GPS fixes"),
    ],
)
def test_gps_csv_errors(tmp_path: Path, content, message):
    (tmp_path / "g.csv").write_text(content)
    with pytest.raises(ValueError, match=r"g\.csv: " + message):
        read_gps_csv(tmp_path / "g.csv")


def test_video_errors(tmp_path: Path):
    gps = tmp_path / "gps.csv"
    write_gps(gps)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=r"bad\.mp4: cannot open the video"):
        video_to_dataset(tmp_path / "bad.mp4", gps, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="no such video file"):
        video_to_dataset(tmp_path / "none.mp4", gps, tmp_path / "o", progress=False)
    video = tmp_path / "v.mp4"
    encode_clip(video, frames=5)
    late = tmp_path / "late.csv"
    late.write_text("time_s,lat,lon\n100,45,9\n101,45.0001,9\n")
    with pytest.raises(ValueError, match="no frame lies within the GPS time span"):
        video_to_dataset(video, late, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing half-written is left behind
    assert not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())


def test_gopro_walk(shared_dir: Path, tmp_path: Path):
    src = shared_dir / "videos" / "gopro_walk"
    r = video_to_dataset(
        src / "walk.mp4",
        src / "gps.csv",
        tmp_path / "gopro",
        spacing=2.0,
        split_queries=True,
        max_side=160,
        progress=False,
    )
    assert r.frames_decoded == 315
    assert 12.0 < r.track_length_m < 16.0  # "the walk covers about 14 m"
    assert r.database == 7 and r.queries == 7
    ds = open_dataset("folder", tmp_path / "gopro", radius=2.0)
    assert {i.utm_zone for i in ds.database} == {"11S"}
    assert all(p.size >= 1 for p in ds.positives)
    with Image.open(ds.database[0].path) as im:
        assert max(im.size) == 160


# ---- synthetic routes ---------------------------------------------------------------


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


def test_synthetic_route_is_deterministic(tmp_path: Path):
    a = make_route(tmp_path / "a", places=6, seed=3, size=(64, 48))
    b = make_route(tmp_path / "b", places=6, seed=3, size=(64, 48))
    fa, fb = file_bytes(a), file_bytes(b)
    assert len(fa) == 12 and fa == fb
    c = make_route(tmp_path / "c", places=6, seed=4, size=(64, 48))
    assert file_bytes(c) != fa
    mtime = (a / ROUTE_FILE).stat().st_mtime_ns
    assert make_route(a, places=6, seed=3, size="64x48") == a  # same parameters: reused
    assert (a / ROUTE_FILE).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="not a synthetic route with these parameters"):
        make_route(a, places=7, seed=3, size=(64, 48))
    make_route(a, places=7, seed=3, size=(64, 48), overwrite=True)
    assert len(file_bytes(a)) == 14


def test_synthetic_route_reads_as_a_dataset(tmp_path: Path):
    path = tmp_path / "route"
    ds = open_dataset("synthetic", path, places=8, size="64x48", spacing=5.0)  # generated on the spot
    assert (path / ROUTE_FILE).is_file()
    assert len(ds.database) == len(ds.queries) == 8
    assert ds.info["radius_m"] == 6.25 and ds.info["kind"] == "synthetic"
    assert all(1 <= p.size <= 3 for p in ds.positives)
    with Image.open(ds.queries[0].path) as im:
        assert im.size == (64, 48)
    # the query pass really differs from the database pass (viewpoint, lighting)
    d = (
        np.asarray(Image.open(ds.database[0].path), float).mean()
        - np.asarray(Image.open(ds.queries[0].path), float).mean()
    )
    assert abs(d) > 10
    for bad, msg in (
        ({"places": 1}, "places must be"),
        ({"lighting": "noon"}, "lighting must be"),
        ({"size": "big"}, "bad size"),
    ):
        with pytest.raises(ValueError, match=msg):
            make_route(tmp_path / "bad", **bad)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a synthetic route folder"):
        open_dataset("synthetic", tmp_path / "other")


def test_cli_dataset_synth_and_info(tmp_path: Path, capsys):
    out = tmp_path / "r"
    assert main(["dataset", "synth", str(out), "--places", "4", "--size", "48x36", "--lighting", "night"]) == 0
    assert json.loads((out / ROUTE_FILE).read_text())["params"]["lighting"] == "night"
    capsys.readouterr()
    assert main(["dataset", "info", f"synthetic:{out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["database"] == 4 and summary["queries"] == 4
    assert main(["dataset", "info", f"folder:{tmp_path / 'nothing'}"]) == 2
    assert "nothing: not a folder" in capsys.readouterr().err
    assert main(["dataset", "info", f"synthetic:{out}", "--check-images"]) == 0
    assert "all 8 images decode" in capsys.readouterr().out
    broken = sorted((out / "queries").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated JPEG
    assert main(["dataset", "info", f"synthetic:{out}", "--check-images"]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: not a decodable image" in err and "1 of 8 images do not decode" in err
