"""Supervised fine-tuning, top to bottom: load, prepare data, attach, evaluate, train, save, evaluate.

Memory / speed levers and their cost:
- loss only at target positions, head CE in chunks (train/loss.py): no full-vocabulary logits; free.
- the fused LoRA branch (adapters/lora.py): no dropout copy of inputs; free.
- packing (data.packing): no padding compute; attention confined per example by position ids.
- bf16 autocast (training.bf16, auto = CUDA only): faster on GPUs, half-size activations; slow on CPUs without bf16.
- gradient checkpointing (training.gradient_checkpointing): recomputes each block; ~30% slower, far less memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from lorafit.adapters.io import save_adapter
from lorafit.adapters.model import attach, parameter_report
from lorafit.data import Example
from lorafit.device import bf16_worthwhile
from lorafit.evaluation.generate import generate_responses
from lorafit.evaluation.metrics import score
from lorafit.fileio import write_json_atomic, write_text_atomic
from lorafit.models import load_model
from lorafit.run_config import EvaluationConfig, RunConfig, to_dict
from lorafit.train.batches import (
    Dataset,
    MicroBatch,
    fixed_batches,
    prepare_rows,
    step_micro_batches,
    steps_per_epoch,
)
from lorafit.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lorafit.train.loss import target_loss_sum
from lorafit.train.metrics_log import MetricsLog
from lorafit.train.schedule import make_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingDiverged(RuntimeError):
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


def train(config: RunConfig, *, resume: bool = False) -> RunResult:
    """Run supervised fine-tuning as `config` says; the adapter lands in OUTPUT/adapter (PEFT format)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    result = RunResult(output_dir=out, steps=0)
    t = config.training
    torch.manual_seed(t.seed)

    clock = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype])
    result.phases["load_model_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    data = config.data
    train_set = prepare_rows(data.train, tokenizer, max_seq_len=data.max_seq_len, packing=data.packing,
                             assistant_only=data.assistant_only)
    eval_set = prepare_rows(data.eval, tokenizer, max_seq_len=data.max_seq_len, packing=data.packing,
                            assistant_only=data.assistant_only) if data.eval else None
    _print_data_summary("train", train_set)
    result.phases["prepare_data_s"] = time.perf_counter() - clock

    attach(model, config.adapter)
    print(parameter_report(model))
    device = model.device
    use_bf16 = t.bf16 is True or (t.bf16 == "auto" and bf16_worthwhile(device))
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    gen_eval = config.evaluation.generation and data.eval is not None
    if gen_eval and not resume:
        clock = time.perf_counter()
        result.eval_before = generation_eval(model, tokenizer, eval_set.examples, config.evaluation)
        result.phases["eval_before_s"] = time.perf_counter() - clock
        print(f"before training: {_describe(result.eval_before)}")

    micro = t.micro_batch_size or t.batch_size
    per_epoch = steps_per_epoch(len(train_set.rows), t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, t.warmup_steps, t.schedule)
    state = TrainerState()
    log = MetricsLog(out / "metrics.jsonl")
    if resume and (checkpoints := list_checkpoints(out)):
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        log.truncate_after(state.step)
        print(f"resumed from {checkpoints[-1]} at step {state.step}")
    else:
        log.truncate_after(0)

    clock = time.perf_counter()
    model.train()
    pad = tokenizer.pad_token_id
    eval_batches = fixed_batches(eval_set.rows, micro, pad) if eval_set else []  # collated once, reused each eval
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True)
    while state.step < total_steps:
        step_start = time.perf_counter()
        batches = step_micro_batches(train_set.rows, state.step, batch_size=t.batch_size, micro_batch_size=micro,
                                     seed=t.seed, pad_token_id=pad)
        loss, tokens = train_step(model, batches, device, use_bf16)
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(f"loss is {loss} at step {state.step + 1}; the last checkpoint is kept. "
                                   "Lower training.lr or set training.max_grad_norm.")
        grad_norm = _clip(params, t.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.tokens_seen += tokens
        speed = tokens / (time.perf_counter() - step_start)
        row = {"step": state.step, "epoch": round(state.step / per_epoch, 4), "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": round(speed, 1), "tokens_seen": state.tokens_seen}
        if eval_batches and config.evaluation.every and (state.step % config.evaluation.every == 0 or state.step == total_steps):
            row["eval_loss"] = eval_loss(model, eval_batches, device, use_bf16)
        if state.step % t.log_every == 0 or "eval_loss" in row or state.step == total_steps:
            log.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}", refresh=False)
        bar.update(1)
        if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
            save_checkpoint(out, model, optimizer, scheduler, state, t.keep_checkpoints)
        result.final_loss = loss
    bar.close()
    result.phases["train_s"] = time.perf_counter() - clock
    result.steps = state.step

    save_adapter(model, out / "adapter", base_model_name_or_path=config.model)
    print(f"adapter saved to {out / 'adapter'}")
    if gen_eval:
        clock = time.perf_counter()
        result.eval_after = generation_eval(model, tokenizer, eval_set.examples, config.evaluation)
        result.phases["eval_after_s"] = time.perf_counter() - clock
        print(_side_by_side(result.eval_before, result.eval_after))
    write_json_atomic(out / "summary.json", _summary(result))
    return result


def train_step(model: Any, batches: list[MicroBatch], device: torch.device, use_bf16: bool) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one step; the loss is normalised by the step's target count."""
    targets = sum(b.targets for b in batches)
    total = 0.0
    for batch in batches:
        loss_sum = _loss_sum(model, batch, device, use_bf16)
        (loss_sum / max(targets, 1)).backward()
        total += loss_sum.item()
    return total / max(targets, 1), sum(b.tokens for b in batches)


@torch.no_grad()
def eval_loss(model: Any, batches: list[MicroBatch], device: torch.device, use_bf16: bool) -> float:
    """Mean next-token loss over every target of the held-out batches."""
    was_training = model.training
    model.eval()
    total = sum(_loss_sum(model, batch, device, use_bf16).item() for batch in batches)
    model.train(was_training)
    return total / max(sum(b.targets for b in batches), 1)


def _loss_sum(model: Any, batch: MicroBatch, device: torch.device, use_bf16: bool) -> torch.Tensor:
    """Summed target loss of one micro-batch on `device`, under bf16 autocast when asked."""
    tensors = {k: v.to(device) for k, v in batch.tensors.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return target_loss_sum(model, tensors)


def generation_eval(model: Any, tokenizer: Any, examples: list[Example], evaluation: EvaluationConfig) -> dict[str, Any]:
    """Greedy replies to the held-out chats, scored against their final assistant turn."""
    examples = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    examples = examples[: evaluation.limit] if evaluation.limit else examples
    replies = generate_responses(model, tokenizer, [e.messages[:-1] for e in examples],
                                 max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size,
                                 progress=True)
    result = score(replies, [e.messages[-1]["content"] for e in examples], evaluation.metric)
    result["samples"] = [{"prompt": e.messages[-2]["content"], "reply": r} for e, r in zip(examples[:3], replies[:3])]
    return result


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm)


def _print_data_summary(name: str, dataset: Dataset) -> None:
    s = dataset.stats
    note = f", {s.truncated} truncated to max_seq_len" if s.truncated else ""
    dropped = f", {s.dropped} dropped (no target left)" if s.dropped else ""
    print(f"{name}: {len(dataset.examples)} examples -> {len(dataset.rows)} rows, {s.total_tokens} tokens "
          f"({s.target_tokens} trained on){note}{dropped}")


def _describe(evaluation: dict[str, Any]) -> str:
    return f"{evaluation['metric']} match {evaluation['correct']}/{evaluation['total']} = {evaluation['accuracy']:.1%}"


def _side_by_side(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    lines = [f"{'':<10}{'base model':>14}{'with adapter':>16}"]
    base = f"{before['accuracy']:.1%}" if before else "n/a"
    lines.append(f"{after['metric'] + ' match':<10}{base:>14}{after['accuracy']:>16.1%}")
    for sample in after["samples"]:
        lines.append(f"  {sample['prompt']!r} -> {sample['reply']!r}")
    return "\n".join(lines)


def _summary(result: RunResult) -> dict[str, Any]:
    return {"steps": result.steps, "final_loss": result.final_loss, "phases_s": result.phases,
            "eval_before": result.eval_before, "eval_after": result.eval_after}


__all__ = ["RunResult", "TrainingDiverged", "eval_loss", "generation_eval", "train", "train_step"]
