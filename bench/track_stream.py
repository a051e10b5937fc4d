#!/usr/bin/env python
"""The real path: a Gardens Point query walk as an H.264 video, streamed over
`WS /v1/stream` at its frame rate to a real `vpr serve`, tracked by the server.

1. an index of `day_left` by the teacher (built once in --home; descriptors
   from THE description path, so a warm cache makes it quick);
2. the query folder (`night_right`, frames sorted by name) resized to
   `h<height>` and encoded as ONE H.264 clip at constant QP (libx264, no
   B-frames, a key frame per second), at --fps frames per second;
3. `vpr serve` (server/harness.ServeProcess) with the student; the clip is
   streamed in real time by `VPRClient.stream` (newest-frame-wins drops
   frames the model cannot keep up with: the tracker sees only the others);
4. per processed frame: per-frame recall@1 (`results[0]`) and tracked
   recall@1 (`track.id`) against the ground truth (frame i matches i +- 2),
   and the tracker's own time (`track.update_ms`) against the forward pass
   (`timings_ms.embed`).

    .venv/bin/python bench/track_stream.py --home /tmp/track-home --out bench/results/track_stream.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import av  # noqa: E402
import numpy as np  # noqa: E402

from vpr.data.datasets import read_ground_truth_csv  # noqa: E402
from vpr.describe.cache import DescriptorCache  # noqa: E402
from vpr.describe.describe import describe  # noqa: E402
from vpr.index.hubness import HUB_KEY, HUB_RELATIVE_TO, STEP_KEY  # noqa: E402
from vpr.index.meta import Entry  # noqa: E402
from vpr.index.store import IndexStore, ModelStamp  # noqa: E402
from vpr.media.degrade import degrade  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.model.preprocess import list_images, load_image  # noqa: E402
from vpr.model.registry import Registry  # noqa: E402
from vpr.server.client import VPRClient  # noqa: E402
from vpr.server.harness import ServeProcess  # noqa: E402

SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))
INDEX = "gp-day-left"


def build_index(home: Path, teacher: str, db_dir: Path) -> str:
    store = IndexStore(home / "indexes")
    if INDEX in store.names():
        manifest = store.manifest(store.resolve(INDEX))
        if (manifest.get(HUB_KEY) or {}).get("relative_to") == HUB_RELATIVE_TO and manifest.get(STEP_KEY):
            return str(store.resolve(INDEX))  # its hubness is the current one, and it records the step similarity
    model = Registry(home / "models").load(teacher, "cpu")
    paths = list_images(db_dir)
    entries = [Entry(p, p.stem) for p in paths]
    # THE description path with the home's cache (an index build's own work cache would describe them again)
    desc = describe(model, paths, "orig", cache=DescriptorCache(home / "cache"), device="cpu").desc
    return str(store.build_from_descriptors(INDEX, desc, entries, db_dir, ModelStamp.of(model), "Flat"))


def encode(frames: list[Path], out: Path, height: int, qp: int, fps: int) -> dict:
    """One H.264 clip of the frames (resized by THE degradation's resize), constant QP."""
    imgs = [np.asarray(degrade(load_image(p), f"h{height}").image) for p in frames]
    h, w = imgs[0].shape[:2]
    with av.open(str(out), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps, 1))
        s.width, s.height, s.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        s.options = {"preset": "medium", "qp": str(qp), "x264-params": f"keyint={fps}:scenecut=0:bframes=0"}
        for arr in imgs:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[: h - h % 2, : w - w % 2]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    size = out.stat().st_size
    return {"frames": len(imgs), "width": w, "height": h, "qp": qp, "fps": fps, "bytes": size,
            "kbps": round(size * 8 * fps / len(imgs) / 1000, 1)}  # fmt: skip


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, float)
    return {k: round(float(np.percentile(a, q)), 3) for k, q in (("p50", 50), ("p99", 99))} if a.size else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--gardens", type=Path, default=SHARED / "datasets" / "gardens_point_walking")
    p.add_argument("--teacher", default="gardens-vgg16-k64-ms320-upsample@1")
    p.add_argument("--student", default="gardens-student@1")
    p.add_argument("--queries", default="night_right")
    p.add_argument("--height", type=int, default=180)
    p.add_argument("--qp", type=int, default=40)
    p.add_argument("--fps", type=int, default=2, help="the clip's frame rate (sent in real time)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_stream.json")
    args = p.parse_args(argv)
    index = build_index(args.home, args.teacher, args.gardens / "day_left")
    frames = list_images(args.gardens / args.queries)
    positives = read_ground_truth_csv(args.gardens / "ground_truth.csv", len(frames), len(frames))
    work = REPO / "bench" / "out"  # the clip and the server's log (gitignored)
    work.mkdir(parents=True, exist_ok=True)
    video = work / f"track_stream_{args.queries}_h{args.height}_qp{args.qp}.mp4"
    clip = encode(frames, video, args.height, args.qp, args.fps)
    env = {"VPR_DEVICE": "cpu", "VPR_ACCESS_LOG": "false", "VPR_LOG_LEVEL": "warning", "VPR_DECODE_THREADS": "1"}
    msgs: list[dict] = []
    t0 = time.monotonic()
    server = ServeProcess(
        args.home, work / "track_stream.log", ["--model", args.student, "--index", index], env, cwd=REPO
    )
    with server.start(timeout=300):
        final = VPRClient(server.url, timeout=120).stream(
            video, codec="h264", realtime=True, on_message=lambda m: msgs.append(m) if m["type"] == "result" else None
        )
    wall = time.monotonic() - t0
    rows = [m for m in msgs if m.get("track")]
    frame_ok = [int(m["results"][0]["id"]) in positives[m["frame"]] for m in rows]
    track_ok = [int(m["track"]["id"]) in positives[m["frame"]] for m in rows]
    upd = [m["track"]["update_ms"] for m in rows]
    emb = [m["timings_ms"]["embed"] for m in rows]
    share = [u / e for u, e in zip(upd, emb) if e > 0]
    out = {
        "what": "a Gardens Point query walk as one H.264 clip streamed over WS /v1/stream in real time, "
        "tracked by the server",
        "queries": args.queries,
        "student": args.student,
        "index": index,
        "clip": clip,
        "end": {k: final.get(k) for k in ("type", "received", "processed", "dropped", "sent")},
        "processed_frames": len(rows),
        "recall@1_frame": round(float(np.mean(frame_ok)), 4) if rows else None,
        "recall@1_tracked": round(float(np.mean(track_ok)), 4) if rows else None,
        "tracker_ms": pct(upd),
        "forward_ms": pct(emb),
        "tracker_share_of_forward": pct(share),
        "latency_ms": pct([m["latency_ms"] for m in rows]),
        "wall_s": round(wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (a 2-core VM shared with other work), CPU inference",
    }
    atomic_write_json(args.out, out)
    print({k: v for k, v in out.items() if k not in ("what",)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
