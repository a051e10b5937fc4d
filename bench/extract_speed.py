"""Descriptor extraction speed of VGG16+NetVLAD (images/s) on this machine.

Usage: python bench/extract_speed.py [--sizes 480x640,240x320,180x240] [--batches 1,8]
                                      [--repeats 3] [--json OUT]
Times the model alone (in-process, inference mode, already-prepared tensors,
so decode and resize are excluded), after one warm-up batch per setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vpr.model.extract import cpu_name, default_device, embed_tensors
from vpr.model.fileio import atomic_write_json
from vpr.model.network import build_model


def measure(net, h: int, w: int, batch: int, repeats: int, device) -> float:
    x = torch.randn(batch, 3, h, w)
    embed_tensors(net, x, device)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        embed_tensors(net, x, device)
    return batch * repeats / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> dict:
    device = default_device()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    net = build_model({"backbone": {"name": "vgg16"}, "preprocess": {"max_side": 4096}}).to(device).eval()
    rows = []
    for size in args.sizes.split(","):
        h, w = map(int, size.split("x"))
        for b in map(int, args.batches.split(",")):
            ips = measure(net, h, w, b, args.repeats, device)
            rows.append({"size": f"{h}x{w}", "batch": b, "images_per_s": round(ips, 3)})
            print(f"vgg16+netvlad {h}x{w} batch {b}: {ips:.2f} img/s", flush=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_to_first"] = round(r["images_per_s"] / base, 3)
    report = {
        "device": str(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.json:
        atomic_write_json(Path(args.json), report)
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="480x640,240x320,180x240")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    main(p.parse_args())
