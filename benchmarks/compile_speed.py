"""What training.compile buys: a LoRA training step with every decoder block torch.compile'd against eager,
on a random model of a preset shape, both in this process with their timed steps interleaved (so that background
load hits both alike). The compile time is reported separately (first compiled step minus an eager step).

Run: python benchmarks/compile_speed.py [--model small|smollm2-135m|llama-1b|DIR] [--batch 4 --seq 128]
       [--steps 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    machine_info,
    markdown_table,
    median,
    save_results,
    synchronize,
    use_all_cpus,
)
from shapes import PRESETS, build_model, model_config

import lorafit
from lorafit.device import default_device
from lorafit.train.compile import compile_blocks


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    """Seconds of one forward + backward + AdamW step (loss on every position)."""
    synchronize(input_ids.device)
    start = time.perf_counter()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(input_ids.device)
    return time.perf_counter() - start


def measure(shape: str, batch: int, seq_len: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Median step seconds eager and compiled (interleaved), and the first compiled step's extra seconds."""
    torch.manual_seed(0)
    eager = build_model(model_config(shape), device=device)
    lorafit.attach(eager, lorafit.AdapterConfig(r=16, alpha=32, target_modules="all-linear"))
    compiled = copy.deepcopy(eager)
    if not compile_blocks(compiled):
        raise SystemExit("no working torch.compile here (see the warning above): nothing to compare")
    models = {"eager": eager.train(), "compiled": compiled.train()}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in models.items()}
    input_ids = torch.randint(0, eager.config.vocab_size, (batch, seq_len), device=device)
    first = {name: timed_step(models[name], optimizers[name], input_ids) for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps):
        for name in models if i % 2 == 0 else reversed(list(models)):
            times[name].append(timed_step(models[name], optimizers[name], input_ids))
    eager_s, compiled_s = median(times["eager"]), median(times["compiled"])
    return {"eager_step_s": eager_s, "compiled_step_s": compiled_s, "speedup": eager_s / compiled_s,
            "compile_s": first["compiled"] - first["eager"], "step_times_s": times}


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help=f"{', '.join(PRESETS)} or a folder with config.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--out", type=Path, help="JSON output path (default: none)")
    args = parser.parse_args()
    if min(args.batch, args.seq, args.steps) < 1:
        parser.error("--batch, --seq and --steps must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    use_all_cpus()
    device = default_device()
    result = measure(args.model, args.batch, args.seq, args.steps, device)
    print(markdown_table(["model", "batch x seq", "eager step s", "compiled step s", "speedup (x)", "compile s"],
                         [[args.model, f"{args.batch} x {args.seq}", f"{result['eager_step_s']:.3f}",
                           f"{result['compiled_step_s']:.3f}", f"{result['speedup']:.2f}",
                           f"{result['compile_s']:.1f}"]]))
    save_results({"benchmark": "compile_speed", "model": args.model, "machine": machine_info(device),
                  "settings": vars(args) | {"out": str(args.out)}, "result": result}, args.out)


if __name__ == "__main__":
    main()
