"""The memory estimator against measured memory of real LoRA training steps on SmolLM2-135M-Instruct (fp32, CPU).

Each setting runs in a fresh subprocess: load the model, attach LoRA, run `steps` of lorafit's own training
step (`lorafit.train.sft.train_step`, lorafit's chunked head loss, AdamW) on random tokens, and record
- RSS: peak resident memory during the steps (the kernel's VmHWM, reset after loading) minus the RSS of
  the process before the model was loaded. It counts what any user sees, including memory the estimate does
  not model: the C allocator keeping freed blocks for reuse, kernel scratch space, and PyTorch's code pages
  touched for the first time by the first step. The weights count once touched: the checkpoint is mmapped.
- allocated: the peak of bytes PyTorch's allocator held (parameters, plus the profiler-replayed peak of the
  steps): the figure the estimate models one for one, the CPU analogue of torch.cuda.max_memory_allocated.
Both are compared with `estimate_memory` for the same setting.

Settings run under one of two C-allocator modes: "mmap", MALLOC_MMAP_THRESHOLD_=65536, which gives every
block of 64 KiB or more back to the OS when freed, so RSS follows the live tensors (every setting); and
glibc's "default", which keeps freed blocks below its growing (up to 32 MB) mmap threshold in the heap for
reuse, so RSS stays at the heap's high-water mark (two settings, to show it). The gap between the two modes
is allocator caching, not memory the step needs.

Memory, not speed, is measured: the workers run with OMP_NUM_THREADS=1 unless it is set (fewer thread
arenas and scratch buffers make RSS less noisy).
Run: python benchmarks/memory_estimate.py [--settings b1-s256 ...] [--allocators default mmap] [--steps 2] [--quick]
Writes benchmarks/results/memory_estimate.json (not with --quick unless --out is given).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    GB,
    RESULTS_DIR,
    current_rss_bytes,
    emit_worker_result,
    load_average,
    machine_info,
    markdown_table,
    run_worker,
    save_results,
)
from peak_memory import measure_peak_bytes

import lorafit
from lorafit import distributed
from lorafit.device import peak_rss_bytes, reset_peak_rss
from lorafit.diagnose.memory import estimate_memory
from lorafit.diagnose.model_shape import model_shape
from lorafit.train.batches import MicroBatch
from lorafit.train.sft import train_step

MODEL = "smollm2-135m"
LR, DATA_SEED = 1e-4, 0
DEFAULT_OUT = RESULTS_DIR / "memory_estimate.json"
ALLOCATORS = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}  # environment of the worker


@dataclass(frozen=True)
class Setting:
    """One measured configuration: micro-batch shape, LoRA rank, checkpointing, packed rows (attention mask)."""

    batch: int
    seq: int
    r: int = 16
    grad_checkpointing: bool = False
    examples_per_row: int = 1  # > 1: packed rows whose position ids restart, so attention gets a mask


SETTINGS = {
    "b1-s256": Setting(1, 256),
    "b4-s256": Setting(4, 256),
    "b4-s256-gc": Setting(4, 256, grad_checkpointing=True),
    "b2-s256-r64": Setting(2, 256, r=64),
    "b2-s256-packed": Setting(2, 256, examples_per_row=4),
}
DEFAULT_JOBS = [(name, "mmap") for name in SETTINGS] + [("b4-s256", "default"), ("b4-s256-gc", "default")]


def estimate_for(setting: Setting):
    """What the estimator predicts for this setting (fp32 base, all-linear, AdamW)."""
    return estimate_memory(model_shape(MODEL), "lora", r=setting.r, batch=setting.batch, seq=setting.seq,
                           grad_checkpointing=setting.grad_checkpointing, precision="fp32", optimizer="adamw",
                           targets="all-linear", attention_mask=setting.examples_per_row > 1)


def random_micro_batch(setting: Setting, vocab_size: int) -> MicroBatch:
    """Random token rows in lorafit's batch layout; every position predicts the next one within its example."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    ids = torch.randint(0, vocab_size, (setting.batch, setting.seq), generator=generator)  # (B, S)
    length = setting.seq // setting.examples_per_row
    positions = torch.arange(setting.seq) % length  # restarts at every example of a packed row
    targets = torch.roll(ids, -1, dims=1)
    targets[:, positions == length - 1] = -100  # an example's last token has no target
    tensors = {"input_ids": ids, "targets": targets, "position_ids": positions.repeat(setting.batch, 1)}
    return MicroBatch(tensors, ids.numel(), int((targets != -100).sum()))


def measure(name: str, steps: int, allocator: str) -> dict[str, Any]:
    """The worker: load, attach, run `steps` training steps; return memory measured and estimated."""
    setting = SETTINGS[name]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    rss_before_load = current_rss_bytes()
    model, _ = lorafit.load_model(MODEL, device="cpu")
    lorafit.attach(model, lorafit.AdapterConfig(r=setting.r, alpha=2 * setting.r, target_modules="all-linear"),
                   warn_scale=False)
    model.train()
    if setting.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    batch = random_micro_batch(setting, model.config.vocab_size)
    wrapped = distributed.wrap(model, "ddp")  # one process: a plain Runner, as `lorafit train` runs it
    rss_loaded = current_rss_bytes()

    def run_steps() -> list[float]:
        losses = []
        for _ in range(steps):
            loss, _ = train_step(wrapped, [batch], torch.device("cpu"), use_bf16=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
        return losses

    reset_peak_rss()
    start = time.perf_counter()
    losses, step_peak = measure_peak_bytes(run_steps)
    wall = time.perf_counter() - start
    rss_peak = peak_rss_bytes()
    allocated_peak = sum(parameters.values()) + step_peak
    estimate = estimate_for(setting)
    return {
        "setting": name,
        "allocator": allocator,
        **asdict(setting),
        "steps": steps,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_before_load_bytes": rss_before_load,
        "rss_loaded_bytes": rss_loaded,
        "rss_peak_bytes": rss_peak,
        "measured_rss_bytes": rss_peak - rss_before_load,
        "parameter_bytes": sum(parameters.values()),
        "allocated_peak_bytes": allocated_peak,
        "estimate": estimate.to_dict(),
        "rss_error": (estimate.total - (rss_peak - rss_before_load)) / (rss_peak - rss_before_load),
        "allocated_error": (estimate.total - allocated_peak) / allocated_peak,
    }


def runs_table(runs: list[dict[str, Any]]) -> str:
    """Estimate vs allocated and RSS peaks, in GB, with the relative error of the estimate."""
    headers = ["setting", "allocator", "estimate GB", "allocated peak GB", "error", "RSS peak - pre-load GB", "error",
               "RSS not in allocated GB", "estimate: activations / logits GB"]
    rows = []
    for run in runs:
        e = run["estimate"]
        rows.append([run["setting"], run["allocator"], f"{e['total'] / GB:.3f}", f"{run['allocated_peak_bytes'] / GB:.3f}",
                     f"{run['allocated_error']:+.1%}", f"{run['measured_rss_bytes'] / GB:.3f}", f"{run['rss_error']:+.1%}",
                     f"{(run['measured_rss_bytes'] - run['allocated_peak_bytes']) / GB:.3f}",
                     f"{e['activations'] / GB:.3f} / {e['logits'] / GB:.3f}"])
    return markdown_table(headers, rows)


def run_with_env(env: dict[str, str], args: list[str]) -> dict[str, Any]:
    """run_worker with extra environment variables (read by glibc at process start), restored afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return run_worker(__file__, args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def parse_args() -> argparse.Namespace:
    """Command-line options; --worker (internal) runs one setting and prints it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        help="settings to run (default: all with the mmap allocator, two with glibc's default too)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per setting (default 2: the second "
                        "step runs with the optimizer state in place)")
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                        help="C-allocator modes to run each chosen setting under (default: mmap)")
    parser.add_argument("--quick", action="store_true", help="smoke test: first setting, 1 step, no JSON")
    parser.add_argument("--out", type=Path, help="JSON output path (default benchmarks/results/memory_estimate.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.settings = 1, args.settings or [next(iter(SETTINGS))]
    if args.settings or args.allocators:
        args.jobs = [(name, allocator) for name in args.settings or SETTINGS for allocator in args.allocators or ["mmap"]]
    else:
        args.jobs = DEFAULT_JOBS
    if args.steps < 1:
        parser.error("need --steps >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        emit_worker_result(measure(args.setting, args.steps, args.allocator))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
    info = machine_info(torch.device("cpu"))
    start = time.perf_counter()
    runs = []
    for i, (name, allocator) in enumerate(args.jobs):
        print(f"[{i + 1}/{len(args.jobs)}] {name}, {allocator} allocator ...", file=sys.stderr, flush=True)
        runs.append(run_with_env(ALLOCATORS[allocator], ["--setting", name, "--steps", str(args.steps),
                                                         "--allocator", allocator]))
    print(runs_table(runs))
    results = {
        "benchmark": "memory_estimate",
        "model": MODEL,
        "machine": info,
        "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "load_average_after": load_average(),
        "wall_s": time.perf_counter() - start,
        "settings": {"precision": "fp32", "optimizer": "AdamW", "lr": LR, "targets": "all-linear", "alpha": "2r",
                     "steps": args.steps, "data_seed": DATA_SEED, "jobs": args.jobs},
        "runs": runs,
        "max_abs_allocated_error": max(abs(run["allocated_error"]) for run in runs),
        "max_abs_rss_error": {allocator: max(abs(run["rss_error"]) for run in runs if run["allocator"] == allocator)
                              for allocator in dict.fromkeys(run["allocator"] for run in runs)},
    }
    save_results(results, args.out or (None if args.quick else DEFAULT_OUT))


if __name__ == "__main__":
    main()
