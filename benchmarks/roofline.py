"""The matmul-only bound of a LoRA training step: how fast a step could be on this machine if it did nothing but
the matmuls every implementation must run (lorafit/flops.py lists them: frozen forward and input gradient of every
block linear, the rank-r adapter products, attention, the head).

Each distinct matmul shape is timed with torch (best of --repeats after a warm-up) and the times are summed with
their multiplicities, in fp32 and in bf16. Elementwise work, the loss, the optimizer and memory traffic between
matmuls are not in the bound, so a real step is slower: tokens/s over the bound is a step's share of the limit.

Run: python benchmarks/roofline.py [--model smollm2-135m|llama-1b|DIR] [--batch 4 --seq 256 --rank 16]
       [--dtypes fp32 bf16] [--out PATH]
Writes benchmarks/results/roofline.json (not with --quick unless --out is given).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    save_results,
    synchronize,
    use_all_cpus,
)
from shapes import PRESETS, build_model, model_config

from lorafit.device import bf16_worthwhile, default_device
from lorafit.flops import Matmul, step_matmuls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_OUT = RESULTS_DIR / "roofline.json"
CALLS_PER_TIMING = 10


def matmul_seconds(matmul: Matmul, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Seconds of one product of `matmul`'s shape (batched when matmul.batch > 1): the best of `repeats` timings
    of a loop of up to CALLS_PER_TIMING products (as many as the step runs), over the loop's length, so that
    one preempted call on a busy machine is not multiplied by the shape's count."""
    lead = (matmul.batch,) if matmul.batch > 1 else ()
    left = torch.randn(*lead, matmul.m, matmul.k, device=device, dtype=dtype)
    right = torch.randn(*lead, matmul.k, matmul.n, device=device, dtype=dtype)
    torch.matmul(left, right)  # warm-up
    calls = min(matmul.count, CALLS_PER_TIMING)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(left, right)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def roofline(model: torch.nn.Module, batch: int, seq_len: int, rank: int, dtype: torch.dtype,
             device: torch.device, repeats: int = 3) -> dict[str, Any]:
    """The bound for one step of `batch` x `seq_len` positions with a rank-`rank` adapter on every block linear:
    per matmul shape its count, FLOPs and seconds (x count), and the totals."""
    rows = []
    for matmul in step_matmuls(model, batch, seq_len, rank):
        seconds = matmul_seconds(matmul, dtype, device, repeats) * matmul.count
        rows.append({"what": matmul.what, "shape": [matmul.batch, matmul.m, matmul.k, matmul.n],
                     "count": matmul.count, "flops": matmul.flops, "seconds": seconds})
    step_s = sum(row["seconds"] for row in rows)
    flops = sum(row["flops"] for row in rows)
    return {"rows": rows, "step_s": step_s, "step_flops": flops, "flops_per_s": flops / step_s,
            "tokens_per_s": batch * seq_len / step_s}


def bound_tokens_per_s(shape: str, batch: int, seq_len: int, rank: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """The bound in tokens/s for a model shape on the default device (what adapter_overhead.py compares with)."""
    model = build_model(model_config(shape))
    return roofline(model, batch, seq_len, rank, dtype, default_device(), repeats)["tokens_per_s"]


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per dtype: step seconds, tokens/s and FLOP/s of the bound."""
    rows = [[name, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_s'] / 1e12:.3f}",
             f"{r['step_flops'] / 1e12:.3f}"] for name, r in results.items()]
    return markdown_table(["dtype", "bound step s", "bound tokens/s", "TFLOP/s", "TFLOP per step"], rows)


def detail_table(results: dict[str, dict[str, Any]]) -> str:
    """Per matmul shape and dtype: count, GFLOP and seconds in the step."""
    names = list(results)
    first = results[names[0]]["rows"]
    headers = ["matmul", "batch x m x k x n", "count", "GFLOP"] + [f"{name} s" for name in names]
    rows = [[row["what"], " x ".join(map(str, row["shape"])), row["count"], f"{row['flops'] / 1e9:.2f}"]
            + [f"{results[name]['rows'][i]['seconds']:.4f}" for name in names] for i, row in enumerate(first)]
    return markdown_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"{', '.join(PRESETS)} or a folder with config.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16, help="adapter rank on every block linear (all-linear)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: fp32, and bf16 where it is fast (lorafit.device.bf16_worthwhile)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per shape; the best counts (default 3)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: every available core)")
    parser.add_argument("--quick", action="store_true", help="batch 1 x 64, one repeat, no JSON")
    parser.add_argument("--out", type=Path, help=f"JSON output path (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 1, 64, 1
    if min(args.batch, args.seq, args.rank, args.repeats) < 1:
        parser.error("--batch, --seq, --rank and --repeats must be >= 1")
    args.dtypes = args.dtypes or ["fp32"] + (["bf16"] if bf16_worthwhile(default_device()) else [])
    return args


def main() -> None:
    args = parse_args()
    threads = use_all_cpus()
    if args.threads:
        torch.set_num_threads(threads := args.threads)
    device = default_device()
    model = build_model(model_config(args.model))
    results = {name: roofline(model, args.batch, args.seq, args.rank, DTYPES[name], device, args.repeats)
               for name in args.dtypes}
    print(detail_table(results), summary_table(results), sep="\n\n")
    save_results({"benchmark": "roofline", "model": args.model, "machine": machine_info(device), "threads": threads,
                  "settings": {"batch": args.batch, "seq_len": args.seq, "rank": args.rank, "repeats": args.repeats},
                  "results": results}, args.out or (None if args.quick else DEFAULT_OUT))


if __name__ == "__main__":
    main()
