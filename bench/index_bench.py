"""Benchmark FAISS index types on clustered synthetic place descriptors.

For each factory spec (built exactly as `vpr index build` builds it, through
`index.faiss_backend.build_index`) and each search setting: build time,
bytes per vector on disk (ids included), single-query latency (p50/p99),
batch-of-64 latency, and recall@1 against exact `Flat` search.

    .venv/bin/python bench/index_bench.py --n 1000000 --dim 512 --out bench/index_512.json
    .venv/bin/python bench/index_bench.py --n 100000 --dim 4096 --out bench/index_4096.json
    .venv/bin/python bench/index_bench.py --n 20000 --dim 128 --specs "Flat" "HNSW32:efSearch=64,128"

A spec argument is `FACTORY[:PARAM=V1,V2,...]`, e.g. `IVF4096,PQ64:nprobe=8,32`
(the parameter after the last ':'). Results go to stdout as a Markdown table
and, with --out, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpr.index import faiss_backend as fb
from vpr.index.synthetic import clustered_descriptors

log = logging.getLogger("index_bench")


def default_specs(n: int, dim: int) -> list[str]:
    """IVF lists ~ 4*sqrt(n) (a power of two); PQ with 64 and 32 bytes/vector."""
    nlist = int(2 ** round(np.log2(max(16, 4 * np.sqrt(n)))))
    m_big = 64 if dim % 64 == 0 else 32
    specs = [
        "Flat",
        f"IVF{nlist},Flat:nprobe=8,32",
        f"IVF{nlist},PQ{m_big}:nprobe=8,32",
        f"IVF{nlist},PQ32:nprobe=8,32",
        f"PCA256,L2norm,IVF{nlist},PQ32:nprobe=8,32" if dim > 256 else None,
        "HNSW32:efSearch=64,128",
    ]
    return [s for s in specs if s]


def parse_spec(arg: str) -> tuple[str, list[dict | None]]:
    factory, sep, tail = arg.rpartition(":")
    if not sep or "=" not in tail:
        return arg, [None]
    key, _, values = tail.partition("=")
    return factory, [{key: int(v)} for v in values.split(",")]


def file_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss", dir=os.environ.get("BENCH_TMP")) as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def latency(index: faiss.Index, queries: np.ndarray, params: dict | None, k: int, single: int, batches: int) -> dict:
    sp = fb.search_parameters(index, params)

    def run(x: np.ndarray) -> float:
        t = time.perf_counter()
        index.search(x, k, params=sp) if sp is not None else index.search(x, k)
        return time.perf_counter() - t

    run(queries[:64])  # warm-up
    one = np.array([run(queries[i : i + 1]) for i in range(min(single, len(queries)))]) * 1e3
    b64 = np.array([run(queries[(i * 64) % len(queries) :][:64]) for i in range(batches)]) * 1e3
    return {
        "single_p50_ms": float(np.median(one)),
        "single_p99_ms": float(np.percentile(one, 99)),
        "batch64_ms": float(np.median(b64)),
        "batch64_per_query_ms": float(np.median(b64) / 64),
    }


def bench(args: argparse.Namespace) -> list[dict]:
    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    db, queries, _ = clustered_descriptors(
        args.n, args.dim, n_queries=args.queries, seed=args.seed, spread=args.spread, query_noise=args.query_noise
    )
    log.info("data: %d x %d database, %d queries (%.1fs)", args.n, args.dim, len(queries), time.perf_counter() - t)
    ids = np.arange(args.n, dtype=np.int64)
    truth = None
    rows = []
    specs = args.specs or default_specs(args.n, args.dim)
    if not specs[0].startswith("Flat"):
        specs = ["Flat"] + specs  # ground truth first
    for arg in specs:
        factory, settings = parse_spec(arg)
        log.info("building %s", factory)
        t = time.perf_counter()
        try:
            index = fb.build_index(db, ids, factory, max_train=args.max_train, normalized=True)
        except (ValueError, RuntimeError) as e:
            log.error("%s: %s", factory, e)
            rows.append({"factory": factory, "error": str(e)})
            continue
        build_s = time.perf_counter() - t
        size = file_bytes(index)
        for params in settings:
            sp = fb.search_parameters(index, params)
            _, found = index.search(queries, 1, params=sp) if sp is not None else index.search(queries, 1)
            if truth is None:
                truth = found[:, 0].copy()
            row = {
                "factory": factory,
                "params": params or {},
                "n": args.n,
                "dim": args.dim,
                "build_s": round(build_s, 2),
                "bytes_per_vector": round(size / args.n, 1),
                "recall_at_1_vs_flat": float((found[:, 0] == truth).mean()),
                **{
                    k: round(v, 4)
                    for k, v in latency(index, queries, params, args.k, args.single, args.batches).items()
                },
            }
            rows.append(row)
            log.info("%s", json.dumps(row))
            if args.out:
                save(args, rows)
        del index
    return rows


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"faiss {faiss.__version__}, {args.threads} threads",
        "args": vars(args),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")


def table(rows: list[dict]) -> str:
    head = (
        "| factory | params | build s | bytes/vec | 1-query p50 ms | 1-query p99 ms | batch-64 ms | "
        "recall@1 vs Flat |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['factory']} | error: {r['error']} | | | | | | |")
            continue
        p = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['factory']} | {p} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | "
            f"{r['single_p50_ms']:.3f} | {r['single_p99_ms']:.3f} | {r['batch64_ms']:.2f} | "
            f"{r['recall_at_1_vs_flat']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (and latency samples)")
    p.add_argument("--specs", nargs="*", help="FACTORY[:PARAM=V1,V2] (default: a size-dependent set)")
    p.add_argument("--k", type=int, default=10, help="k for the latency runs")
    p.add_argument("--single", type=int, default=200, help="single queries timed")
    p.add_argument("--batches", type=int, default=20, help="batches of 64 timed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-train", type=int, default=fb.DEFAULT_MAX_TRAIN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--spread",
        type=float,
        default=0.6,
        help="place spread around cluster centres (larger: clusters overlap, harder for IVF)",
    )
    p.add_argument("--query-noise", type=float, default=0.5, help="query distance from its source image")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = bench(args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
