"""What every trainer (sft, grpo) shares: the run's state, model + adapter, optimiser step, logging, checkpoints,
and the end of a run (adapter, summary, diagnosis + report).

Each trainer's `train()` is the recipe, read top to bottom: `begin_run` (a RunState), setup (model, data, adapter,
optimisation), the loop (`end_step` after each step), then `finish`. Only the pieces that must not drift apart
(clipping, the optimiser/scheduler step, when to log and checkpoint, resume, timings) live here once.

The same code runs on 1 or N processes (torchrun; lorafit.distributed): begin_run joins the process group,
the model loads onto this rank's device, start_training wraps it (DDP or FSDP2; a plain Runner in a world of
one) and builds the optimiser over the wrapped parameters; rank 0 alone prints, draws progress and writes the
run folder, and every collective (checkpoint and adapter gathers) is entered by every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit import distributed
from lorafit.adapters.io import read_adapter_config, read_adapter_tokenizer
from lorafit.adapters.model import parameter_report
from lorafit.adapters.prepare import prepare_model, quantize_at_load
from lorafit.adapters.trainable_tokens import check_new_rows_trained, resolve_token_strings
from lorafit.config import AdapterConfig
from lorafit.device import bf16_worthwhile, peak_memory_mib, reset_peak_memory, return_freed_host_memory
from lorafit.diagnose.checks import check_run_config, format_checks
from lorafit.diagnose.curves import CurveMonitor, has_learning_curve
from lorafit.diagnose.memory import estimate_memory, token_rows
from lorafit.diagnose.model_shape import ModelShapeError
from lorafit.errors import CheckpointError, UserError
from lorafit.finish import finish_run
from lorafit.models import load_model
from lorafit.models.vocabulary import add_tokens
from lorafit.run_config import RunConfig, TrainingConfig, check_init_fits_base, to_dict
from lorafit.run_dir import MetricsLog, RunDir
from lorafit.train import early_stopping
from lorafit.train.checkpoint import (
    TrainerState,
    newest_valid_checkpoint,
    restore_adapter,
    restore_training_state,
    save_checkpoint,
)
from lorafit.train.compile import compile_blocks
from lorafit.train.optimizers import make_optimizer
from lorafit.train.schedule import make_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingDiverged(UserError):  # a user error: the advice says which setting to change
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
    eval_sets_before: dict[str, Any] | None = None  # evaluation.sets: {name: evaluate_set result} before training
    eval_sets_after: dict[str, Any] | None = None
    forgetting: dict[str, Any] | None = None  # forgetting_check's figures, when evaluation.forgetting is on
    early_stopping: dict[str, Any] | None = None  # early_stopping.summary, when evaluation.early_stopping is set


@dataclass
class RunState:
    """One run while it trains: its config and folder, model and tokenizer, optimisation, where training stands,
    the metrics log, the live loss-curve monitor, and the result (phase timings via `timed`, evaluations)."""

    config: RunConfig
    folder: RunDir
    result: RunResult
    model: Any = None  # the model itself (unwrapped): names, adapter config, generation
    wrapped: Any = None  # what start_training's distributed.wrap made of it: run forward passes through it
    tokenizer: Any = None
    opt: Optimisation | None = None
    trainer: TrainerState = field(default_factory=TrainerState)
    log: MetricsLog | None = None
    monitor: CurveMonitor | None = None
    resume: bool = False  # continue from the newest checkpoint in the folder
    trust_checkpoint: bool = False  # read pickled checkpoints of earlier versions (they can run code)
    total_steps: int = 0
    last_s: dict[str, float] = field(default_factory=dict)  # the latest duration of each timed phase

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block: its seconds are added to result.phases[name + '_s'] (a phase inside the loop adds up
        over the steps) and kept in last_s[name + '_s'] for the step's metrics row."""
        key, clock = f"{name}_s", time.perf_counter()
        try:
            yield
        finally:
            self.last_s[key] = time.perf_counter() - clock
            self.result.phases[key] = self.result.phases.get(key, 0.0) + self.last_s[key]


def begin_run(config: RunConfig, resume: bool = False, trust_checkpoint: bool = False, *,
              overwrite: bool = False) -> RunState:
    """Join the process group (under torchrun), print the config checks, claim the run folder on rank 0
    (RunDir.claim: the lock, and a previous run is continued only with `resume` or replaced only with
    `overwrite`), record the resolved config there (rank 0) and seed torch (the same seed on every rank). With
    training.release_host_memory, large freed host buffers go back to the OS at once
    (device.return_freed_host_memory): RSS tracks what is used, at the cost of page faults on every new buffer."""
    if config.training.release_host_memory:
        return_freed_host_memory()
    distributed.init(timeout_minutes=config.distributed.timeout_minutes, cpu_offload=config.distributed.cpu_offload)
    distributed.print_main(format_checks(check_run_config(config)))
    folder = RunDir(config.output_dir)
    if distributed.is_main():
        folder.claim(resume=resume, overwrite=overwrite)
        folder.write_config(to_dict(config))
    distributed.barrier()  # the other ranks read the folder only once rank 0 has claimed it
    torch.manual_seed(config.training.seed)
    return RunState(config=config, folder=folder, result=RunResult(output_dir=folder.path, steps=0), resume=resume,
                    trust_checkpoint=trust_checkpoint)


def load_base_model(state: RunState) -> None:
    """state.model, state.tokenizer: config.model in config.dtype, its block linears in NF4 when config.quantize says
    so (except with LoftQ, which quantises while it initialises: see attach_adapter); timed as load_model."""
    config = state.config
    with state.timed("load_model"):
        quantize = quantize_at_load(_adapter_init(config), config.quantize)
        state.model, state.tokenizer = load_model(config.model, dtype=DTYPES[config.dtype], quantize=quantize,
                                                  double_quant=config.double_quant, device=distributed.context().device)


def attach_adapter(model: nn.Module, config: RunConfig, tokenizer: Any) -> None:
    """Add data.added_tokens to the tokenizer and the model's embeddings, attach a fresh adapter (config.adapter,
    its token strings resolved) or a saved one (config.init_adapter, trainable) and print the report.

    With LoftQ, prepare_model quantises the block linears it does not adapt, then the init quantises the adapted ones.
    """
    adapter = config.init_adapter or config.adapter
    new_rows = add_tokens(model, tokenizer, added_tokens(config, tokenizer))
    if isinstance(adapter, AdapterConfig):
        adapter = resolve_token_strings(adapter, tokenizer.get_vocab())
        check_new_rows_trained(model, adapter, new_rows)
    prepare_model(model, adapter, quantize=config.quantize,
                  double_quant=config.double_quant, warn_scale=False)  # the config checks have said it already
    if config.init_adapter:
        distributed.print_main(f"adapter initialised from {config.init_adapter}")
    distributed.print_main(parameter_report(model))
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.training.compile:
        compile_blocks(model)


def added_tokens(config: RunConfig, tokenizer: Any) -> list[str]:
    """The tokens this run adds to the base tokenizer: data.added_tokens, after those an init_adapter's saved
    tokenizer has beyond `tokenizer` (in id order, so they get the same ids again)."""
    saved = read_adapter_tokenizer(config.init_adapter) if config.init_adapter else None
    vocab = tokenizer.get_vocab()
    inherited = [] if saved is None else [t for t, _ in sorted(saved.get_vocab().items(), key=lambda item: item[1])
                                          if t not in vocab]
    return inherited + [t for t in config.data.added_tokens if t not in inherited]


def _adapter_init(config: RunConfig) -> str:
    """The init of the adapter the run starts from; a saved init_adapter is checked against quantize here,
    before any weight loads (validation cannot: the folder is only read now)."""
    if not config.init_adapter:
        return config.adapter.init
    adapter = read_adapter_config(config.init_adapter)
    check_init_fits_base(config, adapter, f"the init of init_adapter {config.init_adapter}")
    return adapter.init


def use_bf16(t: TrainingConfig, device: torch.device) -> bool:
    """Whether to autocast to bf16: training.bf16 true, or auto on a device where it pays (device.bf16_worthwhile)."""
    return t.bf16 is True or (t.bf16 == "auto" and bf16_worthwhile(device))


@dataclass
class Optimisation:
    """The optimiser (training.optimizer) over the trainable parameters and its learning-rate schedule."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def step(self, max_grad_norm: float | None) -> tuple[float, float]:
        """Clip, take one optimiser and schedule step, clear the gradients; return (grad norm, lr used)."""
        grad_norm = distributed.clip_grad_norm(self.params, max_grad_norm if max_grad_norm else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, lr


def start_training(state: RunState, total_steps: int, updates_per_step: int = 1) -> None:
    """Wrap the model for this many processes, the optimiser and its schedule over total_steps x updates_per_step
    optimiser steps; restore the newest checkpoint when resuming (metrics past it are dropped), else start a fresh
    metrics log; the live loss-curve monitor for methods whose loss is a learning curve; a fresh peak-memory
    window for the first step.

    Order (FSDP2 replaces parameters by shards when it wraps): the checkpoint's adapter goes into the model
    before the wrap, the optimiser is built over the wrapped parameters and its state loaded after. Every rank
    reads the checkpoint (under several machines, output_dir must be on storage they share)."""
    config = state.config
    state.total_steps = total_steps
    checkpoints = state.folder.list_checkpoints() if state.resume else []
    saved = newest_valid_checkpoint(checkpoints, trust_checkpoint=state.trust_checkpoint)
    if saved:
        restore_adapter(saved, state.model)
    state.wrapped = wrap_model(state.model, config)
    state.opt = make_optimisation(state.model, config.training, total_steps * updates_per_step)
    if saved:
        state.trainer = restore_training_state(saved, state.wrapped, state.opt.optimizer, state.opt.scheduler)
        distributed.print_main(f"resumed from {saved.path} at step {state.trainer.step}")
    _start_early_stopping(state, saved.path if saved else None)
    state.log = state.folder.metrics_log()
    if distributed.is_main():
        state.log.truncate_after(state.trainer.step)
    state.result.steps = state.trainer.step
    if has_learning_curve(config.method):
        state.monitor = CurveMonitor(to_dict(config))  # warns live the first time a loss-curve pattern shows
    state.model.train()
    reset_peak_memory(distributed.context().device)


def _start_early_stopping(state: RunState, checkpoint: Path | None) -> None:
    """The early-stopping state a run starts from: the checkpoint's when resuming one that has it (it must monitor
    the same loss), else a fresh one; none without evaluation.early_stopping."""
    rule, progress = state.config.evaluation.early_stopping, state.trainer
    if rule is None:
        progress.early_stopping = progress.best_adapter = None
        return
    if progress.early_stopping is None:
        progress.early_stopping = early_stopping.EarlyStoppingState(monitor=rule.monitor)
    elif progress.early_stopping.monitor != rule.monitor:
        raise CheckpointError(f"{checkpoint} tracked evaluation.early_stopping.monitor="
                              f"{progress.early_stopping.monitor!r}, this run monitors {rule.monitor!r}; resume with "
                              "the monitor that wrote it, or start a new run in another output_dir.")


def wrap_model(model: nn.Module, config: RunConfig) -> nn.Module:
    """distributed.wrap with the config's strategy; `auto` picks fsdp when the memory estimate of one process
    exceeds one device, else ddp, and rank 0 says which and why. In a world of one: no DDP/FSDP."""
    d = config.distributed
    if distributed.world_size() == 1:
        return distributed.wrap(model, "ddp" if d.strategy == "auto" else d.strategy)
    if d.strategy != "auto":
        strategy, why = distributed.choose_strategy(d.strategy, 0, 0)
    else:
        try:
            strategy, why = distributed.choose_strategy("auto", _one_process_bytes(config),
                                                        distributed.device_memory_bytes())
        except ModelShapeError as err:  # e.g. a hub id whose config.json is not on disk
            strategy, why = "ddp", f"no memory estimate ({err}); set distributed.strategy: fsdp if it does not fit"
    distributed.print_main(f"distributed strategy: {strategy} ({why}), {distributed.world_size()} processes")
    return distributed.wrap(model, strategy, reshard_after_forward=d.reshard_after_forward, cpu_offload=d.cpu_offload)


def _one_process_bytes(config: RunConfig) -> int:
    """The memory estimator's total for this run on one process (lorafit.diagnose.memory)."""
    t = config.training
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[config.dtype]
    rows, head_rows = token_rows(config.adapter.trainable_token_indices)
    estimate = estimate_memory(config.model, method="qlora" if config.quantize else "lora", r=config.adapter.r,
                               batch=t.micro_batch_size or t.batch_size, seq=config.data.max_seq_len,
                               grad_checkpointing=t.gradient_checkpointing, precision=precision,
                               modules_to_save=config.adapter.modules_to_save, trainable_tokens=rows,
                               trainable_head_tokens=head_rows)
    return int(estimate.total)


def make_optimisation(model: nn.Module, t: TrainingConfig, total_updates: int) -> Optimisation:
    """t.optimizer (lr, weight decay from `t`) and a warmup + decay schedule over `total_updates` optimiser steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(t.optimizer, params, t.lr, t.weight_decay, params[0].device)
    return Optimisation(params, optimizer, make_scheduler(optimizer, total_updates, t.warmup_steps, t.schedule))


def check_finite(loss: float, step: int) -> None:
    """Stop with a clear error when the loss of step `step` (1-based) is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} at step {step}; the last checkpoint is kept. "
                               "Lower training.lr or set training.max_grad_norm.")


def end_step(state: RunState, row: dict[str, Any], force_log: bool = False) -> None:
    """After step state.trainer.step: log its row (every log_every steps, the last step, or when forced) with the
    peak memory since the previous row, and write a checkpoint when due; the live loss-curve monitor warns the first
    time a pattern (spike, plateau, ...) shows. result.steps counts the steps done."""
    t, step = state.config.training, state.trainer.step
    if step % t.log_every == 0 or force_log or step == state.total_steps:
        device = distributed.context().device
        row.update(peak_memory_mib(device))  # this rank's (rank 0's in the log)
        reset_peak_memory(device)
        if distributed.is_main():
            state.log.append(row)
            for finding in state.monitor.observe(row) if state.monitor else []:
                tqdm.write(f"diagnosis at step {step}: {finding.pattern}: {finding.advice}")
    if t.save_every and step % t.save_every == 0 and step < state.total_steps:
        save_checkpoint(state.folder.path, state.wrapped, state.opt.optimizer, state.opt.scheduler, state.trainer,
                        t.keep_checkpoints)
    state.result.steps = step


def early_stopping_decides(state: RunState, value: float) -> bool:
    """Early stopping (evaluation.early_stopping) after an evaluation at step state.trainer.step measured `value` of
    the monitored loss; True when training should stop. Call it before end_step, so that a checkpoint of this step
    holds the decision. Every rank must call it.

    Rank 0's value decides on every rank (broadcast; the all-reduced loss is the same number everywhere already,
    this makes it so by construction): the same pure rule on the same numbers, from the same checkpointed state,
    so every rank improves, gathers the adapter and leaves the loop at the same step. A new best's adapter is
    gathered into rank 0's CPU memory (the adapter's size)."""
    rule, progress = state.config.evaluation.early_stopping, state.trainer
    value = float(distributed.broadcast_(torch.tensor([value], dtype=torch.float64))[0])
    progress.early_stopping = early_stopping.observe(progress.early_stopping, value, progress.step, rule.min_delta)
    if progress.early_stopping.best_step == progress.step:
        progress.best_adapter = distributed.gather_adapter(state.wrapped)
    return early_stopping.should_stop(progress.early_stopping, rule.patience)


def early_stopped(state: RunState) -> bool:
    """Whether the early-stopping state says stop already (a run resumed from a checkpoint of its stop step)."""
    rule = state.config.evaluation.early_stopping
    return rule is not None and early_stopping.should_stop(state.trainer.early_stopping, rule.patience)


def restore_best_adapter(state: RunState) -> bool:
    """After the loop, with evaluation.early_stopping: put the best evaluation's adapter back into the model when
    the last step's is another (as HF's load_best_model_at_end), say where training ended and why, and record
    early_stopping.summary in the result. The adapter saved and evaluated after this is the best one. Every rank
    must call it. Returns whether it replaced the model's adapter."""
    if state.config.evaluation.early_stopping is None:
        return False
    tracked, step = state.trainer.early_stopping, state.trainer.step
    stopped_early = step < state.total_steps
    restore = tracked.best_step is not None and tracked.best_step != step
    if tracked.best_step is None:
        distributed.print_main(f"warning: no evaluation gave a finite {tracked.monitor}; the adapter is step {step}'s.")
    if restore:
        distributed.load_full_parameters(state.wrapped, state.trainer.best_adapter)
    if stopped_early:
        distributed.print_main(early_stopping.stop_message(tracked, step))
    elif tracked.best_step is not None:
        distributed.print_main(f"best {tracked.monitor} {tracked.best:.6g} at step {tracked.best_step}, "
                               f"adapter from step {tracked.best_step}")
    state.result.early_stopping = early_stopping.summary(tracked, step, stopped_early)
    return restore


def save_final_adapter(state: RunState) -> None:
    """Write the trained adapter to OUTPUT/adapter (PEFT format): gathered from every rank, written by rank 0."""
    grew = state.config.data.added_tokens or (state.config.init_adapter and read_adapter_tokenizer(state.config.init_adapter))
    tokenizer = state.tokenizer if grew else None  # the grown vocabulary travels with the adapter
    distributed.save_adapter(state.wrapped, state.folder.adapter, base_model_name_or_path=state.config.model,
                             tokenizer=tokenizer)
    distributed.print_main(f"adapter saved to {state.folder.adapter}")


def finish(state: RunState) -> RunResult:
    """summary.json, then the diagnosis and report (finish_run), on rank 0 while the others wait. A failure of the
    report only warns: the adapter, metrics and summary are already written, and `lorafit report DIR` can retry."""
    result = state.result
    if distributed.is_main():
        _write_results(state)
    distributed.barrier()
    return result


def _write_results(state: RunState) -> None:
    result = state.result
    summary = {"steps": result.steps, "final_loss": result.final_loss, "phases_s": result.phases,
               "eval_before": result.eval_before, "eval_after": result.eval_after}
    optional = {"eval_base": result.eval_base, "eval_sets_before": result.eval_sets_before,
                "eval_sets_after": result.eval_sets_after, "forgetting": result.forgetting,
                "early_stopping": result.early_stopping}
    summary |= {key: value for key, value in optional.items() if value is not None}
    state.folder.write_summary(summary)
    try:
        finish_run(state.folder.path)
    except Exception as err:  # noqa: BLE001 - the run's results are safe; the report is a view of them
        print(f"warning: the report could not be written ({type(err).__name__}: {err}); "
              f"retry with `lorafit report {state.folder.path}`.")
    state.folder.release()
