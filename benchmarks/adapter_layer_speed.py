"""Forward + backward time of one adapted layer: LoRA against DoRA (dropout 0, 0.05, low-rank-only), one thread.

One 576 -> 1536 linear (SmolLM2's gate/up shape), 1024 rows of fp32 input that needs its gradient, r=16: the
layer's cost without the rest of the model, where DoRA's extra passes over the (rows x out) tensors show. The
variants run interleaved, one repeat of each in turn, so that background load hits all of them alike; the table
gives the median of --repeats per variant, the ratio to LoRA at the same dropout and per-process CPU time.

Run: OMP_NUM_THREADS=1 python benchmarks/adapter_layer_speed.py [--repeats 15] [--out PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine_info, markdown_table, median, save_results
from torch import nn

from lorafit.adapters.lora import LoraLinear

IN_FEATURES, OUT_FEATURES, ROWS, RANK, ALPHA = 576, 1536, 1024, 16, 32
VARIANTS = {  # name: (use_dora, dropout, lowrank_only)
    "lora-dropout0": (False, 0.0, False),
    "dora-dropout0": (True, 0.0, False),
    "lora-dropout0.05": (False, 0.05, False),
    "dora-dropout0.05": (True, 0.05, False),
    "dora-dropout0.05-lowrank-only": (True, 0.05, True),
}


def build(use_dora: bool, dropout: float, lowrank_only: bool) -> LoraLinear:
    """The layer in train mode, with a non-zero B (a trained adapter) and the same base for every variant."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    layer = LoraLinear(base, RANK, ALPHA, ALPHA / RANK, dropout, use_dora=use_dora,
                       dora_dropout_lowrank_only=lowrank_only)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.01)
    return layer.train()


def time_once(layer: LoraLinear, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(wall s, CPU s) of one forward + backward."""
    wall, cpu = time.perf_counter(), time.process_time()
    layer(x).backward(grad)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed forward+backward passes per variant")
    parser.add_argument("--out", type=Path, help="JSON output path (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = {name: build(*spec) for name, spec in VARIANTS.items()}
    x = torch.randn(ROWS, IN_FEATURES, requires_grad=True)
    grad = torch.randn(ROWS, OUT_FEATURES)
    for layer in layers.values():  # warm-up
        time_once(layer, x, grad)
    walls = {name: [] for name in layers}
    cpus = {name: [] for name in layers}
    for _ in range(args.repeats):
        for name, layer in layers.items():
            wall, cpu = time_once(layer, x, grad)
            walls[name].append(wall)
            cpus[name].append(cpu)
    medians = {name: median(values) for name, values in walls.items()}
    rows = []
    for name in layers:
        lora = "lora-dropout0.05" if "0.05" in name else "lora-dropout0"
        rows.append([name, f"{medians[name] * 1e3:.1f}", f"{median(cpus[name]) * 1e3:.1f}",
                     f"{medians[name] / medians[lora]:.2f}"])
    print(markdown_table(["variant", "wall ms (median)", "CPU ms (median)", "/ LoRA same dropout"], rows))
    save_results({"benchmark": "adapter_layer_speed", "machine": machine_info(torch.device("cpu")),
                  "settings": {"in": IN_FEATURES, "out": OUT_FEATURES, "rows": ROWS, "r": RANK, "threads": 1,
                               "repeats": args.repeats},
                  "wall_s": walls, "cpu_s": cpus, "median_wall_s": medians}, args.out)


if __name__ == "__main__":
    main()
