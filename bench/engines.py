"""Inference engines on this CPU, in one run: speed through the real server, and the accuracy guard.

Same model, same index, same images for every engine (`vpr.model.engines`):

  (a) in-process: ms per forward pass of each engine at the served input
      shape, batch 1 and 4 (inputs ready; `Engine.embed`);
  (b) the server: `vpr serve` (a subprocess, `server.harness.ServeProcess`)
      with `VPR_ENGINE=<engine>`, closed-loop HTTP clients (1 and 4) sending
      Gardens Point day_right JPEGs; queries/s and latency, and the ratio to
      eager-fp32's queries/s at the same client count. `/readyz` must report
      the engine asked for (a fallback would measure the wrong thing);
  (c) the accuracy guard on Gardens Point: database `day_left` described once
      by the teacher with the reference engine (eager fp32), queries
      `day_right` and `night_right` described by the student with each engine
      at the headline qualities; recall@1 and @5 per cell, the gap to eager
      fp32 per cell, and the mean cosine of each query descriptor to its fp32
      twin. An engine passes when every cell's recall@1 is within 0.5 points
      of eager fp32 and the mean cosine is at least 0.99.

The ONNX exports (`vpr model export`, int8 calibrated on `--calibration-count`
day_left images drawn with `--seed`) and the index are made in `--home` when
missing. Settings are fixed by the flags below before running; nothing is
tuned on the queries. Results are written after each phase (and each guard
engine), so a run stopped early keeps what it measured.

    nice -n 10 .venv/bin/python bench/engines.py --home /tmp/engines-home \\
        --teacher gardens-vgg16-k64-ms320-upsample@1 --student gardens-student@1 \\
        --json bench/results/engines_cpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its pool (see server_bench.py)

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpload import run_clients

from vpr.data.datasets import PlaceDataset, open_dataset
from vpr.describe.cache import DescriptorCache
from vpr.describe.describe import describe
from vpr.evaluation.evaluate import recall_at_n
from vpr.model.engines import prepare, unavailable
from vpr.model.export import export_model
from vpr.model.extract import cpu_name
from vpr.model.fileio import atomic_write_json
from vpr.model.preprocess import load_image, to_input
from vpr.model.registry import Registry, RegistryError
from vpr.server.harness import ServeProcess
from vpr.settings import HomeSettings

log = logging.getLogger("engines")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VPR_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "datasets" / "gardens_point_walking"
QUALITIES = "orig,h240,h180-jpeg20,h120-jpeg20,h180-h264-qp40"
ENGINES = "eager-fp32,eager-bf16-mixed,eager-bf16-cl,onnx-int8,onnx-fp32,eager-fp32-cl,eager-bf16"
REFERENCE = "eager-fp32"
MAX_GAP_POINTS = 0.5
MIN_COSINE = 0.99


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- setup ---------------------------------------------------------------------------------------------
def ensure_exports(reg: Registry, student: str, count: int, seed: int) -> dict[str, Any]:
    """The student's ONNX export and its int8 quantization (calibrated on day_left), made when missing."""
    out: dict[str, Any] = {}
    try:
        out["onnx"] = reg.artifact(student, "onnx")[1]
    except RegistryError:
        out["onnx"] = export_model(reg, student, "onnx", check_images=sorted((GARDENS / "day_right").glob("*.jpg"))[:2])
    try:
        entry = reg.artifact(student, "onnx-int8")[1]
        cal = entry.get("calibration", {})
        if (
            cal.get("images") != count
            or cal.get("seed") != seed
            or entry.get("fp32_source_sha256") != out["onnx"]["sha256"]
        ):
            raise RegistryError("other calibration")
    except RegistryError:
        t = time.perf_counter()
        entry = export_model(
            reg, student, "onnx-int8", calibration=GARDENS / "day_left", calibration_count=count, seed=seed
        )
        entry["made_in_s"] = round(time.perf_counter() - t, 1)
    out["onnx-int8"] = entry
    return {
        k: {f: v.get(f) for f in ("sha256", "bytes", "source", "check", "calibration", "made_in_s")}
        for k, v in out.items()
    }


def ensure_index(home: Path, teacher: str, name: str) -> str:
    from vpr.index.meta import Entry
    from vpr.index.ops import build_index
    from vpr.index.store import IndexStore

    store = IndexStore(home / "indexes")
    if name in store.names():
        return str(store.resolve(name))
    db = sorted((GARDENS / "day_left").glob("*.jpg"))
    ref = build_index(
        HomeSettings(home=home),
        teacher,
        name,
        items=[Entry(p, p.stem) for p in db],
        root=GARDENS / "day_left",
        batch_size=8,
        device="cpu",
    )
    return str(ref)


# ---- (a) in-process --------------------------------------------------------------------------------------
def in_process(reg: Registry, student: str, engines: list[str], shape: tuple[int, int], seconds: float) -> list[dict]:
    model = reg.load(student, "cpu")
    rows = []
    for name in engines:
        t = time.perf_counter()
        eng = prepare(model, name, "cpu")
        prepared_s = time.perf_counter() - t
        for b in (1, 4):
            x = torch.randn(b, 3, *shape) * 60
            eng.embed(x)  # warm-up (compilation, oneDNN primitive caches)
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < seconds:
                eng.embed(x)
                n += 1
            ms = (time.perf_counter() - t0) / n * 1000
            rows.append(
                {
                    "engine": name,
                    "batch": b,
                    "ms_per_batch": round(ms, 1),
                    "images_per_s": round(b * 1000 / ms, 2),
                    "prepare_s": round(prepared_s, 1),
                }
            )
            print(f"  {name:16s} batch {b}: {ms:7.1f} ms/batch, {b * 1000 / ms:6.2f} img/s", flush=True)
    return rows


# ---- (b) the server --------------------------------------------------------------------------------------
def through_server(
    home: Path,
    student: str,
    index: str,
    engines: list[str],
    clients: list[int],
    payloads: list,
    duration: float,
    warmup: float,
    work: Path,
) -> list[dict]:
    rows: list[dict] = []
    for name in engines:
        env = {"VPR_DEVICE": "cpu", "VPR_ENGINE": name, "VPR_ACCESS_LOG": "false", "VPR_LOG_LEVEL": "warning"}
        server = ServeProcess(
            home, work / f"serve-{name}.log", args=["--model", student, "--index", index], env=env, cwd=REPO
        )
        with server.start(timeout=600) as srv:
            ready = srv.wait_ready()
            got = (ready.get("engine") or {}).get("name")
            if got != name:
                raise SystemExit(f"the server runs {got}, not {name}: {ready.get('engine')}")
            for n in clients:
                r = run_clients(srv.url, payloads, n, duration, warmup=warmup)
                row = {
                    "engine": name,
                    "clients": n,
                    "queries_per_s": r["throughput_per_s"],
                    "latency_ms": r["latency_ms"],
                    "mean_batch_size": r["mean_batch_size"],
                    "statuses": r["statuses"],
                    "errors": r["errors"],
                    "loadavg": loadavg(),
                }
                rows.append(row)
                print(
                    f"  {name:16s} N={n}: {row['queries_per_s']:.2f} q/s, p50 {row['latency_ms']['p50']} ms", flush=True
                )
    base = {r["clients"]: r["queries_per_s"] for r in rows if r["engine"] == REFERENCE}
    for r in rows:
        r["ratio_to_eager_fp32"] = round(r["queries_per_s"] / base[r["clients"]], 3) if base.get(r["clients"]) else None
    return rows


# ---- (c) the accuracy guard ----------------------------------------------------------------------------------
def query_sets(step: int) -> dict[str, PlaceDataset]:
    out = {}
    for q in ("day_right", "night_right"):
        ds = open_dataset(
            "traversal", GARDENS, database="day_left", queries=q, ground_truth=GARDENS / "ground_truth.csv"
        )
        if step > 1:  # an evenly spread subset, fixed by --query-step before running
            keep = list(range(0, len(ds.queries), step))
            ds = PlaceDataset(
                ds.name, ds.root, ds.database, [ds.queries[i] for i in keep], [ds.positives[i] for i in keep], ds.info
            )
        out[q] = ds
    return out


def database_from_index(home: Path, index: str, teacher: str, db_paths: list[Path]) -> np.ndarray | None:
    """The database descriptors the teacher gave the index (a Flat index keeps them
    exactly), in the dataset's order; None when the index is not that."""
    import faiss

    from vpr.index.store import IndexStore

    loaded = IndexStore(home / "indexes").load(index)
    try:
        if loaded.manifest.get("model") != teacher or loaded.manifest.get("factory") != "Flat":
            return None
        meta = loaded.meta(range(loaded.count))
        by_name = {Path(m["path"]).name: i for i, m in meta.items()}
        if sorted(by_name) != sorted(p.name for p in db_paths):
            return None
        idx = faiss.read_index(str(home / "indexes" / index.replace("@", "/") / "index.faiss"))
        ids = faiss.vector_to_array(idx.id_map)
        vectors = faiss.downcast_index(idx.index).reconstruct_n(0, idx.ntotal)
        row = {int(i): r for r, i in enumerate(ids)}
        return np.stack([vectors[row[by_name[p.name]]] for p in db_paths]).astype(np.float32)
    finally:
        loaded.close()


def changed_answers(db: np.ndarray, ref: np.ndarray, d: np.ndarray, positives) -> dict:
    """Queries whose top-1 differs from eager fp32's, how many turned right or wrong,
    and how close they were to a tie under fp32 (the gap between its two best
    database scores): a change of engine can only flip near-ties."""
    s_ref, s_eng = ref @ db.T, d @ db.T
    top_ref, top_eng = s_ref.argmax(1), s_eng.argmax(1)
    changed = np.flatnonzero(top_ref != top_eng)
    two = np.sort(s_ref[changed], axis=1)[:, -2:] if changed.size else np.zeros((0, 2))
    right = [bool(np.isin(top_eng[i], positives[i])) for i in changed]
    was_right = [bool(np.isin(top_ref[i], positives[i])) for i in changed]
    return {
        "changed_top1": int(changed.size),
        "changed_to_right": int(sum(r and not w for r, w in zip(right, was_right))),
        "changed_to_wrong": int(sum(w and not r for r, w in zip(right, was_right))),
        "changed_max_fp32_gap": float((two[:, 1] - two[:, 0]).max()) if changed.size else None,
    }


def guard(
    home: Path,
    index: str,
    reg: Registry,
    teacher: str,
    student: str,
    engines: list[str],
    qualities: list[str],
    step: int,
    cache: DescriptorCache,
    report: dict,
    save,
) -> None:
    sets = query_sets(step)
    t_model, s_model = reg.load(teacher, "cpu"), reg.load(student, "cpu")
    db_paths = [it.path for it in next(iter(sets.values())).database]
    t = time.perf_counter()
    db = database_from_index(home, index, teacher, db_paths)
    source = "the index's Flat vectors (the teacher, eager-fp32)" if db is not None else "described"
    if db is not None:  # the index's vectors are what describe gives: checked on two images
        probe = describe(t_model, db_paths[:2], "orig").desc
        if float((probe * db[:2]).sum(1).min()) < 0.9999:
            raise SystemExit(f"{index}: its vectors are not the teacher's descriptors of {db_paths[0].parent}")
    else:
        db = describe(t_model, db_paths, "orig", cache=cache, progress="database (teacher, eager-fp32)").desc
    report["guard"]["database"] = {"from": source, "s": round(time.perf_counter() - t, 1)}
    ref: dict[tuple[str, str], np.ndarray] = {}
    for name in [REFERENCE, *[e for e in engines if e != REFERENCE]]:
        cells = []
        t = time.perf_counter()
        for set_name, ds in sets.items():
            paths = [it.path for it in ds.queries]
            for q in qualities:
                d = describe(s_model, paths, q, cache=cache, engine=name, progress=f"{name} {set_name} {q}").desc
                if name == REFERENCE:
                    ref[(set_name, q)] = d
                r = recall_at_n(db, d, ds.positives, (1, 5))
                cos = (d * ref[(set_name, q)]).sum(1)
                cells.append(
                    {
                        "set": set_name,
                        "quality": q,
                        "queries": len(paths),
                        "r1": round(100 * r[1], 2),
                        "r5": round(100 * r[5], 2),
                        "mean_cosine": float(cos.mean()),
                        "min_cosine": float(cos.min()),
                        **changed_answers(db, ref[(set_name, q)], d, ds.positives),
                    }
                )
        base = {
            (c["set"], c["quality"]): c["r1"] for c in report["guard"]["engines"].get(REFERENCE, {}).get("cells", cells)
        }
        for c in cells:
            c["r1_gap"] = round(c["r1"] - base[(c["set"], c["quality"])], 2)
        mean_cos = float(np.mean([c["mean_cosine"] for c in cells]))
        worst = max(abs(c["r1_gap"]) for c in cells)
        loss = max(max(-c["r1_gap"] for c in cells), 0.0)
        report["guard"]["engines"][name] = {
            "cells": cells,
            "mean_cosine": round(mean_cos, 6),
            "worst_r1_gap": worst,
            "passes": bool(worst <= MAX_GAP_POINTS and mean_cos >= MIN_COSINE),  # the two-sided band
            "worst_r1_loss": loss,
            "passes_losses_only": bool(loss <= MAX_GAP_POINTS and mean_cos >= MIN_COSINE),  # gains allowed
            "changed_top1": sum(c["changed_top1"] for c in cells),
            "changed_to_right": sum(c["changed_to_right"] for c in cells),
            "changed_to_wrong": sum(c["changed_to_wrong"] for c in cells),
            "changed_max_fp32_gap": max((c["changed_max_fp32_gap"] or 0.0 for c in cells), default=0.0),
            "seconds": round(time.perf_counter() - t, 1),
            "loadavg": loadavg(),
        }
        print(
            f"  guard {name}: worst |r@1 gap| {worst} pts, mean cosine {mean_cos:.5f}, "
            f"passes {report['guard']['engines'][name]['passes']}; top-1 changed for "
            f"{report['guard']['engines'][name]['changed_top1']} queries "
            f"(fp32 gaps <= {report['guard']['engines'][name]['changed_max_fp32_gap']:.1e})",
            flush=True,
        )
        save()


# ---- the run --------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    home = Path(args.home)
    reg = Registry(home / "models")
    engines = [e for e in args.engines.split(",") if e]
    phases = set(args.phases.split(","))
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "note": "2-core VM shared with other work while measuring",
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "loadavg": {"start": loadavg()},
    }

    def save() -> None:
        if args.json:
            atomic_write_json(Path(args.json), report)

    for name in engines:
        why = unavailable(name, "cpu")
        if why:
            raise SystemExit(why)
    report["exports"] = ensure_exports(reg, args.student, args.calibration_count, args.seed)
    index = ensure_index(home, args.teacher, args.index)
    report["setup"] = {"home": str(home), "teacher": args.teacher, "student": args.student, "index": index}
    queries = sorted((GARDENS / "day_right").glob("*.jpg"))[: args.query_images]
    payloads = [(p.read_bytes(), "image/jpeg") for p in queries]
    shape = tuple(to_input(load_image(queries[0]), reg.load(args.student).net.config.preprocess).shape[1:])
    report["setup"]["served_input"] = f"{shape[0]}x{shape[1]}"
    save()
    if "inprocess" in phases:
        print("(a) in-process forward pass per engine", flush=True)
        report["in_process"] = in_process(reg, args.student, engines, shape, args.model_seconds)  # type: ignore[arg-type]
        report["loadavg"]["after_in_process"] = loadavg()
        save()
    if "server" in phases:
        print(f"(b) the server, {args.duration:g} s per setting", flush=True)
        with tempfile.TemporaryDirectory(prefix="vpr-engines-") as work:
            clients = [int(c) for c in args.clients.split(",")]
            report["server"] = through_server(
                home, args.student, index, engines, clients, payloads, args.duration, args.warmup, Path(work)
            )
        report["loadavg"]["after_server"] = loadavg()
        save()
    if "guard" in phases:
        print("(c) the accuracy guard on Gardens Point", flush=True)
        report["guard"] = {
            "qualities": args.qualities,
            "query_step": args.query_step,
            "max_r1_gap_points": MAX_GAP_POINTS,
            "min_mean_cosine": MIN_COSINE,
            "engines": {},
        }
        guard(
            home,
            report["setup"]["index"],
            reg,
            args.teacher,
            args.student,
            [e for e in engines if e in args.guard_engines.split(",")],
            args.qualities.split(","),
            args.query_step,
            DescriptorCache(home / "cache"),
            report,
            save,
        )
        report["loadavg"]["end"] = loadavg()
        save()
    if args.json:
        print(f"wrote {args.json}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="a VPR home with the teacher and the student")
    p.add_argument("--teacher", required=True, help="database model NAME@VERSION")
    p.add_argument("--student", required=True, help="query model NAME@VERSION")
    p.add_argument("--index", default="gardens-day-left", help="index of day_left by the teacher (built when missing)")
    p.add_argument("--engines", default=ENGINES, help=f"engines, comma-separated (default {ENGINES})")
    p.add_argument("--guard-engines", default=ENGINES, help="engines the accuracy guard runs (default: all)")
    p.add_argument("--phases", default="inprocess,server,guard")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per server setting (10)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each (3)")
    p.add_argument("--model-seconds", type=float, default=3.0, help="seconds per in-process measurement (3)")
    p.add_argument("--query-images", type=int, default=100, help="day_right JPEGs the clients cycle through (100)")
    p.add_argument("--qualities", default=QUALITIES)
    p.add_argument("--query-step", type=int, default=1, help="guard on every Nth query (1: all 200 per set)")
    p.add_argument("--calibration-count", type=int, default=64, help="day_left images calibrating int8 (64)")
    p.add_argument("--seed", type=int, default=0, help="which images calibrate int8 (0)")
    p.add_argument("--json", help="write the report here (e.g. bench/results/engines_cpu.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
