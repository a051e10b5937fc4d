"""Closed-loop HTTP load for the benchmark scripts (not a test).

`run_clients(url, payloads, clients, duration)` starts `clients` threads,
each sending one query at a time (the next as soon as the last is answered)
for a warm-up and then `duration` seconds; only requests that complete
inside the measured window count. After the window the clients stop and the
requests still in flight are awaited, so the next setting starts on an idle
server. Loopback only: the URL must point at this machine.

Also a command, so that the clients can run in their own light process
(no torch), apart from a server that runs in the caller's process:
    python bench/httpload.py URL --images DIR --clients 16 --duration 10   (prints JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "mean": round(float(a.mean()), 2),
    }


def run_clients(
    url: str,
    payloads: list[tuple[bytes, str]],
    clients: int,
    duration: float,
    warmup: float = 2.0,
    path: str = "/v1/query",
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Throughput and latency of `clients` concurrent closed-loop clients."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: load is only sent to this machine (loopback)")
    if not payloads:
        raise ValueError("no payloads to send")
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    stop = threading.Event()
    lock = threading.Lock()
    done: list[tuple[float, float, int, int | None]] = []  # (t_end, latency_ms, status, batch_size)
    errors: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            i = n
            while not stop.is_set():
                data, ctype = payloads[i % len(payloads)]
                i += 1
                t0 = time.monotonic()
                try:
                    r = http.post(path, content=data, headers={"content-type": ctype})
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                t1 = time.monotonic()
                batch = None
                if r.status_code == 200:
                    batch = r.json().get("batch_size")
                elif r.status_code == 503:
                    time.sleep(0.05)
                with lock:
                    done.append((t1, (t1 - t0) * 1000, r.status_code, batch))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window[1] - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout + 10)
    inside = [d for d in done if window[0] <= d[0] <= window[1]]
    ok = [d for d in inside if d[2] == 200]
    statuses: dict[str, int] = {}
    for d in inside:
        statuses[str(d[2])] = statuses.get(str(d[2]), 0) + 1
    batches = [d[3] for d in ok if d[3]]
    late = sum(1 for d in done if d[0] > window[1])
    # With many clients on a slow server a request can take longer than the
    # window: those finishing after it (`completed_after_window`) are not in
    # the percentiles, which then understate the latency of that setting.
    return {
        "clients": clients,
        "duration_s": duration,
        "completed": len(inside),
        "ok": len(ok),
        "completed_after_window": late,
        "statuses": statuses,
        "errors": len(errors),
        "error_examples": errors[:3],
        "throughput_per_s": round(len(ok) / duration, 3),
        "latency_ms": percentiles([d[1] for d in ok]),
        "mean_batch_size": round(float(np.mean(batches)), 2) if batches else None,
    }


def run_clients_in_process(url: str, images: Path, clients: int, duration: float, warmup: float = 2.0) -> dict:
    """`run_clients` in a separate Python process (this file as a command)."""
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            url,
            "--images",
            str(images),
            "--clients",
            str(clients),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ],
        capture_output=True,
        text=True,
        timeout=warmup + duration + 600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"the load generator failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="closed-loop HTTP query load against a local server")
    p.add_argument("url")
    p.add_argument("--images", required=True, help="folder of .jpg/.png/.webp query images")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    types = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
    payloads = [
        (f.read_bytes(), types[f.suffix.lower()])
        for f in sorted(Path(args.images).iterdir())
        if f.suffix.lower() in types
    ]
    print(json.dumps(run_clients(args.url, payloads, args.clients, args.duration, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
