"""Allocator peak and time of one LoRA training step on SmolLM2-135M-Instruct: lorafit's head loss, the stock
transformers loss on lorafit's layers, and PEFT, measured in the same process and run.

Batch 4 x 256 random tokens, fp32, r=16 alpha=32 on all linear layers, dropout 0.05, AdamW. Two target layouts:
"all" (every position a target, as in benchmarks/adapter_overhead.py) and "last-quarter" (only the last 64
positions of each row are targets: an assistant-only loss after a long prompt). Variants:
- peft: PEFT's layers, transformers' loss (labels = targets, -100 elsewhere): full (tokens x vocab) logits;
- lorafit-stock-head: lorafit's layers, the same transformers loss;
- lorafit: what `lorafit train` runs (train/loss.py): the head only at target positions, one chunk at a time.

"peak" is the allocator's peak during the step (forward, backward, optimizer step) above what the process held
before it (weights, adapters and optimizer state already there): benchmarks/peak_memory.py, the CPU counterpart
of torch.cuda.max_memory_allocated, free of the C allocator's caching that makes RSS noisy. It is compared with
the estimator's activations + logits buckets (`lorafit estimate-memory`). Time: median of --steps steps per
variant and layout, one model in memory at a time (noisy on a shared machine: compare with care).
To measure another lorafit (e.g. before a change), point PYTHONPATH at its src/ and pass --out.

Run: nice python benchmarks/step_memory.py [--steps 3] [--out PATH]
Writes benchmarks/results/step_memory.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import GB, RESULTS_DIR, load_average, machine_info, markdown_table, median, save_results, use_all_cpus
from peak_memory import measure_peak_bytes
from torch import nn

import lorafit
from lorafit.diagnose.memory import estimate_memory
from lorafit.train import loss as loss_module

MODEL = "smollm2-135m"
BATCH, SEQ, RANK, ALPHA, DROPOUT, LR = 4, 256, 16, 32, 0.05, 1e-4
VARIANTS = ("peft", "lorafit-stock-head", "lorafit")
LAYOUTS = {"all": 0, "last-quarter": SEQ - SEQ // 4}  # first position that has a target
DEFAULT_OUT = RESULTS_DIR / "step_memory.json"


def build(variant: str) -> nn.Module:
    """SmolLM2 with LoRA attached by PEFT or lorafit, in train mode."""
    model, _ = lorafit.load_model(MODEL)
    if variant == "peft":
        from peft import LoraConfig, get_peft_model  # reference dependency (test extra), only needed here

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear")
        return get_peft_model(model, config).train()
    config = lorafit.AdapterConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear")
    return lorafit.attach(model, config).train()


def batch_for(vocab_size: int, first_target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), (BATCH, SEQ): targets[t] = input_ids[t + 1] from first_target on, -100 elsewhere."""
    ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    targets = torch.full_like(ids, -100)
    targets[:, first_target:-1] = ids[:, first_target + 1:]
    return ids, targets


def step(variant: str, model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
         targets: torch.Tensor) -> float:
    """Forward, backward of the mean loss over targets, AdamW step, zero_grad; returns the loss."""
    count = (targets != -100).sum()
    if variant == "lorafit":
        loss = loss_module.target_loss_sum(model, {"input_ids": ids, "targets": targets}) / count
    else:  # transformers' loss: labels are unshifted, labels[t + 1] is predicted at t
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = targets[:, :-1]
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def lorafit_source() -> dict[str, str]:
    """Which lorafit was measured: its src folder and that checkout's commit."""
    src = Path(lorafit.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"src": str(src), "commit": commit.stdout.strip()}


def measure(variants: list[str], steps: int) -> list[dict[str, Any]]:
    """Per variant, one model at a time (memory): a warm-up step (AdamW state now exists), then per layout the
    allocator peak of one profiled step and the times of `steps` more."""
    runs = []
    for variant in variants:
        print(f"{variant} ...", file=sys.stderr, flush=True)
        model = build(variant)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for i, (layout, first_target) in enumerate(LAYOUTS.items()):
            ids, targets = batch_for(model.config.vocab_size, first_target)
            if i == 0:
                step(variant, model, optimizer, ids, targets)
            loss, peak = measure_peak_bytes(lambda: step(variant, model, optimizer, ids, targets))
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step(variant, model, optimizer, ids, targets)
                times.append(time.perf_counter() - start)
            runs.append({"layout": layout, "variant": variant, "targets": int((targets != -100).sum()),
                         "peak_bytes": peak, "loss": loss, "step_s": times,
                         "median_step_s": median(times) if times else None})
            print(f"  {layout}: peak {peak / GB:.3f} GB, steps {[round(t, 1) for t in times]} s", file=sys.stderr,
                  flush=True)
        del model, optimizer
    return runs


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per layout and lorafit variant: peak and time over PEFT's, and over the stock head on lorafit's layers."""
    by_key = {(run["layout"], run["variant"]): run for run in runs}
    result = {}
    for (layout, variant), ours in by_key.items():
        for other in ("peft", "lorafit-stock-head"):
            if variant == other or (layout, other) not in by_key or (variant, other) == ("peft", "lorafit-stock-head"):
                continue
            theirs = by_key[(layout, other)]
            entry = result.setdefault(f"{layout}/{variant}", {})
            entry[f"peak_vs_{other}"] = ours["peak_bytes"] / theirs["peak_bytes"]
            if ours["median_step_s"] and theirs["median_step_s"]:
                entry[f"time_vs_{other}"] = ours["median_step_s"] / theirs["median_step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and layout (default 2; 0: peaks only)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args()
    threads = use_all_cpus()
    info = machine_info(torch.device("cpu"))
    start = time.perf_counter()
    runs = measure(args.variants, args.steps)
    estimate = estimate_memory(MODEL, r=RANK, batch=BATCH, seq=SEQ, dropout=DROPOUT, attention_mask=False)
    estimated = {"activations": estimate.activations, "logits": estimate.logits, "logits_hf": estimate.logits_hf}
    table = markdown_table(
        ["layout", "variant", "targets", "peak GB", "step s (median)", "loss"],
        [[r["layout"], r["variant"], r["targets"], f"{r['peak_bytes'] / GB:.3f}", f"{r['median_step_s'] or 0:.2f}",
          f"{r['loss']:.4f}"] for r in runs])
    result_ratios = ratios(runs)
    ratio_table = "\n".join(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) for name, r in result_ratios.items())
    print(table, ratio_table, sep="\n\n")
    print(f"\nestimate (all targets): activations + logits = {(estimate.activations + estimate.logits) / GB:.3f} GB "
          f"(stock loss: {(estimate.activations + estimate.logits_hf) / GB:.3f} GB)")
    save_results({
        "benchmark": "step_memory", "model": MODEL, "machine": info, "threads": threads, "lorafit": lorafit_source(),
        "load_average_after": load_average(), "wall_s": time.perf_counter() - start,
        "settings": {"batch": BATCH, "seq": SEQ, "r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "lr": LR,
                     "dtype": "fp32", "layouts": LAYOUTS, "steps": args.steps},
        "runs": runs, "ratios": result_ratios, "estimate_bytes": estimated,
    }, args.out)


if __name__ == "__main__":
    main()
