"""Throughput through nginx with 1 and 2 replicas, as a ratio, in one run (not a test).

Two `vpr serve` subprocesses over one home (the one harness, vpr.server.harness),
each with the same fixed settings, and nginx with deploy/nginx/nginx.conf on
loopback (NginxProxy) in front of one of them, then of both. N closed-loop HTTP
clients (bench/httpload.py) send real JPEGs (Gardens Point day_right) through
the proxy; for each N the report gives req/s and latency with 1 replica, with 2,
their ratio, and (for the proxy's own cost) 1 replica without the proxy. The
three settings alternate within each of `--rounds` rounds and each figure is the
median over the rounds (a shared machine's load drifts). Which replica answered
is counted from each replica's own request metrics.

On a machine without GPUs the replicas share its cores, so a second replica adds
little or nothing (each forward pass already uses every core); the point of
replicas is one per GPU. The load average is recorded (the machine may be shared).

    nice -n 10 python bench/replicas.py --json bench/results/replicas.json
    python bench/replicas.py --home var --model student --index gardens --clients 4,16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch, as in server_bench.py

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from httpload import run_clients
from prometheus_client.parser import text_string_to_metric_families
from server_bench import SHARED, build_bench_home, loadavg

from vpr.model.extract import cpu_name
from vpr.model.fileio import atomic_write_json
from vpr.model.preprocess import list_images
from vpr.server.harness import NginxProxy, ServeProcess

REPO = Path(__file__).resolve().parents[1]


def query_count(url: str) -> int:
    """Queries this replica has answered (its vpr_http_requests_total for /v1/query)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return int(
        sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "vpr_http_requests_total" and s.labels.get("route") == "/v1/query"
        )
    )


def measure(url: str, payloads: list[tuple[bytes, str]], clients: int, args: argparse.Namespace) -> dict[str, Any]:
    row = run_clients(url, payloads, clients, args.duration, warmup=args.warmup)
    row["loadavg"] = loadavg()
    lat = row["latency_ms"]
    print(
        f"    N={clients:3d}: {row['throughput_per_s']:.2f} req/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"statuses {row['statuses']}, errors {row['errors']}",
        flush=True,
    )
    return row


def measure_at(
    url: str, replicas: list[ServeProcess], payloads: list[tuple[bytes, str]], n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One setting, with how many queries each replica answered during it."""
    before = [query_count(r.url) for r in replicas]
    row = measure(url, payloads, n, args)
    row["answered_by_replica"] = [query_count(r.url) - b for r, b in zip(replicas, before, strict=True)]
    return row


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    shared = Path(args.shared)
    clients = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "note": "a shared 2-core VM when run by the project; clients, nginx and replicas share the cores",
        },
        "loadavg": {"start": loadavg()},
    }
    work = Path(tempfile.mkdtemp(prefix="vpr-replicas-bench-"))
    replicas: list[ServeProcess] = []
    try:
        if args.home:
            if not (args.model and args.index):
                raise SystemExit("--home needs --model and --index")
            home, model, index = Path(args.home), args.model, args.index
        else:
            print(f"setting up a VGG16 teacher and an index of {args.db_images} day_left images under {work}")
            home, model, index = build_bench_home(work, shared, args.max_side, args.clusters, args.db_images)
        queries = list_images(shared / "datasets" / "gardens_point_walking" / "day_right")[: args.query_images]
        payloads = [(p.read_bytes(), "image/jpeg") for p in queries]
        env = {
            "VPR_DEVICE": "cpu",
            "VPR_ACCESS_LOG": "false",
            "VPR_LOG_LEVEL": "warning",
            "VPR_MAX_BATCH_SIZE": str(args.batch),
        }
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        report["setup"] = {
            "home": str(home),
            "model": model,
            "index": index,
            "max_side": args.max_side,
            "clusters": args.clusters,
            "db_images": args.db_images,
            "query_images": len(payloads),
            "replica_env": env,
            "proxy": "nginx (Debian package) with deploy/nginx/nginx.conf on loopback",
        }
        for name in ("r1", "r2"):
            replicas.append(
                ServeProcess(
                    home,
                    work / f"{name}.log",
                    args=["--model", model, "--index", index],
                    env={**env, "VPR_REPLICA_NAME": name},
                    cwd=REPO,
                )
            )
        for r in replicas:
            r.start(ready=False)
        for r in replicas:
            r.wait_ready(300)
        report["loadavg"]["after_setup"] = loadavg()

        # Both proxies run all along (an idle nginx costs nothing); the three settings
        # alternate within each round, so that drift of a shared machine's load hits
        # them alike, and each figure is the median over the rounds.
        proxies = [
            NginxProxy([f"{r.host}:{r.port}" for r in group], work / f"nginx-{tag}").start(timeout=60)
            for tag, group in (("one", replicas[:1]), ("two", replicas))
        ]
        settings = {
            "direct_1_replica": (replicas[0].url, replicas[:1]),
            "proxy_1_replica": (proxies[0].url, replicas[:1]),
            "proxy_2_replicas": (proxies[1].url, replicas),
        }
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {(n, k): [] for n in clients for k in settings}
        try:
            for round_no in range(args.rounds):
                order = list(settings) if round_no % 2 == 0 else list(reversed(settings))
                for n in clients:
                    for key in order:
                        print(f"round {round_no + 1}/{args.rounds}, {key}", flush=True)
                        url, group = settings[key]
                        runs[(n, key)].append(measure_at(url, group, payloads, n, args))
        finally:
            for proxy in proxies:
                proxy.stop()
        report["rows"] = []
        for n in clients:
            row: dict[str, Any] = {"clients": n}
            for key in settings:
                per_round = runs[(n, key)]
                row[key] = {
                    "throughput_per_s_median": round(median([r["throughput_per_s"] for r in per_round]), 3),
                    "p50_ms_median": round(median([r["latency_ms"]["p50"] or 0.0 for r in per_round]), 1),
                    "rounds": per_round,
                }
            one_tp = row["proxy_1_replica"]["throughput_per_s_median"]
            two_tp = row["proxy_2_replicas"]["throughput_per_s_median"]
            direct_tp = row["direct_1_replica"]["throughput_per_s_median"]
            row["ratio_2_to_1"] = round(two_tp / one_tp, 3) if one_tp else None
            row["proxy_cost_ratio"] = round(one_tp / direct_tp, 3) if direct_tp else None
            report["rows"].append(row)
        report["loadavg"]["end"] = loadavg()
    finally:
        for r in replicas:
            r.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for row in report["rows"]:
        print(
            f"N={row['clients']}: 2 replicas / 1 replica through nginx = {row['ratio_2_to_1']} "
            f"(1 replica through nginx / direct = {row['proxy_cost_ratio']})"
        )
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
    p.add_argument("--shared", default=str(SHARED), help="the shared folder (weights, datasets)")
    p.add_argument("--max-side", type=int, default=320, help="input size cap of the built model (default 320)")
    p.add_argument("--clusters", type=int, default=16, help="NetVLAD clusters of the built model (default 16)")
    p.add_argument("--db-images", type=int, default=60, help="day_left images in the built index (default 60)")
    p.add_argument("--query-images", type=int, default=100, help="day_right JPEGs the clients cycle through")
    p.add_argument("--clients", default="4,16", help="concurrent clients, comma-separated (default 4,16)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per setting (default 15)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three settings, alternating (default 3)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each setting (default 3)")
    p.add_argument("--batch", type=int, default=8, help="each replica's max_batch_size (default 8)")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS of each replica (default: torch's own choice)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary home and the logs")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
