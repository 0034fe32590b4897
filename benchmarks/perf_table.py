"""Issue 18's closing table: lorafit against PEFT on a SmolLM2-135M training step, every combination of
LoRA / DoRA, gradient checkpointing off / on and adapter dropout 0 / 0.05.

Per run (one process each, so that RSS belongs to that run alone): tokens/s (median step), its share of the
matmul-only bound of the step (benchmarks/roofline.py, the LoRA bound, timed in this process after the runs),
the allocator's peak during one more step above what the process held before it (benchmarks/peak_memory.py:
weights, adapters and optimizer state excluded; free of the C allocator's caching), and the peak RSS of the
training window with the RSS after loading. Within a cell (method, checkpointing, dropout) the two libraries run
back to back, the order flipping from cell to cell so that background load favours neither; the ratios are
lorafit over PEFT. Batch 4 x 256 random tokens, fp32, r=16 alpha=32 on all linear layers, AdamW, loss on every
token: lorafit runs what `lorafit train` runs (its layers and its head loss), PEFT its layers with transformers'
loss (benchmarks/adapter_overhead.py builds both). Checkpointing is transformers' non-reentrant one, as
`training.gradient_checkpointing` enables it.

RSS depends on glibc's malloc, which keeps freed blocks in its heap: run with MALLOC_MMAP_THRESHOLD_=65536 (large
buffers then go back to the system when freed) to compare RSS without that noise; the setting is recorded.

Run (16 runs; on a quiet machine, about 25 minutes on a 2-core CPU: ~8 steps of 6-15 s per run, plus loading and
the bound; a one-cell check, `--methods lora --checkpointing on --dropouts 0.05 --warmup 0 --steps 1 --threads 1`,
took 6 minutes at load average 5):
  MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/perf_table.py [--warmup 2 --steps 5] [--threads N] [--out PATH]
  (--methods / --checkpointing / --dropouts run a subset of the cells)
Writes benchmarks/results/perf_table.json and prints the table (markdown).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from adapter_overhead import (
    BATCH_SIZE,
    LR,
    MODEL,
    RANK,
    SEQ_LEN,
    RunConfig,
    build_model,
    random_batch,
    train_step,
)
from common import (
    GB,
    RESULTS_DIR,
    current_rss_bytes,
    emit_phase,
    emit_worker_result,
    load_average,
    machine_info,
    markdown_table,
    median,
    run_worker,
    save_results,
    time_steps,
)
from peak_memory import measure_peak_bytes
from roofline import bound_tokens_per_s

from lorafit.device import peak_rss_bytes, reset_peak_rss

LIBRARIES = ("lorafit", "peft")
METHODS = ("lora", "dora")
DROPOUTS = (0.0, 0.05)
CHECKPOINTING = (False, True)
DEFAULT_OUT = RESULTS_DIR / "perf_table.json"


def cells(methods=METHODS, checkpointing=CHECKPOINTING, dropouts=DROPOUTS) -> list[tuple[str, bool, float]]:
    """(method, checkpointing, dropout) of every row pair of the table (all 8 by default)."""
    return [(method, ckpt, dropout) for method in methods for ckpt in checkpointing for dropout in dropouts]


def measure(library: str, method: str, checkpointing: bool, dropout: float, warmup: int, steps: int) -> dict[str, Any]:
    """The worker: load and attach, time warmup + steps, read the training window's peak RSS, then the allocator's
    peak of one more step (profiled after the RSS reading: the profiler's own buffers must not count)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    emit_phase("load")
    model = build_model("lorafit-step" if library == "lorafit" else "peft", RunConfig(method, dropout, None), device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    input_ids = random_batch(model.config.vocab_size, device)
    step = partial(train_step, model, optimizer, input_ids, None, library == "lorafit")
    windowed = reset_peak_rss()  # then the baseline: the window's peak is at least what it reads
    baseline_rss = current_rss_bytes()
    emit_phase("steps")
    cpu_start = time.process_time()
    times, losses = time_steps(step, device, warmup, steps)
    cpu_s = (time.process_time() - cpu_start) / (warmup + steps)
    peak_rss = peak_rss_bytes()
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"{library} {method} dropout {dropout} checkpointing {checkpointing}: losses {losses}")
    emit_phase("allocator peak")
    _, allocator_peak = measure_peak_bytes(step)
    step_s = median(times)
    return {
        "library": library, "method": method, "checkpointing": checkpointing, "dropout": dropout,
        "threads": torch.get_num_threads(), "step_times_s": times, "median_step_s": step_s,
        "cpu_s_per_step": cpu_s, "tokens_per_s": BATCH_SIZE * SEQ_LEN / step_s, "losses": losses,
        "baseline_rss_bytes": baseline_rss, "peak_rss_bytes": peak_rss, "rss_window": windowed,
        "allocator_peak_bytes": allocator_peak,
    }


def run_all(all_cells: list[tuple[str, bool, float]], warmup: int, steps: int, threads: int) -> list[dict[str, Any]]:
    """Both libraries per cell, back to back, the order flipping from cell to cell."""
    runs = []
    for i, (method, ckpt, dropout) in enumerate(all_cells):
        for library in LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]:
            label = f"{method} ckpt={'on' if ckpt else 'off'} dropout={dropout} {library}"
            print(f"[{len(runs) + 1}/{2 * len(all_cells)}] {label} ...", file=sys.stderr, flush=True)
            run = run_worker(__file__, ["--library", library, "--method", method, "--dropout", str(dropout),
                                        "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads)]
                             + (["--with-checkpointing"] if ckpt else []))
            print(f"    {run['tokens_per_s']:.0f} tokens/s, allocator peak {run['allocator_peak_bytes'] / GB:.3f} GB, "
                  f"peak RSS {run['peak_rss_bytes'] / GB:.3f} GB", file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def cell_key(run: dict[str, Any]) -> tuple[str, bool, float]:
    return run["method"], run["checkpointing"], run["dropout"]


def ratios(runs: list[dict[str, Any]]) -> dict[tuple[str, bool, float], dict[str, float]]:
    """Per cell, lorafit over PEFT: speed, allocator peak, peak RSS, and the first losses' difference."""
    by_key = {(*cell_key(run), run["library"]): run for run in runs}
    result = {}
    for cell in dict.fromkeys(cell_key(run) for run in runs):
        ours, peft = by_key.get((*cell, "lorafit")), by_key.get((*cell, "peft"))
        if ours is None or peft is None:
            continue
        result[cell] = {
            "speed": ours["tokens_per_s"] / peft["tokens_per_s"],
            "allocator_peak": ours["allocator_peak_bytes"] / peft["allocator_peak_bytes"],
            "peak_rss": ours["peak_rss_bytes"] / peft["peak_rss_bytes"],
            "first_loss_diff": abs(ours["losses"][0] - peft["losses"][0]),
        }
    return result


def closing_table(runs: list[dict[str, Any]]) -> str:
    """One row per run, the ratio columns on lorafit's rows."""
    cell_ratios = ratios(runs)
    headers = ["method", "checkpointing", "dropout", "library", "tokens/s", "share of bound", "CPU s/step",
               "allocator peak GB", "peak RSS GB", "RSS after load GB", "speed x PEFT", "alloc peak x PEFT",
               "RSS x PEFT"]
    rows = []
    for run in sorted(runs, key=lambda r: (METHODS.index(r["method"]), r["checkpointing"], r["dropout"],
                                           LIBRARIES.index(r["library"]))):
        r = cell_ratios.get(cell_key(run)) if run["library"] == "lorafit" else None
        rows.append([run["method"], "on" if run["checkpointing"] else "off", run["dropout"], run["library"],
                     f"{run['tokens_per_s']:.0f}", f"{run['share_of_bound']:.0%}", f"{run['cpu_s_per_step']:.2f}",
                     f"{run['allocator_peak_bytes'] / GB:.3f}", f"{run['peak_rss_bytes'] / GB:.3f}",
                     f"{run['baseline_rss_bytes'] / GB:.3f}",
                     f"{r['speed']:.2f}" if r else "", f"{r['allocator_peak']:.2f}" if r else "",
                     f"{r['peak_rss']:.2f}" if r else ""])
    return markdown_table(headers, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in every run (default: torch's default here)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="a subset of the table")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="a subset of the table")
    parser.add_argument("--dropouts", nargs="+", type=float, choices=DROPOUTS, default=list(DROPOUTS),
                        help="a subset of the table")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--with-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 0 or args.steps < 1 or args.threads < 1:
        parser.error("need --warmup >= 0, --steps >= 1 and --threads >= 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        emit_worker_result(measure(args.library, args.method, args.with_checkpointing, args.dropout, args.warmup,
                                   args.steps))
        return
    info = machine_info(torch.device("cpu"))
    start = time.perf_counter()
    selected = cells(args.methods, tuple(c == "on" for c in args.checkpointing), args.dropouts)
    runs = run_all(selected, args.warmup, args.steps, args.threads)
    bound = bound_tokens_per_s(MODEL, BATCH_SIZE, SEQ_LEN, RANK, torch.float32)
    for run in runs:
        run["share_of_bound"] = run["tokens_per_s"] / bound
    print(closing_table(runs))
    save_results({
        "benchmark": "perf_table", "model": MODEL, "machine": info, "load_average_after": load_average(),
        "wall_s": time.perf_counter() - start,
        "settings": {"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "r": RANK, "lr": LR, "dtype": "fp32",
                     "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                     "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
        "bound_tokens_per_s": bound, "runs": runs,
        "ratios": {f"{m}/ckpt={'on' if c else 'off'}/dropout={d}": r for (m, c, d), r in ratios(runs).items()},
    }, args.out)


if __name__ == "__main__":
    main()
