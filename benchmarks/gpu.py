"""lorafit against PEFT (+ bitsandbytes for QLoRA) on one CUDA GPU: LoRA, DoRA and QLoRA training steps with bf16
autocast, on SmolLM2-135M-Instruct (lorafit's cached weights) and a randomly initialised Llama-3.2-1B-shaped model
(benchmarks/shapes.py). One command, under 8 minutes on one GPU; each (model, method, library) runs in its own
process so that the peak CUDA memory is that run's alone.

Settings: batch 4 x 512 random tokens, loss on all of them, r=16 alpha=32 on all block linears, dropout 0, AdamW,
fp32 base weights (4-bit for QLoRA, computing in bf16) under bf16 autocast. lorafit runs what `lorafit train` runs
(its layers and its loss); PEFT runs transformers' loss.

Run: python benchmarks/gpu.py [--models smollm2-135m llama-1b] [--methods lora dora qlora] [--warmup 2 --steps 5]
       [--out PATH]
Writes benchmarks/results/gpu.json. Without CUDA it exits at once with a one-line message.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from adapter_overhead import ALPHA, RANK, train_step
from common import (
    GB,
    RESULTS_DIR,
    cuda_memory_bytes,
    emit_worker_result,
    machine_info,
    markdown_table,
    median,
    reset_cuda_peak,
    run_worker,
    save_results,
    time_steps,
)
from shapes import build_model, model_config
from torch import nn

MODELS = ("smollm2-135m", "llama-1b")
METHODS = ("lora", "dora", "qlora")
LIBRARIES = ("peft", "lorafit")
BATCH_SIZE, SEQ_LEN = 4, 512
DEFAULT_OUT = RESULTS_DIR / "gpu.json"


def load_base(model_name: str, quantize: bool, library: str, device: torch.device) -> nn.Module:
    """The base model in fp32 on `device`: SmolLM2's real weights, or the random 1B shape; for QLoRA its block
    linears in NF4 computing in bf16, by lorafit's Linear4bit or by bitsandbytes' (PEFT's usual base)."""
    import lorafit
    from lorafit.models.load import quantize_block_linears

    if model_name == "smollm2-135m":
        model, _ = lorafit.load_model(model_name, device=device)
    else:
        torch.manual_seed(0)
        model = build_model(model_config(model_name), device=device)
    if quantize and library == "lorafit":
        quantize_block_linears(model, compute_dtype=torch.bfloat16, device=device)
    elif quantize:
        bitsandbytes_block_linears(model, device)
    return model


def bitsandbytes_block_linears(model: nn.Module, device: torch.device) -> None:
    """Replace every block linear by bitsandbytes' NF4 Linear4bit (double-quantised, bf16 compute), as
    transformers' BitsAndBytesConfig(load_in_4bit=True) would."""
    import bitsandbytes as bnb

    from lorafit.adapters.targets import linear_layers

    for name, linear in linear_layers(model).items():
        parent, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent), child, quantized.to(device))


def attach(model: nn.Module, method: str, library: str) -> nn.Module:
    """r=16 alpha=32 LoRA (DoRA for `dora`) on all block linears, by lorafit or PEFT; train mode."""
    dora = method == "dora"
    if library == "lorafit":
        import lorafit

        return lorafit.attach(model, lorafit.AdapterConfig(r=RANK, alpha=ALPHA, dropout=0.0,
                                                           target_modules="all-linear", use_dora=dora)).train()
    from peft import LoraConfig, get_peft_model  # reference dependency (test extra)

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules="all-linear", use_dora=dora)).train()


def measure(model_name: str, method: str, library: str, warmup: int, steps: int) -> dict[str, Any]:
    """The worker: build, attach, train warmup + steps under bf16 autocast; tokens/s and peak CUDA memory."""
    device = torch.device("cuda")
    start = time.perf_counter()
    model = attach(load_base(model_name, method == "qlora", library, device), method, library)
    load_s = time.perf_counter() - start
    baseline = cuda_memory_bytes(device)["allocated"]
    reset_cuda_peak(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH_SIZE, SEQ_LEN), generator=generator).to(device)
    times, losses = time_steps(lambda: train_step(model, optimizer, input_ids, torch.bfloat16, library == "lorafit"),
                               device, warmup, steps)
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"{model_name} {method} {library}: non-finite loss {losses}")
    step_s = median(times)
    return {"model": model_name, "method": method, "library": library, "load_s": load_s, "step_times_s": times,
            "median_step_s": step_s, "tokens_per_s": BATCH_SIZE * SEQ_LEN / step_s, "losses": losses,
            "baseline_cuda_bytes": baseline, "peak_cuda_bytes": cuda_memory_bytes(device)["peak"]}


def results_table(runs: list[dict[str, Any]]) -> str:
    """One row per (model, method): each library's tokens/s and peak CUDA GB, and lorafit over PEFT."""
    by_key = {(r["model"], r["method"], r["library"]): r for r in runs}
    rows = []
    for model_name, method in dict.fromkeys((r["model"], r["method"]) for r in runs):
        peft, ours = by_key.get((model_name, method, "peft")), by_key.get((model_name, method, "lorafit"))
        cells = [model_name, method]
        for run in (peft, ours):
            cells += [f"{run['tokens_per_s']:.0f}", f"{run['peak_cuda_bytes'] / GB:.2f}"] if run else ["-", "-"]
        both = peft is not None and ours is not None
        cells += [f"{ours['tokens_per_s'] / peft['tokens_per_s']:.2f}" if both else "-",
                  f"{ours['peak_cuda_bytes'] / peft['peak_cuda_bytes']:.2f}" if both else "-"]
        rows.append(cells)
    return markdown_table(["model", "method", "PEFT tokens/s", "PEFT peak GB", "lorafit tokens/s", "lorafit peak GB",
                           "speed (x)", "memory (x)"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --worker (internal) runs one measurement and prints it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    parser.add_argument("--out", type=Path, help=f"JSON output path (default {DEFAULT_OUT})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("need --warmup >= 0 and --steps >= 1")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here.")
    if args.worker:
        emit_worker_result(measure(args.models[0], args.methods[0], args.library, args.warmup, args.steps))
        return
    start, runs = time.perf_counter(), []
    for model_name in args.models:
        for i, method in enumerate(args.methods):
            for library in LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]:  # alternate who goes first
                print(f"{model_name} {method} {library} ...", file=sys.stderr, flush=True)
                runs.append(run_worker(__file__, ["--library", library, "--models", model_name, "--methods", method,
                                                  "--warmup", str(args.warmup), "--steps", str(args.steps)]))
    print(results_table(runs))
    save_results({"benchmark": "gpu", "machine": machine_info(torch.device("cuda"), ("torch", "transformers", "peft",
                                                                                     "bitsandbytes", "lorafit")),
                  "wall_s": time.perf_counter() - start,
                  "settings": {"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "r": RANK, "alpha": ALPHA,
                               "warmup": args.warmup, "steps": args.steps, "autocast": "bf16"},
                  "runs": runs}, args.out or DEFAULT_OUT)


if __name__ == "__main__":
    main()
