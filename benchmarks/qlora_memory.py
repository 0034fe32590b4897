"""QLoRA on SmolLM2-135M-Instruct: bytes per 4-bit weight, a LoRA training step on fp32 / bf16 / NF4 bases, and
the time to quantise the whole model, lorafit against transformers + PEFT + bitsandbytes in the same run.

Every (variant) runs in its own process. The load peak and the training peak are measured separately: the
peak-RSS window is reset after loading (Linux clear_refs), because a streamed 4-bit load touches the pages of
the memory-mapped checkpoint, which count as resident while they are read but are released afterwards.
Training step: batch 4 x 256 random tokens, AdamW lr 1e-4, LoRA r=16 alpha=32 on all linear layers (as
adapter_overhead.py); lorafit variants use lorafit's loss, PEFT variants transformers' loss.
The bf16-base variants run only where bf16 is fast (CUDA) unless named with --variants: on a CPU without
native bf16 a step takes minutes.

Run: python benchmarks/qlora_memory.py [--variants ...] [--warmup 1 --steps 4] [--quick]
Writes benchmarks/results/qlora_memory.json (not with --quick unless --out is given).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from adapter_overhead import (
    ALPHA,
    BATCH_SIZE,
    LR,
    MODEL,
    RANK,
    SEQ_LEN,
    random_batch,
    train_step,
)
from common import (
    GB,
    RESULTS_DIR,
    cuda_memory_bytes,
    emit_worker_result,
    load_average,
    machine_info,
    markdown_table,
    median,
    reset_cuda_peak,
    run_worker,
    save_results,
    time_steps,
    use_all_cpus,
)
from torch import nn

import lorafit
from lorafit.device import bf16_worthwhile, default_compute_dtype, default_device, peak_rss_bytes, reset_peak_rss
from lorafit.models.load import block_linear_names
from lorafit.models.zoo import model_cache_dir
from lorafit.quant import Linear4bit, quantize_nf4, state_bits

DEFAULT_OUT = RESULTS_DIR / "qlora_memory.json"
# variant -> (library, base precision)
VARIANTS = {
    "lorafit-fp32": ("lorafit", "fp32"),
    "lorafit-nf4": ("lorafit", "nf4"),
    "lorafit-bf16": ("lorafit", "bf16"),
    "peft-fp32": ("peft", "fp32"),
    "peft-bnb-nf4": ("peft", "nf4"),
    "peft-bf16": ("peft", "bf16"),
}


def default_variants(device: torch.device) -> list[str]:
    """All variants where bf16 is fast; elsewhere the fp32 and NF4 ones."""
    return [name for name, (_, base) in VARIANTS.items() if base != "bf16" or bf16_worthwhile(device)]


def load_lorafit(base: str, device: torch.device) -> nn.Module:
    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    model, _ = lorafit.load_model(MODEL, dtype=dtype, device=device, quantize="nf4" if base == "nf4" else None,
                                  compute_dtype=default_compute_dtype(device))
    return lorafit.attach(model, lorafit.AdapterConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"))


def load_peft(base: str, device: torch.device) -> nn.Module:
    from peft import (  # reference dependencies (test extra), only needed here
        LoraConfig,
        get_peft_model,
    )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = model_cache_dir(MODEL) / "float"
    lorafit.load_model(MODEL)  # makes sure the cached float checkpoint exists
    if base == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=default_compute_dtype(device))
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": str(device)})
    else:
        dtype = torch.bfloat16 if base == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))


def quantized_bytes_per_weight(model: nn.Module) -> float | None:
    """All NF4 state (codes, absmax, nested scales, maps, JSON) per quantised weight, in bytes; None if none."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    return sum(state_bits(m.quant_state) for m in layers) / 8 / sum(m.in_features * m.out_features for m in layers)


def measure_training(variant: str, warmup: int, steps: int) -> dict[str, Any]:
    """The worker for one variant: load (timed, peak RSS), then train warmup + steps with a fresh peak window."""
    threads = use_all_cpus()
    torch.manual_seed(0)
    device = default_device()
    library, base = VARIANTS[variant]
    start = time.perf_counter()
    model = (load_lorafit if library == "lorafit" else load_peft)(base, device).train()
    load_s = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    windowed = reset_peak_rss()
    reset_cuda_peak(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    input_ids = random_batch(model.config.vocab_size, device)
    step = partial(train_step, model, optimizer, input_ids, None, library == "lorafit")
    times, losses = time_steps(step, device, warmup, steps)
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"{variant}: non-finite loss {losses}")
    cuda = cuda_memory_bytes(device)
    return {
        "variant": variant, "library": library, "base": base, "device": str(device), "threads": threads,
        "load_s": load_s, "load_peak_rss_bytes": load_peak, "train_peak_rss_bytes": peak_rss_bytes(),
        "peak_window_reset": windowed, "cuda_peak_bytes": cuda["peak"] if cuda else None,
        "trainable_params": sum(p.numel() for p in trainable), "step_times_s": times,
        "tokens_per_s": BATCH_SIZE * SEQ_LEN / median(times), "losses": losses,
        "nf4_bytes_per_weight": quantized_bytes_per_weight(model) if library == "lorafit" else None,
    }


def measure_quantize_time(rounds: int) -> dict[str, Any]:
    """Quantise every block linear of the model (NF4, double quantisation) with lorafit and with bitsandbytes,
    alternating layer by layer; the best of `rounds` totals per library."""
    import bitsandbytes.functional as bnb_functional  # reference dependency

    use_all_cpus()
    model, _ = lorafit.load_model(MODEL, device="cpu")
    weights = [model.get_submodule(name).weight.detach() for name in block_linear_names(model)]
    libraries = {
        "lorafit": lambda w: quantize_nf4(w, double_quant=True),
        "bitsandbytes": lambda w: bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                               compress_statistics=True),
    }
    best = dict.fromkeys(libraries, math.inf)
    for _ in range(rounds):
        totals = dict.fromkeys(libraries, 0.0)
        for i, weight in enumerate(weights):
            for name in (list(libraries) if i % 2 == 0 else list(libraries)[::-1]):
                start = time.perf_counter()
                libraries[name](weight)
                totals[name] += time.perf_counter() - start
        best = {name: min(best[name], totals[name]) for name in libraries}
    return {"layers": len(weights), "weights": sum(w.numel() for w in weights), "rounds": rounds, "best_s": best}


def run_all(variants: list[str], warmup: int, steps: int, rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    runs = []
    for i, variant in enumerate(variants):
        print(f"[{i + 1}/{len(variants)}] {variant} ...", file=sys.stderr, flush=True)
        try:
            run = run_worker(__file__, ["--variant", variant, "--warmup", str(warmup), "--steps", str(steps)])
            print(f"    {run['tokens_per_s']:.0f} tokens/s, train peak {run['train_peak_rss_bytes'] / GB:.2f} GB",
                  file=sys.stderr, flush=True)
        except RuntimeError as err:  # e.g. bitsandbytes' 4-bit path unavailable on this machine
            run = {"variant": variant, "error": str(err)}
        runs.append(run)
    print("quantise time ...", file=sys.stderr, flush=True)
    quantize = run_worker(__file__, ["--quantize-time", "--rounds", str(rounds)])
    return runs, quantize


def runs_table(runs: list[dict[str, Any]]) -> str:
    anchor = next((r for r in runs if r.get("variant") == "peft-fp32" and "error" not in r), None)
    headers = ["variant", "tokens/s", "train peak RSS GB", "load peak RSS GB", "load s", "B per 4-bit weight",
               "speed vs peft-fp32", "train peak vs peft-fp32"]
    rows = []
    for run in runs:
        if "error" in run:
            rows.append([run["variant"], "failed: see JSON", "", "", "", "", "", ""])
            continue
        per_weight = run["nf4_bytes_per_weight"]
        rows.append([run["variant"], f"{run['tokens_per_s']:.0f}", f"{run['train_peak_rss_bytes'] / GB:.3f}",
                     f"{run['load_peak_rss_bytes'] / GB:.3f}", f"{run['load_s']:.1f}",
                     f"{per_weight:.4f}" if per_weight else "",
                     f"{run['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor else "",
                     f"{run['train_peak_rss_bytes'] / anchor['train_peak_rss_bytes']:.2f}x" if anchor else ""])
    return markdown_table(headers, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all but bf16 ones where bf16 is slow")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="quantise-time rounds (best kept)")
    parser.add_argument("--quick", action="store_true", help="smoke test: lorafit-nf4 only, 1 step, 1 round, no JSON")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--quantize-time", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.variants, args.warmup, args.steps, args.rounds = args.variants or ["lorafit-nf4"], 0, 1, 1
    args.variants = args.variants or default_variants(default_device())
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        result = measure_quantize_time(args.rounds) if args.quantize_time else measure_training(args.variant, args.warmup, args.steps)
        emit_worker_result(result)
        return
    start = time.perf_counter()
    runs, quantize = run_all(args.variants, args.warmup, args.steps, args.rounds)
    q = quantize["best_s"]
    print(runs_table(runs))
    print(f"\nquantising {quantize['layers']} linears ({quantize['weights'] / 1e6:.1f}M weights, NF4 + double quant): "
          f"lorafit {q['lorafit']:.2f} s, bitsandbytes {q['bitsandbytes']:.2f} s (best of {quantize['rounds']})")
    results = {
        "benchmark": "qlora_memory", "model": MODEL, "machine": machine_info(default_device(), ("torch", "transformers", "peft", "bitsandbytes", "lorafit")),
        "load_average_after": load_average(), "wall_s": time.perf_counter() - start,
        "settings": {"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "lr": LR, "r": RANK, "alpha": ALPHA,
                     "warmup": args.warmup, "steps": args.steps, "variants": args.variants,
                     "compute_dtype": str(default_compute_dtype(default_device()))},
        "runs": runs, "quantize_time": quantize,
    }
    save_results(results, args.out or (None if args.quick else DEFAULT_OUT))


if __name__ == "__main__":
    main()
