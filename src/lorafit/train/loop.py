"""What every trainer (sft, grpo) shares: run folder, model + adapter, optimiser step, logging, checkpoints, summary.

Each trainer's `train()` calls these plain functions in order, so the loop still reads top to bottom in
the trainer file; only the pieces that must not drift apart (clipping, the optimiser/scheduler step,
when to log and checkpoint, resume) live here once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lorafit.adapters.io import load_adapter, read_adapter_config, save_adapter
from lorafit.adapters.model import attach, parameter_report
from lorafit.device import bf16_worthwhile, default_compute_dtype
from lorafit.diagnose.checks import check_run_config, format_checks
from lorafit.diagnose.curves import CurveMonitor, diagnose_run
from lorafit.errors import UserError  # issue 13
from lorafit.fileio import write_json_atomic, write_text_atomic
from lorafit.models import block_linear_names, load_model, quantize_block_linears
from lorafit.report import write_report
from lorafit.run_config import RunConfig, TrainingConfig, check_init_fits_base, to_dict
from lorafit.train.checkpoint import (  # issue 13: verified, pickle-free checkpoints
    TrainerState,
    list_checkpoints,
    newest_valid_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from lorafit.train.metrics_log import MetricsLog
from lorafit.train.schedule import make_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingDiverged(UserError):  # issue 13: a user error (the advice says which setting to change)
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a run produced: where, how long each phase took, and the before/after evaluation."""

    output_dir: Path
    steps: int
    phases: dict[str, float] = field(default_factory=dict)
    final_loss: float | None = None
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    eval_base: dict[str, Any] | None = None  # the base model (adapter off) when training started from a saved adapter


def begin_run(config: RunConfig) -> RunResult:
    """Print the config checks, create the run folder, record the resolved config there and seed torch."""
    print(format_checks(check_run_config(config)))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    torch.manual_seed(config.training.seed)
    return RunResult(output_dir=out, steps=0)


def load_base_model(config: RunConfig, result: RunResult) -> tuple[Any, Any]:
    """(model, tokenizer) of config.model in config.dtype, its block linears in NF4 when config.quantize says so
    (except with LoftQ, which quantises while it initialises: see attach_adapter); time in phases['load_model_s']."""
    clock = time.perf_counter()
    quantize = None if _adapter_init(config) == "loftq" else config.quantize
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype], quantize=quantize,
                                  double_quant=config.double_quant)
    result.phases["load_model_s"] = time.perf_counter() - clock
    return model, tokenizer


def attach_adapter(model: nn.Module, config: RunConfig) -> None:
    """Attach a fresh adapter (config.adapter) or a saved one (config.init_adapter, trainable) and print the report.

    With LoftQ the adapted layers were quantised by their init; the other block linears are quantised here.
    """
    if config.init_adapter:
        load_adapter(model, config.init_adapter, trainable=True)
        print(f"adapter initialised from {config.init_adapter}")
    else:
        attach(model, config.adapter, warn_scale=False)  # the config checks have said it already
    if config.quantize and _adapter_init(config) == "loftq" and block_linear_names(model):  # layers not adapted
        quantize_block_linears(model, double_quant=config.double_quant, compute_dtype=default_compute_dtype(model.device))
    print(parameter_report(model))
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _adapter_init(config: RunConfig) -> str:
    """The init of the adapter the run starts from; a saved init_adapter is checked against quantize here,
    before any weight loads (validation cannot: the folder is only read now)."""
    if not config.init_adapter:
        return config.adapter.init
    adapter = read_adapter_config(config.init_adapter)
    check_init_fits_base(config, adapter, f"the init of init_adapter {config.init_adapter}")
    return adapter.init


def use_bf16(t: TrainingConfig, device: torch.device) -> bool:
    """Whether to autocast to bf16: training.bf16 true, or auto on a device where it pays (CUDA with bf16)."""
    return t.bf16 is True or (t.bf16 == "auto" and bf16_worthwhile(device))


@dataclass
class Optimisation:
    """AdamW over the trainable parameters and its learning-rate schedule."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def step(self, max_grad_norm: float | None) -> tuple[float, float]:
        """Clip, take one optimiser and schedule step, clear the gradients; return (grad norm, lr used)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm if max_grad_norm else float("inf")))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, lr


def make_optimisation(model: nn.Module, t: TrainingConfig, total_updates: int) -> Optimisation:
    """AdamW (lr, weight decay from `t`) and a warmup + decay schedule over `total_updates` optimiser steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return Optimisation(params, optimizer, make_scheduler(optimizer, total_updates, t.warmup_steps, t.schedule))


def start_or_resume(out: Path, model: nn.Module, opt: Optimisation, resume: bool,
                    trust_checkpoint: bool = False) -> tuple[TrainerState, MetricsLog]:  # issue 13: trust_checkpoint
    """Restore the newest checkpoint when resuming (metrics past it are dropped), else start a fresh metrics log."""
    log = MetricsLog(out / "metrics.jsonl")
    checkpoints = list_checkpoints(out) if resume else []  # issue 13
    if saved := newest_valid_checkpoint(checkpoints, trust_checkpoint=trust_checkpoint):  # issue 13
        state = restore_checkpoint(saved, model, opt.optimizer, opt.scheduler)  # issue 13
        log.truncate_after(state.step)
        print(f"resumed from {saved.path} at step {state.step}")  # issue 13
        return state, log
    log.truncate_after(0)
    return TrainerState(), log


def check_finite(loss: float, step: int) -> None:
    """Stop with a clear error when the loss of step `step` (1-based) is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} at step {step}; the last checkpoint is kept. "
                               "Lower training.lr or set training.max_grad_norm.")


def end_step(row: dict[str, Any], *, out: Path, log: MetricsLog, model: nn.Module, opt: Optimisation,
             state: TrainerState, t: TrainingConfig, total_steps: int, force_log: bool = False,
             monitor: CurveMonitor | None = None) -> None:
    """Log the step's row (every log_every steps, the last step, or when forced) and write a checkpoint when due;
    the live loss-curve monitor warns the first time a pattern (spike, plateau, ...) shows."""
    if state.step % t.log_every == 0 or force_log or state.step == total_steps:
        log.append(row)
        for finding in monitor.observe(row) if monitor else []:
            tqdm.write(f"diagnosis at step {state.step}: {finding.pattern}: {finding.advice}")
    if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
        save_checkpoint(out, model, opt.optimizer, opt.scheduler, state, t.keep_checkpoints)


def save_final_adapter(model: nn.Module, config: RunConfig, result: RunResult) -> None:
    """Write the trained adapter to OUTPUT/adapter (PEFT format)."""
    save_adapter(model, result.output_dir / "adapter", base_model_name_or_path=config.model)
    print(f"adapter saved to {result.output_dir / 'adapter'}")


def write_report_files(out: Path, diagnose: bool) -> None:
    """diagnosis.json (the loss-curve diagnosis, when `diagnose`) and report.html with its PNGs. A failure here
    only warns: the adapter and metrics are already written, and `lorafit report DIR` can retry."""
    try:
        diagnosis = None
        if diagnose:
            found = diagnose_run(out)
            diagnosis = found.to_json()
            write_json_atomic(out / "diagnosis.json", diagnosis)
            print(found.to_text())
        print(f"report written to {write_report(out, diagnosis=diagnosis)}")
    except Exception as err:  # noqa: BLE001 - the run's results are safe; the report is a view of them
        print(f"warning: the report could not be written ({type(err).__name__}: {err}); "
              f"retry with `lorafit report {out}`.")


def write_summary(result: RunResult) -> None:
    """summary.json: steps, final loss, phase times and the evaluations."""
    summary = {"steps": result.steps, "final_loss": result.final_loss, "phases_s": result.phases,
               "eval_before": result.eval_before, "eval_after": result.eval_after}
    if result.eval_base is not None:
        summary["eval_base"] = result.eval_base
    write_json_atomic(result.output_dir / "summary.json", summary)
