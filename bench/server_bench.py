"""Server throughput and latency beside the model alone, in one run (not a test).

Measured side by side on this machine:
  (a) the model alone, in-process, batched: images/s at 240x320 and 480x640,
      and at the input shape the server actually sees for the query JPEGs;
  (b) `vpr serve` (a subprocess on a loopback port) under N concurrent
      closed-loop HTTP clients sending real JPEGs (Gardens Point day_right):
      throughput, p50/p95/p99 latency, and server throughput / (a) at the
      served shape (the server's overhead);
  (c) micro-batching on (the default max_batch_size) versus off (1) at N=16;
  (d) websocket streaming of the GoPro walk at its 30 fps, h264 and jpeg:
      frames processed per second, drop rate, per-frame latency.

It needs a registered model and index: by default it builds its own under a
temporary home (a VGG16 teacher with the shared ImageNet weights, few
NetVLAD clusters, an index of day_left images), or uses --home/--model/--index.

    python bench/server_bench.py --max-side 320 --duration 10 --json bench/out/server_bench.json
    python bench/server_bench.py --home var --model student --index gardens --clients 1,4

Clients and server share the machine's cores; the load average is recorded.
OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, set here unless the
environment says otherwise, and inherited by the server): on a small shared
machine spinning threads made the same forward pass 2 to 10 times slower,
erratically, in-process and in the server alike.
"""

from __future__ import annotations

import os

# Before torch (imported below) starts its OpenMP pool: hence the late imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from httpload import percentiles, run_clients

from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.extract import cpu_name, embed_tensors
from vpr.model.fileio import atomic_write_json
from vpr.model.preprocess import list_images, load_image, to_input
from vpr.model.registry import Registry
from vpr.server.harness import ServeProcess
from vpr.settings import HomeSettings

log = logging.getLogger("server_bench")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- setup ------------------------------------------------------------------------------------
def link_images(images: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in images:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def build_bench_home(work: Path, shared: Path, max_side: int, clusters: int, db_images: int) -> tuple[Path, str, str]:
    """A VGG16 teacher (shared ImageNet weights) and an index of day_left images."""
    from vpr.index.ops import build_index
    from vpr.model.teacher import init_teacher

    weights = shared / "weights" / "vgg16_imagenet_caffe_features.safetensors"
    day_left = shared / "datasets" / "gardens_point_walking" / "day_left"
    if not weights.is_file() or not day_left.is_dir():
        raise FileNotFoundError(
            f"{shared}: needs weights/{weights.name} and datasets/gardens_point_walking/day_left "
            "(or pass --home/--model/--index)"
        )
    from vpr.index.meta import Entry

    home = work / "home"
    db = list_images(day_left)[:db_images]
    cluster_folder = link_images(db[:: max(1, db_images // 10)], work / "clusters")
    config = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=clusters),
        preprocess=PreprocessConfig(mode="caffe", max_side=max_side),
    )
    t = time.perf_counter()
    ref = init_teacher(
        Registry(home / "models"), "bench-teacher", config, str(weights), cluster_folder, samples=5000, device="cpu"
    )
    index = build_index(
        HomeSettings(home=home),
        str(ref),
        "bench",
        items=[Entry(p, p.stem) for p in db],
        root=day_left,
        batch_size=8,
        device="cpu",
    )
    log.info("set up %s and %s in %.0f s", ref, index, time.perf_counter() - t)
    return home, str(ref), str(index)


# ---- (a) the model alone ----------------------------------------------------------------------------
def time_forward(net, shape: tuple[int, int], batch: int, seconds: float) -> dict[str, Any]:
    """Images/s of one forward pass per batch (inputs ready), after one warm-up pass."""
    h, w = shape
    x = torch.randn(batch, 3, h, w)
    embed_tensors(net, x, torch.device("cpu"))
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        embed_tensors(net, x, torch.device("cpu"))
        n += 1
    took = time.perf_counter() - t0
    return {
        "shape": f"{h}x{w}",
        "batch": batch,
        "passes": n,
        "images_per_s": round(batch * n / took, 3),
        "ms_per_batch": round(took / n * 1000, 1),
    }


def model_alone(
    home: Path, model: str, shapes: list[tuple[int, int]], batches: list[int], seconds: float
) -> list[dict]:
    net = Registry(home / "models").load(model, "cpu").net.eval()
    rows = []
    for shape in shapes:
        for b in batches:
            row = time_forward(net, shape, b, seconds)
            rows.append(row)
            print(f"  model alone {row['shape']} batch {b}: {row['images_per_s']:.2f} img/s", flush=True)
    return rows


# ---- the server ------------------------------------------------------------------------------------------
def serve(home: Path, model: str, index: str, log_file: Path, **env: str) -> ServeProcess:
    """`vpr serve` as a subprocess on a free loopback port (the one harness), ready."""
    environment = {"VPR_DEVICE": "cpu", "VPR_ACCESS_LOG": "false", "VPR_LOG_LEVEL": "warning", **env}
    server = ServeProcess(home, log_file, args=["--model", model, "--index", index], env=environment, cwd=REPO)
    return server.start(timeout=300)


def http_load(url: str, payloads: list[tuple[bytes, str]], clients: int, duration: float, warmup: float) -> dict:
    row = run_clients(url, payloads, clients, duration, warmup=warmup)
    row["loadavg"] = loadavg()
    lat = row["latency_ms"]
    print(
        f"  N={clients:3d}: {row['throughput_per_s']:.2f} req/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms, batch {row['mean_batch_size']}, statuses {row['statuses']}, "
        f"errors {row['errors']}",
        flush=True,
    )
    return row


def stream_video(url: str, video: Path, codec: str, seconds: float) -> dict:
    from vpr.server.client import VPRClient, video_fps

    fps = video_fps(video)
    results: list[dict] = []
    t0 = time.monotonic()
    with VPRClient(url, timeout=120) as client:
        final = client.stream(
            video,
            codec=codec,
            realtime=True,
            max_frames=int(round(seconds * fps)),
            on_message=lambda m: results.append(m) if m.get("type") == "result" else None,
        )
    wall = time.monotonic() - t0
    received, processed, dropped = final.get("received", 0), final.get("processed", 0), final.get("dropped", 0)
    row = {
        "codec": codec,
        "video_fps": round(fps, 3),
        "frames_sent": final.get("sent"),
        "received": received,
        "processed": processed,
        "dropped": dropped,
        "end": final.get("type"),
        "processed_per_s": round(processed / wall, 3),
        "drop_rate": round(dropped / received, 4) if received else None,
        "latency_ms": percentiles([m["latency_ms"] for m in results]),
        "wall_s": round(wall, 2),
        "loadavg": loadavg(),
    }
    print(
        f"  stream {codec}: {row['processed_per_s']:.2f} frames/s processed of {fps:.2f} sent, drop rate "
        f"{row['drop_rate']}, latency p50 {row['latency_ms']['p50']} ms p95 {row['latency_ms']['p95']} ms",
        flush=True,
    )
    return row


# ---- the run ----------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    shared = Path(args.shared)
    clients = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "loadavg": {"start": loadavg()},
    }
    work = Path(tempfile.mkdtemp(prefix="vpr-server-bench-"))
    try:
        if args.home:
            if not (args.model and args.index):
                raise SystemExit("--home needs --model and --index")
            home, model, index = Path(args.home), args.model, args.index
        else:
            print(
                f"setting up a VGG16 teacher (K={args.clusters}, max side {args.max_side}) and an index of "
                f"{args.db_images} day_left images under {work}",
                flush=True,
            )
            home, model, index = build_bench_home(work, shared, args.max_side, args.clusters, args.db_images)
        report["setup"] = {
            "home": str(home),
            "model": model,
            "index": index,
            "max_side": args.max_side,
            "clusters": args.clusters,
            "db_images": args.db_images,
        }
        report["loadavg"]["after_setup"] = loadavg()

        queries = list_images(shared / "datasets" / "gardens_point_walking" / "day_right")[: args.query_images]
        payloads = [(p.read_bytes(), "image/jpeg") for p in queries]
        cfg = Registry(home / "models").load(model, "cpu").net.config.preprocess
        served = tuple(to_input(load_image(queries[0]), cfg).shape[1:])
        report["setup"].update(
            query_images=len(payloads),
            query_size=list(load_image(queries[0]).size),
            served_input=f"{served[0]}x{served[1]}",
            mean_query_bytes=int(sum(len(d) for d, _ in payloads) / len(payloads)),
        )

        print("(a) the model alone, in-process", flush=True)
        shapes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        shapes += [served] if served not in shapes else []
        report["model_alone"] = model_alone(home, model, shapes, [1, args.batch], args.model_seconds)
        report["loadavg"]["after_model_alone"] = loadavg()
        at_served = {
            r["batch"]: r["images_per_s"] for r in report["model_alone"] if r["shape"] == f"{served[0]}x{served[1]}"
        }

        print(f"(b) the server under N concurrent clients, {args.duration:g} s each", flush=True)
        with serve(home, model, index, work / "serve.log", VPR_MAX_BATCH_SIZE=str(args.batch)) as srv:
            rows = [http_load(srv.url, payloads, n, args.duration, args.warmup) for n in clients]
            for r in rows:
                r["ratio_to_model_alone_batched"] = round(r["throughput_per_s"] / at_served[args.batch], 3)
                r["ratio_to_model_alone_batch1"] = round(r["throughput_per_s"] / at_served[1], 3)
            report["server"] = {"max_batch_size": args.batch, "rows": rows}
            on16 = next((r for r in rows if r["clients"] == 16), None)
            if on16 is None:  # (c) compares at N=16 in this same run
                on16 = http_load(srv.url, payloads, 16, args.duration, args.warmup)
            if not args.skip_stream:
                print(f"(d) websocket streaming of {Path(args.video).name} at its frame rate", flush=True)
                report["stream"] = [
                    stream_video(srv.url, Path(args.video), codec, args.stream_seconds) for codec in ("h264", "jpeg")
                ]
        report["loadavg"]["after_server"] = loadavg()

        print("(c) micro-batching off (max_batch_size 1) at N=16", flush=True)
        with serve(home, model, index, work / "serve.log", VPR_MAX_BATCH_SIZE="1") as srv:
            off = http_load(srv.url, payloads, 16, args.duration, args.warmup)
        report["batching"] = {
            "clients": 16,
            "on": on16,
            "off": off,
            "throughput_ratio_on_to_off": round(on16["throughput_per_s"] / off["throughput_per_s"], 3)
            if off["throughput_per_s"]
            else None,
        }
        report["loadavg"]["end"] = loadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: report[k] for k in ("machine", "setup", "loadavg")}, indent=1))
    if args.json:
        atomic_write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", help="an existing VPR home (with --model and --index) instead of building one")
    p.add_argument("--model", help="query model NAME or NAME@VERSION in --home")
    p.add_argument("--index", help="index NAME or NAME@VERSION in --home")
    p.add_argument("--shared", default=str(SHARED), help="the shared folder (weights, datasets, videos)")
    p.add_argument("--max-side", type=int, default=320, help="input size cap of the built model (default 320)")
    p.add_argument("--clusters", type=int, default=16, help="NetVLAD clusters of the built model (default 16)")
    p.add_argument("--db-images", type=int, default=60, help="day_left images in the built index (default 60)")
    p.add_argument("--query-images", type=int, default=100, help="day_right JPEGs the clients cycle through")
    p.add_argument("--clients", default="1,4,16,64", help="concurrent clients, comma-separated (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per setting (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each setting (default 3)")
    p.add_argument(
        "--sizes",
        default="240x320,480x640",
        help="HxW of the in-process measurements (the served input shape is added)",
    )
    p.add_argument("--batch", type=int, default=8, help="server max_batch_size and in-process batch (default 8)")
    p.add_argument("--model-seconds", type=float, default=5.0, help="seconds per in-process measurement (default 5)")
    p.add_argument("--video", default=str(SHARED / "videos" / "gopro_walk" / "walk.mp4"))
    p.add_argument("--stream-seconds", type=float, default=10.0, help="seconds of video to stream (default 10)")
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary home and the server log")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
