"""VGG16+NetVLAD on a CUDA GPU: extraction throughput by precision and memory
layout, achieved TFLOP/s against the card's peak, and the end-to-end server
throughput there (a prepared script for a GPU machine; not a test).

Model alone, at 480x640, batch 1 to 64, one row per (mode, batch):
  fp32             TF32 off: true fp32 convolutions and matmuls
  tf32             TF32 on (cuDNN convolutions and matmuls)
  bf16             bf16 autocast, NCHW (what the server runs on CUDA)
  bf16-cl          bf16 autocast, channels_last
  bf16-cl-compile  the same under torch.compile (default mode)
  fp16-cl          fp16 autocast, channels_last
Then the serving engines (`vpr.model.engines`, what VPR_ENGINE picks), on a
registered model with its ONNX export made in the temporary home, the same
batches: eager-bf16 (CUDA's default), eager-bf16-cl, eager-bf16-mixed, eager-fp16,
compile-bf16-cl, onnx-fp32 (ONNX Runtime's CUDA provider) and onnx-trt (its
TensorRT provider, fp16). An engine's time is `Engine.embed` from a prepared
batch to descriptors on the host, i.e. with the copies a query pays (ONNX
Runtime takes its input from host memory). An engine this machine cannot run
(no onnxruntime-gpu, no TensorRT provider) gets a row saying why.
FLOPs per image are counted once per input size with
torch.utils.flop_counter on the meta device (every convolution, NetVLAD's
1x1 convolution and its aggregation matmul; 2 FLOPs per multiply-add) and
cross-checked against an analytic count. Achieved TFLOP/s = FLOPs per image
x images/s; the peak (dense, no sparsity) for the mode's precision comes from
a table by device name, or --peak-tflops.

End to end: a registered VGG16+NetVLAD (K=64, max side 640; random weights,
which throughput does not depend on) and an index of synthetic images in a
temporary home; the app started in-process under uvicorn on a loopback port;
N concurrent closed-loop HTTP clients (in a separate process, so their
Python does not contend for the server's GIL) send 640x480 JPEGs. Reported
beside the model-alone bf16 figure at the server's batch size.

    python bench/gpu.py --json bench/out/gpu.json    # GPU machine: about 5 minutes on an H100
    python bench/gpu.py --dry-run                    # CPU, tiny sizes: checks that everything runs
    python bench/gpu.py --skip-server --engines onnx-trt,eager-fp16 --json bench/out/gpu_engines.json

Everything is bounded: --budget-s caps the model-alone part (rows left over
are reported as skipped) and each server setting runs --duration seconds.
"""

from __future__ import annotations

import os

# Before torch (imported below) starts its OpenMP pool, hence the late
# imports: spinning OpenMP threads slow CPU work down badly on a busy host.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import io
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # httpload, also when imported by path
from httpload import run_clients_in_process

log = logging.getLogger("gpu_bench")

MODES = ("fp32", "tf32", "bf16", "bf16-cl", "bf16-cl-compile", "fp16-cl")
PRECISION = {
    "fp32": "fp32",
    "tf32": "tf32",
    "bf16": "bf16",
    "bf16-cl": "bf16",
    "bf16-cl-compile": "bf16",
    "fp16-cl": "fp16",
}
# The serving engines measured after the modes, and the precision whose peak each is held to.
GPU_ENGINES = (
    "eager-bf16",
    "eager-bf16-cl",
    "eager-bf16-mixed",
    "eager-fp16",
    "compile-bf16-cl",
    "onnx-fp32",
    "onnx-trt",
)
ENGINE_PRECISION = {
    "eager-fp32": "fp32",
    "eager-bf16": "bf16",
    "eager-bf16-cl": "bf16",
    "eager-bf16-mixed": "bf16",
    "eager-fp16": "fp16",
    "compile-bf16-cl": "bf16",
    "onnx-fp32": "tf32",  # ONNX Runtime's CUDA provider allows TF32 by default
    "onnx-trt": "fp16",
}
MODEL_CONFIG = {
    "backbone": {"name": "vgg16"},
    "netvlad": {"clusters": 64},
    "preprocess": {"mode": "caffe", "max_side": 640},
}

# Dense peak TFLOP/s (no structured sparsity) from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(): specific names first.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM ("H100 80GB HBM3")
    ("H800", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("B200", {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("A800", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1}),
    ("L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    ("A10G", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2}),
    ("RTX 6000 Ada", {"fp32": 91.1, "tf32": 182.1, "bf16": 364.2}),
    ("V100", {"fp32": 15.7}),
    ("T4", {"fp32": 8.1}),
]


def peak_for(device_name: str, precision: str, override: float | None = None) -> float | None:
    if override:
        return override
    for pattern, peaks in PEAKS:
        if pattern.lower() in device_name.lower():
            # dense fp16 tensor-core peaks equal the bf16 ones on every card listed that has bf16
            return peaks.get(precision) or (peaks.get("bf16") if precision == "fp16" else None)
    return None


# ---- FLOPs ------------------------------------------------------------------------------------------
def counted_flops(config: dict, h: int, w: int) -> float:
    """FLOPs of one image, counted by torch's flop counter on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vpr.model.network import build_model

    with torch.device("meta"):
        net = build_model(config).eval()
    x = torch.empty(2, 3, h, w, device="meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x)
    return counter.get_total_flops() / 2


def analytic_flops(config: dict, h: int, w: int) -> float:
    """2 x multiply-adds of every Conv2d (shapes traced on the meta device),
    plus NetVLAD's aggregation (K x D x locations multiply-adds)."""
    from vpr.model.network import build_model

    with torch.device("meta"):
        net = build_model(config).eval()
    total = [0.0]
    last = {}

    def hook(m: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += 2.0 * (m.in_channels // m.groups) * k * m.out_channels * out.shape[2] * out.shape[3]
        last["shape"] = inputs[0].shape

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        net(torch.empty(1, 3, h, w, device="meta"))
    for hd in handles:
        hd.remove()
    d, hh, ww = last["shape"][1:]  # NetVLAD's 1x1 conv input: the local features
    return total[0] + 2.0 * net.netvlad.clusters * d * hh * ww


# ---- the model alone ---------------------------------------------------------------------------------
def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def mode_setup(mode: str, net: nn.Module, device: torch.device) -> tuple[Callable, Callable]:
    """(forward(x), make_input(b, h, w)) for one mode."""
    set_tf32(mode == "tf32")
    cl = "-cl" in mode
    model = net.to(memory_format=torch.channels_last) if cl else net.to(memory_format=torch.contiguous_format)
    if mode.endswith("compile"):
        model = torch.compile(model)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(PRECISION[mode])

    def forward(x: torch.Tensor) -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext(),
        ):
            return model(x)

    def make_input(b: int, h: int, w: int) -> torch.Tensor:
        x = torch.randn(b, 3, h, w, device=device)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    return forward, make_input


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(
    net: nn.Module,
    mode: str,
    h: int,
    w: int,
    batches: list[int],
    device: torch.device,
    min_seconds: float,
    warmup: int,
    deadline: float,
    flops: float,
    peak: float | None,
    min_iters: int = 3,
) -> list[dict]:
    rows = []
    try:
        forward, make_input = mode_setup(mode, net, device)
    except Exception as e:  # e.g. torch.compile without a working compiler
        return [{"mode": mode, "batch": b, "error": f"{type(e).__name__}: {e}"} for b in batches]
    broken: str | None = None
    for b in batches:
        row: dict[str, Any] = {"mode": mode, "precision": PRECISION[mode], "size": f"{h}x{w}", "batch": b}
        if time.monotonic() > deadline or broken:
            rows.append({**row, "skipped": broken or "time budget spent"})
            continue
        try:
            x = make_input(b, h, w)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            for _ in range(warmup):
                forward(x)
            sync(device)
            row["warmup_s"] = round(time.perf_counter() - t, 2)  # includes compilation for compile
            n, t0 = 0, time.perf_counter()
            while n < min_iters or (time.perf_counter() - t0 < min_seconds and n < 500):
                forward(x)
                n += 1
                if n % 5 == 0 or n < 3:
                    sync(device)
            sync(device)
            took = time.perf_counter() - t0
            ips = b * n / took
            tflops = flops * ips / 1e12
            row.update(
                iters=n,
                ms_per_batch=round(took / n * 1000, 3),
                images_per_s=round(ips, 2),
                tflops=round(tflops, 4),
                pct_of_peak=round(100 * tflops / peak, 1) if peak else None,
            )
            if device.type == "cuda":
                row["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if mode.endswith("compile"):  # a missing compiler fails every batch size alike, slowly
                broken = f"torch.compile failed at batch {b}"
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], batches: list[int]) -> str:
    """Images/s (and % of peak) by mode and batch size."""
    lines = [f"{'mode':>16} | " + " | ".join(f"b{b:<15}" for b in batches)]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        cells = []
        for b in batches:
            r = next((r for r in rows if r["mode"] == mode and r["batch"] == b), {})
            if "images_per_s" in r:
                pct = f" {r['pct_of_peak']:.0f}%" if r.get("pct_of_peak") is not None else ""
                cells.append(f"{r['images_per_s']:9.1f}/s{pct:<5}")
            else:
                cells.append(f"{'-':<16}")
        lines.append(f"{mode:>16} | " + " | ".join(cells))
    return "\n".join(lines)


def format_row(r: dict) -> str:
    head = f"{r['mode']:>16} b{r['batch']:<3}"
    if "images_per_s" not in r:
        return f"{head} {r.get('error') or r.get('skipped')}"
    pct = f"{r['pct_of_peak']:5.1f}% of peak" if r.get("pct_of_peak") is not None else "peak unknown"
    return f"{head} {r['images_per_s']:9.2f} img/s {r['ms_per_batch']:9.2f} ms/batch {r['tflops']:8.2f} TFLOP/s {pct}"


# ---- the serving engines ------------------------------------------------------------------------------------
def engine_rows(
    engines: list[str],
    config: dict,
    h: int,
    w: int,
    batches: list[int],
    device: torch.device,
    min_seconds: float,
    deadline: float,
    flops: float,
    peak: Callable[[str], float | None],
    min_iters: int = 3,
) -> list[dict]:
    """images/s of each engine's `embed` at h x w, per batch size; a row with the
    reason for an engine that cannot run here or fails."""
    from vpr.model.engines import prepare, unavailable
    from vpr.model.network import build_model
    from vpr.model.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="vpr-gpu-engines-"))
    rows: list[dict] = []
    try:
        reg = Registry(work / "models")
        torch.manual_seed(0)
        ref = reg.register("gpu-engines", build_model(config), role="teacher")
        if any(e.startswith("onnx") for e in engines) and unavailable("onnx-fp32", "cpu") is None:
            from vpr.model.export import export_model

            t = time.perf_counter()
            export_model(reg, ref, "onnx")
            print(f"  ONNX export of the benchmark model: {time.perf_counter() - t:.1f} s", flush=True)
        model = reg.load(ref, device)
        for name in engines:
            precision = ENGINE_PRECISION.get(name, "fp32")
            base: dict[str, Any] = {"mode": f"engine:{name}", "precision": precision, "size": f"{h}x{w}"}
            why = unavailable(name, device, model)
            if why is not None:
                rows += [{**base, "batch": b, "skipped": why} for b in batches]
                print(f"  engine {name}: {why}", flush=True)
                continue
            try:
                t = time.perf_counter()
                eng = prepare(model, name, device)
                base["prepare_s"] = round(time.perf_counter() - t, 2)
            except Exception as e:
                rows += [{**base, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"} for b in batches]
                continue
            for b in batches:
                row = {**base, "batch": b}
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "time budget spent"})
                    continue
                try:
                    x = torch.randn(b, 3, h, w, device=device) * 60
                    t = time.perf_counter()
                    eng.embed(x)  # compiles / builds the TensorRT engine for this shape
                    eng.embed(x)
                    row["warmup_s"] = round(time.perf_counter() - t, 2)
                    n, t0 = 0, time.perf_counter()
                    while n < min_iters or (time.perf_counter() - t0 < min_seconds and n < 500):
                        eng.embed(x)  # returns host numpy: synchronised
                        n += 1
                    took = time.perf_counter() - t0
                    ips = b * n / took
                    tflops = flops * ips / 1e12
                    top = peak(precision)
                    row.update(
                        iters=n,
                        ms_per_batch=round(took / n * 1000, 3),
                        images_per_s=round(ips, 2),
                        tflops=round(tflops, 4),
                        pct_of_peak=round(100 * tflops / top, 1) if top else None,
                    )
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(format_row(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ---- end to end -------------------------------------------------------------------------------------------
def synthetic_jpegs(n: int, size: tuple[int, int], seed: int, folder: Path | None = None) -> list[bytes]:
    """Smooth random textures (distinct places), as JPEG bytes (and files when `folder`)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
        if folder is not None:
            (folder / f"img{i:04d}.jpg").write_bytes(out[-1])
    return out


def build_served_home(
    work: Path, config: dict, db_images: int, size: tuple[int, int], device: torch.device
) -> tuple[Path, str, str]:
    from vpr.index.meta import Entry
    from vpr.index.store import IndexStore
    from vpr.model.network import build_model
    from vpr.model.registry import Registry

    home = work / "home"
    reg = Registry(home / "models")
    torch.manual_seed(0)
    ref = reg.register("gpu-bench", build_model(config), role="teacher", details={"weights": "random (benchmark)"})
    reg.activate(ref)
    db = work / "db"
    synthetic_jpegs(db_images, size, seed=1, folder=db)
    entries = [Entry(p, p.stem) for p in sorted(db.glob("*.jpg"))]
    index = IndexStore(home / "indexes").build(
        "gpu-bench", reg.load(ref, device), entries, root=db, batch_size=16, device=device
    )
    return home, str(ref), str(index)


def end_to_end(
    args: argparse.Namespace, device: torch.device, config: dict, size: tuple[int, int], alone_bf16: dict[int, float]
) -> dict:
    from vpr.server.app import create_app
    from vpr.server.harness import ThreadServer
    from vpr.settings import ServerSettings

    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="vpr-gpu-bench-"))
    t = time.perf_counter()
    home, model, index = build_served_home(work, config, args.db_images, size, device)
    queries = work / "queries"
    synthetic_jpegs(args.query_images, size, seed=2, folder=queries)
    out: dict[str, Any] = {
        "setup_s": round(time.perf_counter() - t, 1),
        "model": model,
        "index": index,
        "query_size": f"{size[0]}x{size[1]}",
        "db_images": args.db_images,
        "settings": [],
    }
    # The clients run in their own process (bench/httpload.py), apart from the server's GIL.
    for max_batch in [int(b) for b in args.server_batches.split(",")]:
        settings = ServerSettings(
            home=home,
            model=model,
            index=index,
            device=str(device),
            log_level="warning",
            access_log=False,
            max_batch_size=max_batch,
            max_wait_ms=args.max_wait_ms,
            queue_size=max(64, 4 * max(clients)),
            max_batch_files=16,
            decode_threads=min(16, max(2, os.cpu_count() or 2)),
            warmup=True,
        )
        rows = []
        with ThreadServer(create_app(settings)).start(timeout=300) as srv:
            for n in clients:
                row = run_clients_in_process(srv.url, queries, n, args.duration, args.warmup)
                ref = alone_bf16.get(max_batch) or (max(alone_bf16.values()) if alone_bf16 else None)
                row["ratio_to_model_alone_bf16"] = round(row["throughput_per_s"] / ref, 3) if ref else None
                lat = row["latency_ms"]
                print(
                    f"  server max_batch {max_batch:3d} N={n:3d}: {row['throughput_per_s']:8.2f} req/s "
                    f"p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms batch "
                    f"{row['mean_batch_size']} statuses {row['statuses']} errors {row['errors']}",
                    flush=True,
                )
                rows.append(row)
        out["settings"].append({"max_batch_size": max_batch, "max_wait_ms": args.max_wait_ms, "rows": rows})
    shutil.rmtree(work, ignore_errors=True)
    return out


# ---- the run -------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
        h, w = 64, 80
        batches, modes = [1, 2], [m for m in MODES if not m.endswith("compile") and "fp16" not in m]
        engines = ["eager-fp32", "eager-bf16-cl", "onnx-fp32", "onnx-trt"]  # onnx-trt: its "cannot run" row
        config = {**MODEL_CONFIG, "netvlad": {"clusters": 8}, "preprocess": {"mode": "caffe", "max_side": 80}}
        args.clients, args.duration, args.warmup = "1,2", min(args.duration, 1.0), min(args.warmup, 0.5)
        args.db_images, args.query_images, args.server_batches = 4, 4, "4"
        args.min_seconds, args.warmup_iters, args.min_iters = min(args.min_seconds, 0.1), 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run to check the script on CPU")
        device = torch.device("cuda")
        h, w = (int(v) for v in args.size.split("x"))
        batches = [int(b) for b in args.batches.split(",")]
        modes = [m for m in args.modes.split(",") if m]
        engines = [e for e in args.engines.split(",") if e]
        config = MODEL_CONFIG
        unknown = set(modes) - set(MODES)
        if unknown:
            raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    flops, flops_analytic = counted_flops(config, h, w), analytic_flops(config, h, w)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "host": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "size": f"{h}x{w}",
        "config": config,
        "gflop_per_image": round(flops / 1e9, 3),
        "gflop_per_image_analytic": round(flops_analytic / 1e9, 3),
        "peaks_tflops": {p: peak_for(name, p, args.peak_tflops) for p in ("fp32", "tf32", "bf16")},
        "model_alone": [],
    }
    print(
        f"{name}: VGG16+NetVLAD at {h}x{w}, {flops / 1e9:.1f} GFLOP/image "
        f"(analytic {flops_analytic / 1e9:.1f}); peaks {report['peaks_tflops']}",
        flush=True,
    )

    from vpr.model.network import build_model

    deadline = time.monotonic() + args.budget_s
    for mode in modes:
        net = build_model(config).to(device).eval()
        peak = peak_for(name, PRECISION[mode], args.peak_tflops)
        report["model_alone"] += time_rows(
            net, mode, h, w, batches, device, args.min_seconds, args.warmup_iters, deadline, flops, peak, args.min_iters
        )
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    set_tf32(True)
    report["engines"] = []
    if engines:
        print("the serving engines (vpr.model.engines)", flush=True)
        report["engines"] = engine_rows(
            engines,
            config,
            h,
            w,
            batches,
            device,
            args.min_seconds,
            deadline + args.engine_budget_s,
            flops,
            lambda precision: peak_for(name, precision, args.peak_tflops),
            args.min_iters,
        )
    report["peaks_tflops"]["fp16"] = peak_for(name, "fp16", args.peak_tflops)
    print(f"\nimages/s at {h}x{w} (% of the precision's peak)\n" + table(report["model_alone"], batches), flush=True)
    if report["engines"]:
        print(f"\nengines, images/s at {h}x{w}\n" + table(report["engines"], batches), flush=True)
    best = [r for r in report["model_alone"] if "images_per_s" in r]
    if best:
        top = max(best, key=lambda r: r["images_per_s"])
        report["best"] = {k: top[k] for k in ("mode", "batch", "images_per_s", "tflops", "pct_of_peak")}
    alone_bf16 = {r["batch"]: r["images_per_s"] for r in best if r["mode"] == "bf16"}

    if not args.skip_server:
        print("end to end: the app under uvicorn on loopback, concurrent HTTP clients", flush=True)
        size = (w, h)  # PIL: width, height
        report["server"] = end_to_end(args, device, config, size, alone_bf16)
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    print(f"done in {report['elapsed_s']} s", flush=True)
    if args.json:
        from vpr.model.fileio import atomic_write_json

        atomic_write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compile: checks the script runs")
    p.add_argument("--size", default="480x640", help="HxW of the model-alone inputs (default 480x640)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per row")
    p.add_argument("--warmup-iters", type=int, default=3)
    p.add_argument("--min-iters", type=int, default=3, help="timed passes per row, at least")
    p.add_argument("--budget-s", type=float, default=330.0, help="cap on the model-alone part (rows after it skip)")
    p.add_argument("--engines", default=",".join(GPU_ENGINES), help="serving engines to time after the modes")
    p.add_argument("--engine-budget-s", type=float, default=240.0, help="extra seconds the engine rows may take")
    p.add_argument("--peak-tflops", type=float, help="the card's peak for every precision (overrides the table)")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per server setting")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each server setting")
    p.add_argument("--server-batches", default="8,32", help="server max_batch_size values to run")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--db-images", type=int, default=200)
    p.add_argument("--query-images", type=int, default=64)
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
