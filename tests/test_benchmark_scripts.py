"""The CPU-side pieces of the benchmark scripts: benchmarks/gpu.py's options and table (it measures only on CUDA),
roofline.py's sum over matmul shapes, and the model shape presets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import roofline
import shapes
import torch

import lorafit.flops

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_gpu_benchmark():
    """benchmarks/gpu.py by path (the name `gpu` is also the tests/gpu folder)."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_options_and_table():
    gpu = load_gpu_benchmark()
    args = gpu.parse_args([])
    assert (args.models, args.methods, args.warmup, args.steps) == (list(gpu.MODELS), list(gpu.METHODS), 2, 5)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--steps", "0"])
    runs = [{"model": "llama-1b", "method": "qlora", "library": "peft", "tokens_per_s": 1000.0, "peak_cuda_bytes": 4e9},
            {"model": "llama-1b", "method": "qlora", "library": "lorafit", "tokens_per_s": 1500.0,
             "peak_cuda_bytes": 3e9},
            {"model": "llama-1b", "method": "dora", "library": "peft", "tokens_per_s": 800.0, "peak_cuda_bytes": 5e9}]
    lines = gpu.results_table(runs).splitlines()
    assert lines[2] == "| llama-1b | qlora | 1000 | 4.00 | 1500 | 3.00 | 1.50 | 0.75 |"
    assert lines[3] == "| llama-1b | dora | 800 | 5.00 | - | - | - | - |"  # a run missing: no ratio


def test_roofline_sums_each_shape_times_its_count(monkeypatch):
    model = shapes.build_model(shapes.model_config("small"))  # on the meta device: shapes only
    seconds = {}

    def fake_seconds(matmul, dtype, device, repeats):
        seconds[(matmul.what, matmul.m, matmul.k, matmul.n, matmul.batch)] = 1e-12 * matmul.flops / matmul.count
        return seconds[(matmul.what, matmul.m, matmul.k, matmul.n, matmul.batch)]

    monkeypatch.setattr(roofline, "matmul_seconds", fake_seconds)
    result = roofline.roofline(model, 2, 16, 8, torch.float32, torch.device("cpu"))
    flops = sum(m.flops for m in lorafit.flops.step_matmuls(model, 2, 16, rank=8))
    assert result["step_flops"] == flops and len(result["rows"]) == len(seconds)
    assert result["step_s"] == pytest.approx(1e-12 * flops)  # each shape's time x its count, summed
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / result["step_s"])
    assert "fp32" in roofline.summary_table({"fp32": result})


def test_smollm2_preset_matches_the_cached_checkpoint_config():
    from lorafit.models.zoo import model_cache_dir

    cached = next(model_cache_dir("smollm2-135m").glob("*/config.json"), None)
    if cached is None:
        pytest.skip("SmolLM2-135M is not in lorafit's cache (first `lorafit.load_model('smollm2-135m')` fetches it)")
    real, preset = shapes.model_config(str(cached)), shapes.model_config("smollm2-135m")
    for key in shapes.PRESETS["smollm2-135m"]:
        assert getattr(preset, key) == getattr(real, key), key


def test_run_worker_kills_a_worker_above_its_rss_limit_and_names_the_phase(tmp_path):
    """benchmarks/common.run_worker's watchdog (scale.py's guard on a shared machine): a worker that grows to 400 MB
    under a 200 MB limit is killed, and the error names the last phase it announced; under the limit it finishes."""
    import common

    script = tmp_path / "grow.py"  # plain Python (importing common would load torch: 300 MB before any phase)
    script.write_text(
        "import json, sys, time\n"
        f"print({common.PHASE_PREFIX!r} + 'allocate', flush=True)\n"
        "block = bytearray(int(sys.argv[2]))  # zero-filled: resident at once\n"
        "time.sleep(2)\n"
        "print(json.dumps({'held': len(block)}))\n")
    killed = common.run_worker(script, [str(400 * 2**20)], rss_limit=200 * 10**6)
    assert killed["error"] == "failed at allocate: RSS > 0.2 GB" and killed["killed_rss"] > 200 * 10**6
    assert common.run_worker(script, [str(2**20)], rss_limit=200 * 10**6) == {"held": 2**20}
