"""The CPU-side pieces of the benchmark scripts: benchmarks/gpu.py's options and table (it measures only on CUDA),
roofline.py's sum over matmul shapes, and the model shape presets."""

from __future__ import annotations

import importlib.util
import math
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


@pytest.mark.parametrize("layout", ["all", "last-quarter"])
def test_step_memory_gives_every_variant_the_same_targets(layout):
    """benchmarks/step_memory.py: lorafit's loss on `targets` and transformers' loss on the labels it derives from
    them are the same number, so the variants' peaks and times are for the same work."""
    import step_memory
    from tiny_models import build_tiny

    import lorafit

    ids, targets = step_memory.batch_for(96, step_memory.LAYOUTS[layout])
    assert torch.equal(targets[:, -1], torch.full((step_memory.BATCH,), -100))
    start = step_memory.LAYOUTS[layout]
    assert torch.equal(targets[:, start:-1], ids[:, start + 1:]) and (targets[:, :start] == -100).all()
    model = lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(r=4, alpha=8))
    losses = []
    for variant in ("lorafit", "lorafit-stock-head"):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # weights stay
        losses.append(step_memory.step(variant, model, optimizer, ids, targets))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # fp32, two tiny blocks: rounding ~1e-6


def test_generalisation_variants_are_valid_runs_and_tabulate():
    """Every lever of benchmarks/generalisation.py is a run file plus overrides that lorafit accepts, with the
    override the variant names in effect; the table shows each set's accuracy, its standard error and counts."""
    import generalisation

    from lorafit.run_config import load_run_config

    for name, variant in generalisation.VARIANTS.items():
        config = load_run_config(generalisation.EXAMPLES / variant.config, list(variant.overrides))
        assert config.method == "sft", name
    dora = load_run_config(generalisation.EXAMPLES / "quickstart.yaml",
                           list(generalisation.VARIANTS["copy_broad_dora"].overrides))
    assert dora.adapter.use_dora is True
    attention = generalisation.VARIANTS["copy_broad_attention"]
    targets = load_run_config(generalisation.EXAMPLES / attention.config, list(attention.overrides)).adapter.target_modules
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    results = {"variants": {"baseline": {
        "note": "n", "train_wall_s": 100.4, "train_cpu_s": 190.6,
        "sets": {"in_distribution": {"accuracy": 1.0, "stderr": 0.0, "correct": 30, "total": 30},
                 "out_of_distribution": {"accuracy": 34 / 60, "stderr": 0.064, "correct": 34, "total": 60}}}}}
    row = generalisation.table(results).splitlines()[2]
    assert row == "| baseline | 100.0 ± 0.0 (30/30) | 56.7 ± 6.4 (34/60) | - | - | 100 | 191 | n |"


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


@pytest.mark.parametrize("method, checkpointing, dropout", [("lora", False, 0.05), ("dora", True, 0.0)])
def test_perf_table_worker_measures_a_tiny_model_and_tabulates(method, checkpointing, dropout, monkeypatch):
    """benchmarks/perf_table.py's worker on a tiny Llama (build_model patched): finite timings and losses, an
    allocator peak above zero, RSS readings, and the closing table's lorafit/PEFT ratios from the two runs."""
    import adapter_overhead
    import perf_table
    from tiny_models import build_tiny

    def tiny_build(library, config, device):
        model = build_tiny("llama")
        if library == "peft":
            from peft import LoraConfig, get_peft_model

            return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=config.dropout,
                                                    target_modules="all-linear", use_dora=config.method == "dora")).train()
        import lorafit

        adapter = lorafit.AdapterConfig(r=4, alpha=8, dropout=config.dropout, use_dora=config.method == "dora")
        return lorafit.attach(model, adapter, warn_scale=False).train()

    monkeypatch.setattr(perf_table, "build_model", tiny_build)
    monkeypatch.setattr(perf_table, "SEQ_LEN", 16)  # the tiny model's 64 positions
    monkeypatch.setattr(adapter_overhead, "SEQ_LEN", 16)
    runs = [perf_table.measure(library, method, checkpointing, dropout, warmup=1, steps=2)
            for library in perf_table.LIBRARIES]
    for run in runs:
        assert len(run["step_times_s"]) == 2 and all(t > 0 for t in run["step_times_s"])
        assert all(math.isfinite(loss) for loss in run["losses"]) and len(run["losses"]) == 3
        assert run["allocator_peak_bytes"] > 0 and run["peak_rss_bytes"] >= run["baseline_rss_bytes"] > 0
        run["share_of_bound"] = run["tokens_per_s"] / 1e6
    ratio = perf_table.ratios(runs)[(method, checkpointing, dropout)]
    assert ratio["speed"] == pytest.approx(runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"])
    assert ratio["allocator_peak"] == pytest.approx(runs[0]["allocator_peak_bytes"] / runs[1]["allocator_peak_bytes"])
    assert ratio["first_loss_diff"] < 1e-4  # B = 0: both start at the base model's loss on the same batch
    table = perf_table.closing_table(runs)
    assert len(table.splitlines()) == 4 and f"{ratio['speed']:.2f}" in table.splitlines()[2]


def test_readme_estimator_table_is_what_the_estimator_says():
    """README's per-rank Llama-3 table: every row equals benchmarks/distributed.py's estimates() (no stale figures)."""
    spec = importlib.util.spec_from_file_location("distributed_benchmark", BENCHMARKS / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (BENCHMARKS.parent / "README.md").read_text()
    table_rows = [line for line in readme.splitlines() if line.startswith("| Llama-3-")]
    assert len(table_rows) == 10
    estimates = {(r["model"], r["method"], r["gpus"], r["strategy"]): r for r in module.estimates()}
    for line in table_rows:
        model, method, gpus, strategy, weights, total = (cell.strip() for cell in line.strip("|").split("|"))
        row = estimates[(model, method, int(gpus), "ddp" if strategy == "-" else strategy)]
        assert (float(weights), float(total)) == (row["weights_gb_per_rank"], row["total_gb_per_rank"]), line
