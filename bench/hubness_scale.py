#!/usr/bin/env python
"""Hubness of a large database: the exact computation against the approximate one, side by side.

Synthetic descriptors with the structure that makes hubness mean something:
places are noisy views (cosine ~0.45 within a scene) of scenes seen 1 to 11
times each, scattered over the map. The same array goes through
`index.hubness.hubness` twice in one run: exactly (the default budget), then
with the exact budget lowered below this database's work so that the
approximate path (FAISS IVF-SQ8 over the database itself) runs with an
approximate budget of `--approx-share` of the exact work. Reported: seconds,
the method, and how closely the approximate values follow the exact ones.

    .venv/bin/python bench/hubness_scale.py --out bench/results/hubness_scale.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from vpr.index import hubness as hub_mod  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402


def synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_scenes = max(1, n // 7)
    scenes = rng.standard_normal((n_scenes, dim), dtype=np.float32)
    scenes /= np.linalg.norm(scenes, axis=1, keepdims=True)
    seen = rng.integers(1, 12, n_scenes)
    x = scenes[rng.choice(n_scenes, n, p=seen / seen.sum())]
    x += (1.1 / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--places", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--approx-share", default="0.1,0.25,0.5", help="approximate budgets / exact work, comma-separated")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hubness_scale.json")
    args = p.parse_args(argv)
    x = synthetic(args.places, args.dim)
    work = float(args.places) ** 2 * args.dim
    t = time.perf_counter()
    exact = hub_mod.hubness(x)
    exact_s = time.perf_counter() - t
    assert exact is not None
    rows = []
    for share in (float(v) for v in args.approx_share.split(",")):
        hub_mod.HUB_MAX_WORK = work / 2
        hub_mod.HUB_MAX_APPROX_WORK = work * share
        hub_mod.HUB_MIN_SHARE = 0.0  # measure below the default's floor too
        method = hub_mod.method_for(args.places, args.dim)
        t = time.perf_counter()
        approx = hub_mod.hubness(x)
        approx_s = time.perf_counter() - t
        assert approx is not None
        top = max(1, args.places // 100)
        rows.append(
            {
                "places": args.places,
                "dim": args.dim,
                "exact_work": work,
                "exact_s": round(exact_s, 1),
                "share": share,
                "approx_method": method,
                "approx_s": round(approx_s, 1),
                "speedup": round(exact_s / approx_s, 2),
                "pearson": round(float(np.corrcoef(exact, approx)[0, 1]), 4),
                "mean_abs_error": round(float(np.abs(exact - approx).mean()), 5),
                "exact_std": round(float(exact.std()), 5),
                "top1pct_overlap": round(len(set(np.argsort(-exact)[:top]) & set(np.argsort(-approx)[:top])) / top, 3),
            }
        )
        print(rows[-1], flush=True)
    atomic_write_json(
        args.out,
        {
            "what": __doc__.splitlines()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}",
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
