"""The benchmark scripts run (they are not timed here): bench/gpu.py in its
CPU dry-run mode end to end, its FLOP counts and peak table, the load
generator's loopback-only guard, and bench/server_bench.py's options."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"


@pytest.fixture
def load(monkeypatch):
    """Import a bench script by path; the environment it sets on import
    (OMP_WAIT_POLICY) is restored afterwards, so later subprocesses of the
    suite do not inherit it."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return _load


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"].startswith("cpu")
    assert report["gflop_per_image"] == pytest.approx(report["gflop_per_image_analytic"], rel=1e-3)
    rows = report["model_alone"]
    assert {r["mode"] for r in rows} == {"fp32", "tf32", "bf16", "bf16-cl"}  # compile is left out on CPU
    for row in rows:
        assert row["images_per_s"] > 0 and row["tflops"] > 0, row
        assert row["tflops"] == pytest.approx(report["gflop_per_image"] * row["images_per_s"] / 1000, rel=0.02)
    server = report["server"]["settings"][0]["rows"]
    assert [s["clients"] for s in server] == [1, 2]
    for s in server:
        assert s["ok"] > 0 and s["errors"] == 0 and set(s["statuses"]) == {"200"}, s
        assert s["latency_ms"]["p50"] > 0 and s["ratio_to_model_alone_bf16"] is not None
    assert "TFLOP/s" in r.stdout and "req/s" in r.stdout


def test_flops_of_vgg16_netvlad_at_480x640(load):
    """188 GFLOP per 480x640 image: the 13 convolutions of VGG16 up to conv5_3
    (analytic: 2 x Cin x Cout x 9 x H x W per layer) and NetVLAD."""
    gpu = load("gpu")
    config = gpu.MODEL_CONFIG
    counted, analytic = gpu.counted_flops(config, 480, 640), gpu.analytic_flops(config, 480, 640)
    convs = [
        (3, 64, 480 * 640),
        (64, 64, 480 * 640),
        (64, 128, 240 * 320),
        (128, 128, 240 * 320),
        (128, 256, 120 * 160),
        (256, 256, 120 * 160),
        (256, 256, 120 * 160),
        (256, 512, 60 * 80),
        (512, 512, 60 * 80),
        (512, 512, 60 * 80),
        (512, 512, 30 * 40),
        (512, 512, 30 * 40),
        (512, 512, 30 * 40),
    ]
    by_hand = sum(2 * cin * cout * 9 * hw for cin, cout, hw in convs)
    assert by_hand == pytest.approx(187.9e9, rel=1e-3)
    assert analytic == pytest.approx(counted, rel=1e-3)
    assert by_hand < counted < by_hand * 1.002  # NetVLAD adds about 0.1 %
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert gpu.peak_for("NVIDIA H100 PCIe", "tf32") == 378.0
    assert gpu.peak_for("NVIDIA L40S", "bf16") == 362.1 and gpu.peak_for("NVIDIA L4", "bf16") == 121.0
    assert gpu.peak_for("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu.peak_for("Some Future GPU", "bf16") is None and gpu.peak_for("x", "bf16", 100.0) == 100.0


def test_load_generator_is_loopback_only(load):
    httpload = load("httpload")
    with pytest.raises(ValueError, match="loopback"):
        httpload.run_clients("http://10.0.0.1:8000", [(b"x", "image/jpeg")], 1, 0.1)
    assert httpload.percentiles([]) == {"p50": None, "p95": None, "p99": None, "mean": None}
    assert httpload.percentiles([1.0, 2.0, 3.0])["p50"] == 2.0


def test_server_bench_options(load):
    bench = load("server_bench")
    args = bench.parse_args(["--max-side", "320", "--duration", "10", "--clients", "1,4", "--json", "x.json"])
    assert (args.max_side, args.duration, args.clients, args.json) == (320, 10.0, "1,4", "x.json")
    assert args.home is None and args.batch == 8 and args.sizes == "240x320,480x640"
    args = bench.parse_args(["--home", "h", "--model", "m@1", "--index", "i"])
    assert (args.home, args.model, args.index) == ("h", "m@1", "i")
    with pytest.raises(SystemExit):
        bench.parse_args(["--duration", "ten"])
