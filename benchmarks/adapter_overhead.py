"""LoRA and DoRA training-step cost on SmolLM2-135M-Instruct: lorafit against PEFT, measured in the same run.

Each (config, library) pair trains in its own subprocess so that peak memory belongs to that run alone:
batch 4 x 256 random tokens (loss on all of them), AdamW lr 1e-4, r=16 alpha=32 on all linear layers.
"lorafit" swaps only the adapter layers (same transformers loss as PEFT); "lorafit-step" is what
`lorafit train` runs: the same layers plus lorafit's loss, which never builds the full-vocabulary logits.
DoRA configs (`--method dora`) compare PEFT with lorafit-step computing DoRA's row norms the factored way
(the default) and "lorafit-step-direct-norm", which forms W0 + s·B A per layer as PEFT does.
The runs alternate between the libraries so that background load does not favour one side. Each run's tokens/s
is also given as a share of the matmul-only bound of the step (benchmarks/roofline.py), timed in this process.
By default the bf16 config runs only where bf16 autocast is worthwhile (CUDA): on a CPU without native
bf16 instructions one step takes minutes; ask for it with --configs to measure it anyway.

Run: python benchmarks/adapter_overhead.py [--method lora|dora] [--configs ...] [--warmup 2 --steps 6] [--quick]
Writes benchmarks/results/adapter_overhead.json, or dora_overhead.json for --method dora (not with --quick
unless --out is given).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import (
    GB,
    RESULTS_DIR,
    cuda_memory_bytes,
    current_rss_bytes,
    emit_worker_result,
    load_average,
    machine_info,
    markdown_table,
    median,
    peak_rss_bytes,
    reset_cuda_peak,
    run_worker,
    save_results,
    time_steps,
    use_all_cpus,
)
from roofline import bound_tokens_per_s
from torch import nn

import lorafit
from lorafit.device import bf16_worthwhile, default_device
from lorafit.train.loss import target_loss_sum

MODEL = "smollm2-135m"
BATCH_SIZE, SEQ_LEN = 4, 256
LR, RANK, ALPHA = 1e-4, 16, 32
DATA_SEED = 0
LIBRARIES = ("peft", "lorafit", "lorafit-step", "lorafit-step-direct-norm")
START_LOSS_TOLERANCE = 1e-4  # B = 0 at init, so both libraries start from the base model's loss
DEFAULT_OUT = {"lora": RESULTS_DIR / "adapter_overhead.json", "dora": RESULTS_DIR / "dora_overhead.json"}


@dataclass(frozen=True)
class RunConfig:
    """One benchmark configuration: the method, the adapter dropout rate and the autocast dtype (None: fp32)."""

    method: str
    dropout: float
    autocast_dtype: torch.dtype | None

    @property
    def libraries(self) -> tuple[str, ...]:
        """PEFT and the lorafit variants this config compares."""
        if self.method == "dora":
            return ("peft", "lorafit-step", "lorafit-step-direct-norm")
        return ("peft", "lorafit", "lorafit-step")


CONFIGS = {
    "dropout0.05-fp32": RunConfig("lora", 0.05, None),
    "dropout0-fp32": RunConfig("lora", 0.0, None),
    "dropout0.05-bf16": RunConfig("lora", 0.05, torch.bfloat16),
    "dora-dropout0.05-fp32": RunConfig("dora", 0.05, None),
    "dora-dropout0-fp32": RunConfig("dora", 0.0, None),
    "dora-dropout0.05-bf16": RunConfig("dora", 0.05, torch.bfloat16),
}


def default_configs(method: str, device: torch.device) -> list[str]:
    """The method's configs: all of them where bf16 autocast pays off, elsewhere only the fp32 ones."""
    return [name for name, config in CONFIGS.items()
            if config.method == method and (config.autocast_dtype is None or bf16_worthwhile(device))]


def build_model(library: str, config: RunConfig, device: torch.device) -> nn.Module:
    """SmolLM2 with LoRA or DoRA (r=16, alpha=32, all linear layers) attached by `library`, in train mode."""
    model, _ = lorafit.load_model(MODEL, device=device)
    dora = config.method == "dora"
    if library.startswith("lorafit"):
        if library.endswith("direct-norm"):  # measure PEFT's way of taking the norms inside lorafit's layer
            import lorafit.adapters.dora as dora_module

            dora_module.row_norms_factored = dora_module.row_norms_direct
        adapter = lorafit.AdapterConfig(r=RANK, alpha=ALPHA, dropout=config.dropout, target_modules="all-linear",
                                        use_dora=dora)
        model = lorafit.attach(model, adapter)
    else:
        from peft import (  # reference dependency (test extra), only needed here
            LoraConfig,
            get_peft_model,
        )

        adapter = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=config.dropout, target_modules="all-linear",
                             use_dora=dora)
        model = get_peft_model(model, adapter)
    return model.train()


def random_batch(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(BATCH_SIZE, SEQ_LEN) token ids from a fixed-seed generator: the same batch for every run."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, vocab_size, (BATCH_SIZE, SEQ_LEN), generator=generator).to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               autocast_dtype: torch.dtype | None, lorafit_loss: bool) -> torch.Tensor:
    """Forward (under autocast when a dtype is given) with loss on every token, backward, AdamW step, zero_grad."""
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if lorafit_loss:
            targets = torch.full_like(input_ids, -100)
            targets[:, :-1] = input_ids[:, 1:]  # the same next-token targets as labels=input_ids
            loss = target_loss_sum(model, {"input_ids": input_ids, "targets": targets}) / (targets != -100).sum()
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(library: str, config_name: str, warmup: int, steps: int) -> dict[str, Any]:
    """The worker: load, attach, train warmup + steps, and return timings, losses and memory of this process."""
    threads = use_all_cpus()
    torch.manual_seed(0)
    device = default_device()
    config = CONFIGS[config_name]
    start = time.perf_counter()
    model = build_model(library, config, device)
    load_s = time.perf_counter() - start
    baseline_rss = current_rss_bytes()
    cuda_baseline = cuda_memory_bytes(device)
    reset_cuda_peak(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    input_ids = random_batch(model.config.vocab_size, device)
    step = partial(train_step, model, optimizer, input_ids, config.autocast_dtype, library.startswith("lorafit-step"))
    times, losses = time_steps(step, device, warmup, steps)
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"{library} {config_name}: non-finite loss {losses}")
    peak_rss = peak_rss_bytes()
    cuda_peak = cuda_memory_bytes(device)
    step_s = median(times)
    return {
        "library": library,
        "config": config_name,
        "device": str(device),
        "threads": threads,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_times_s": times,
        "median_step_s": step_s,
        "tokens_per_s": BATCH_SIZE * SEQ_LEN / step_s,
        "losses": losses,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": peak_rss,
        "overhead_rss_bytes": peak_rss - baseline_rss,
        "cuda_baseline_bytes": cuda_baseline["allocated"] if cuda_baseline else None,
        "cuda_peak_bytes": cuda_peak["peak"] if cuda_peak else None,
    }


def run_all(configs: list[str], warmup: int, steps: int) -> list[dict[str, Any]]:
    """One worker per (config, library); the library order flips from one config to the next."""
    runs = []
    total = sum(len(CONFIGS[name].libraries) for name in configs)
    for i, config_name in enumerate(configs):
        libraries = CONFIGS[config_name].libraries
        for library in libraries if i % 2 == 0 else libraries[::-1]:
            print(f"[{len(runs) + 1}/{total}] {config_name} {library} ...", file=sys.stderr, flush=True)
            run = run_worker(__file__, ["--library", library, "--config", config_name, "--warmup", str(warmup), "--steps", str(steps)])
            print(f"    {run['tokens_per_s']:.0f} tokens/s, loss {run['first_loss']:.4f} -> {run['last_loss']:.4f}",
                  file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def memory_basis(run: dict[str, Any]) -> tuple[int, int]:
    """(peak, overhead) bytes that decide the memory ratio: CUDA memory on a GPU run, else RSS."""
    if run["cuda_peak_bytes"] is not None:
        return run["cuda_peak_bytes"], run["cuda_peak_bytes"] - run["cuda_baseline_bytes"]
    return run["peak_rss_bytes"], run["overhead_rss_bytes"]


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per config and lorafit variant ("config/library"): speed, peak memory and overhead over PEFT's, start-loss diff."""
    by_key = {(run["config"], run["library"]): run for run in runs}
    result = {}
    for config_name, library in dict.fromkeys((run["config"], run["library"]) for run in runs if run["library"] != "peft"):
        ours, ref = by_key[(config_name, library)], by_key[(config_name, "peft")]
        (ours_peak, ours_over), (ref_peak, ref_over) = memory_basis(ours), memory_basis(ref)
        result[f"{config_name}/{library}"] = {
            "speed": ours["tokens_per_s"] / ref["tokens_per_s"],
            "peak_memory": ours_peak / ref_peak,
            "overhead_memory": ours_over / ref_over,
            "start_loss_diff": abs(ours["first_loss"] - ref["first_loss"]),
        }
    return result


def runs_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of every run; CUDA columns appear only when a run used CUDA."""
    cuda = any(run["cuda_peak_bytes"] is not None for run in runs)
    headers = ["config", "library", "tokens/s", "share of bound", "step s (median)", "peak RSS GB", "overhead GB"]
    headers += ["peak CUDA GB", "CUDA overhead GB"] if cuda else []
    rows = []
    for run in runs:
        row = [run["config"], run["library"], f"{run['tokens_per_s']:.0f}", f"{run['share_of_bound']:.0%}",
               f"{run['median_step_s']:.3f}",
               f"{run['peak_rss_bytes'] / GB:.3f}", f"{run['overhead_rss_bytes'] / GB:.3f}"]
        if cuda:
            peak, overhead = memory_basis(run)
            row += [f"{peak / GB:.3f}", f"{overhead / GB:.3f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def ratios_table(config_ratios: dict[str, dict[str, float]]) -> str:
    """Markdown table of the lorafit/PEFT ratios per config."""
    headers = ["config/variant", "lorafit/PEFT speed (x)", "lorafit/PEFT peak memory (x)", "lorafit/PEFT overhead (x)", "start loss diff"]
    rows = [[name, f"{r['speed']:.3f}", f"{r['peak_memory']:.3f}", f"{r['overhead_memory']:.3f}", f"{r['start_loss_diff']:.2e}"]
            for name, r in config_ratios.items()]
    return markdown_table(headers, rows)


def parse_args() -> argparse.Namespace:
    """Command-line options; --worker (internal) runs one measurement and prints it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("lora", "dora"), default="lora", help="which configs run by default")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="configs to run (default: the method's; fp32 only where bf16 is slow, e.g. on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warmup, 2 steps, first config only, no JSON")
    parser.add_argument("--out", type=Path, help="JSON output path (default benchmarks/results/adapter_overhead.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps = 1, 2
        args.configs = args.configs or default_configs(args.method, default_device())[:1]
    args.configs = args.configs or default_configs(args.method, default_device())
    if args.warmup < 0 or args.steps < 1:
        parser.error("need --warmup >= 0 and --steps >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        emit_worker_result(measure(args.library, args.config, args.warmup, args.steps))
        return
    info = machine_info(default_device())
    start = time.perf_counter()
    runs = run_all(args.configs, args.warmup, args.steps)
    use_all_cpus()
    bounds = {dtype: bound_tokens_per_s(MODEL, BATCH_SIZE, SEQ_LEN, RANK, dtype or torch.float32)
              for dtype in {CONFIGS[name].autocast_dtype for name in args.configs}}
    for run in runs:
        run["share_of_bound"] = run["tokens_per_s"] / bounds[CONFIGS[run["config"]].autocast_dtype]
    config_ratios = ratios(runs)
    print(runs_table(runs), ratios_table(config_ratios), sep="\n\n")
    loss_ok = all(r["start_loss_diff"] <= START_LOSS_TOLERANCE for r in config_ratios.values())
    results = {
        "benchmark": "adapter_overhead",
        "method": args.method,
        "model": MODEL,
        "machine": info,
        "load_average_after": load_average(),
        "wall_s": time.perf_counter() - start,
        "settings": {
            "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "tokens_per_step": BATCH_SIZE * SEQ_LEN, "lr": LR,
            "r": RANK, "alpha": ALPHA, "target_modules": "all-linear", "warmup": args.warmup, "steps": args.steps,
            "configs": args.configs, "data_seed": DATA_SEED, "start_loss_tolerance": START_LOSS_TOLERANCE,
            "bf16_worthwhile": bf16_worthwhile(default_device()),
        },
        "bound_tokens_per_s": {str(dtype or torch.float32): bound for dtype, bound in bounds.items()},
        "runs": runs,
        "ratios": config_ratios,
        "start_losses_agree": loss_ok,
    }
    save_results(results, args.out or (None if args.quick else DEFAULT_OUT[args.method]))
    if not loss_ok:
        sys.exit(f"start losses differ by more than {START_LOSS_TOLERANCE} between lorafit and PEFT (see the ratio table)")


if __name__ == "__main__":
    main()
