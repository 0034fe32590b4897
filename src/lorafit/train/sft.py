"""Supervised fine-tuning, top to bottom: load, prepare data, attach, evaluate, train, save, evaluate.

Memory / speed levers and their cost:
- loss only at target positions, head CE in chunks (train/loss.py): no full-vocabulary logits; free.
- the fused LoRA branch (adapters/lora.py): no dropout copy of inputs; free.
- packing (data.packing): no padding compute; attention confined per example by position ids.
- bf16 autocast (training.bf16, auto = where bf16 is fast: CUDA, CPUs with AVX-512 BF16/AMX); slow on CPUs without.
- gradient checkpointing (training.gradient_checkpointing): recomputes each block; ~30% slower, far less memory.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit import distributed
from lorafit.data import Example
from lorafit.evaluation.eval_sets import binomial_stderr, evaluate_set, evaluate_sets, format_results
from lorafit.evaluation.forgetting import forgetting_check, format_forgetting
from lorafit.flops import step_throughput
from lorafit.run_config import EvaluationConfig, RunConfig
from lorafit.train import loop
from lorafit.train.batches import (
    Dataset,
    MicroBatch,
    prepare_rows,
    rank_micro_batches,
    step_rows,
    steps_per_epoch,
)
from lorafit.train.loop import RunResult, TrainingDiverged
from lorafit.train.loss import target_loss_sum
from lorafit.train.neftune import neftune_noise
from lorafit.train.reference import StartWeights, reference_policy, reference_start


def train(config: RunConfig, *, resume: bool = False, trust_checkpoint: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run supervised fine-tuning as `config` says; the adapter lands in OUTPUT/adapter (PEFT format)."""
    state = loop.begin_run(config, resume, trust_checkpoint, overwrite=overwrite)
    result, t, data = state.result, config.training, config.data
    loop.load_base_model(state)
    with state.timed("prepare_data"):
        prepare = partial(prepare_rows, tokenizer=state.tokenizer, max_seq_len=data.max_seq_len,
                          packing=data.packing, assistant_only=data.assistant_only)  # every file as data.train
        train_set = prepare(data.train)
        eval_set = prepare(data.eval) if data.eval else None
        monitored_set = _monitored_set(config)  # early stopping on an evaluation set's loss: its rows, as data.eval's
        monitored_rows = prepare(config.evaluation.sets[monitored_set].path).rows if monitored_set else []
        _print_data_summary("train", train_set)
    loop.attach_adapter(state.model, config, state.tokenizer)
    model, device = state.model, state.model.device
    use_bf16 = loop.use_bf16(t, device)
    check_forgetting = forgetting_enabled(config.evaluation, device)
    start = reference_start(model, config) if check_forgetting else None  # before a checkpoint moves the weights

    gen_eval = config.evaluation.generation and data.eval is not None
    if gen_eval and not resume:
        with state.timed("eval_before"):
            result.eval_before = generation_eval(model, state.tokenizer, eval_set.examples, config.evaluation)
        distributed.print_main(f"before training: {_describe(result.eval_before)}")
    if config.evaluation.sets and not resume:
        with state.timed("eval_sets_before"):
            result.eval_sets_before = score_eval_sets(model, state.tokenizer, config.evaluation, data.eval,
                                                      result.eval_before)

    micro = t.micro_batch_size or t.batch_size
    per_epoch = steps_per_epoch(len(train_set.rows), t.batch_size)
    loop.start_training(state, total_steps=t.max_steps or max(1, math.ceil(t.epochs * per_epoch)))
    progress, wrapped, ctx = state.trainer, state.wrapped, distributed.context()
    pad = state.tokenizer.pad_token_id
    # this rank's share of the held-out rows, collated once and reused each eval
    eval_batches = rank_micro_batches(eval_set.rows, micro, pad, rank=ctx.rank, world_size=ctx.world_size) \
        if eval_set else []
    monitored_batches = rank_micro_batches(monitored_rows, micro, pad, rank=ctx.rank, world_size=ctx.world_size)
    rule, every = config.evaluation.early_stopping, config.evaluation.every
    monitored_key = f"{monitored_set}_loss" if monitored_set else "eval_loss"
    stopped = loop.early_stopped(state)
    with state.timed("train"), neftune_noise(model, t.neftune_noise_alpha), tqdm(
            total=state.total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
            disable=distributed.progress_disabled()) as bar:
        while progress.step < state.total_steps and not stopped:
            step_start = time.perf_counter()
            rows = step_rows(train_set.rows, progress.step, batch_size=t.batch_size, seed=t.seed)  # same on every rank
            batches = rank_micro_batches(rows, micro, pad, rank=ctx.rank, world_size=ctx.world_size)
            loss, tokens = train_step(wrapped, batches, device, use_bf16)
            loop.check_finite(loss, progress.step + 1)
            grad_norm, lr = state.opt.step(t.max_grad_norm)
            progress.step += 1
            progress.tokens_seen += tokens
            speed = tokens / (time.perf_counter() - step_start)
            row = {"step": progress.step, "epoch": round(progress.step / per_epoch, 4), "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": round(speed, 1), "tokens_seen": progress.tokens_seen}
            row |= step_throughput(model, [tuple(b.tensors["input_ids"].shape) for b in batches], tokens / speed, device)
            evaluate = every and (progress.step % every == 0 or progress.step == state.total_steps)
            if evaluate and eval_batches:
                row["eval_loss"] = eval_loss(wrapped, eval_batches, device, use_bf16)
            if evaluate and monitored_batches:
                row[monitored_key] = eval_loss(wrapped, monitored_batches, device, use_bf16)
            if evaluate and rule is not None:
                stopped = loop.early_stopping_decides(state, row[monitored_key])
            loop.end_step(state, row, force_log="eval_loss" in row or monitored_key in row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}", refresh=False)
            bar.update(1)
            result.final_loss = loss

    loop.restore_best_adapter(state)
    loop.save_final_adapter(state)
    distributed.run_whole(wrapped, _evaluate_after, state, eval_set, check_forgetting, start)
    return loop.finish(state)


def _evaluate_after(model: Any, state: loop.RunState, eval_set: Dataset | None, check_forgetting: bool,
                    start: StartWeights | None) -> None:
    """The evaluations after training, into state.result: greedy replies to the held-out chats, the evaluation
    sets, the forgetting check. Run by distributed.run_whole: every weight whole on each rank (FSDP included)."""
    config, result = state.config, state.result
    if config.evaluation.generation and eval_set is not None:
        with state.timed("eval_after"):
            result.eval_after = generation_eval(model, state.tokenizer, eval_set.examples, config.evaluation)
        distributed.print_main(_side_by_side(result.eval_before, result.eval_after))
    if config.evaluation.sets:
        with state.timed("eval_sets_after"):
            result.eval_sets_after = score_eval_sets(model, state.tokenizer, config.evaluation, config.data.eval,
                                                     result.eval_after)
        distributed.print_main(format_results(result.eval_sets_after, result.eval_sets_before))
    if check_forgetting:
        with state.timed("forgetting"):
            result.forgetting = forgetting_check(model, state.tokenizer, reference=_reference(model, start),
                                                 progress=distributed.is_main())
        distributed.print_main(format_forgetting(result.forgetting))


def _monitored_set(config: RunConfig) -> str | None:
    """The evaluation set whose held-out loss early stopping monitors, or None (none, or data.eval's eval_loss)."""
    rule = config.evaluation.early_stopping
    return rule.monitor if rule is not None and rule.monitor != "eval_loss" else None


def forgetting_enabled(evaluation: EvaluationConfig, device: torch.device) -> bool:
    """evaluation.forgetting: true/false as written; auto runs the check on CUDA only (minutes of CPU time on a
    CPU: see lorafit.evaluation.forgetting)."""
    return evaluation.forgetting is True or (evaluation.forgetting == "auto" and device.type == "cuda")


def score_eval_sets(model: Any, tokenizer: Any, evaluation: EvaluationConfig, data_eval: str | None,
                    data_eval_result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every evaluation.sets entry scored by its metric (evaluation.metric where it names none), in config order.

    A set that is data.eval under evaluation.metric reuses `data_eval_result` (the generation eval just made of
    that file, the same greedy replies) instead of generating them a second time.
    """
    sets = {name: (s.path, s.metric or evaluation.metric) for name, s in evaluation.sets.items()}
    same = {name for name, (path, metric) in sets.items() if data_eval_result is not None and data_eval is not None
            and metric == evaluation.metric and Path(path).resolve() == Path(data_eval).resolve()}
    scored = evaluate_sets(model, tokenizer, {n: v for n, v in sets.items() if n not in same}, limit=evaluation.limit,
                           max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size, progress=True)
    return {name: {"path": path, **data_eval_result} if name in same else scored[name]
            for name, (path, _) in sets.items()}


def _reference(model: Any, start: StartWeights | None) -> Any:
    """The forgetting check's reference: the policy training started from (the adapter off for a fresh adapter)."""
    return lambda: reference_policy(model, start)


def train_step(wrapped: Any, batches: list[MicroBatch], device: torch.device, use_bf16: bool) -> tuple[float, int]:
    """Forward/backward over this rank's micro-batches of one step (distributed.wrap's model); the loss is
    normalised by the global step's target count, all-reduced over the ranks, so every rank ends with the
    gradient one process computes from the whole step. Returns (the step's mean loss, its tokens), both global."""
    targets = distributed.all_reduce_sum(sum(b.targets for b in batches))
    scale = distributed.gradient_scale(max(targets, 1))
    total = 0.0
    for batch in batches:
        loss_sum = _loss_sum(wrapped, batch, device, use_bf16)
        (loss_sum * scale).backward()
        total += loss_sum.item()
    return distributed.all_reduce_sum(total) / max(targets, 1), distributed.all_reduce_sum(sum(b.tokens for b in batches))


@torch.no_grad()
def eval_loss(wrapped: Any, batches: list[MicroBatch], device: torch.device, use_bf16: bool) -> float:
    """Mean next-token loss over every target of the held-out batches (each rank's share, summed over ranks)."""
    model = distributed.unwrap(wrapped)
    was_training = model.training
    model.eval()
    total = sum(_loss_sum(wrapped, batch, device, use_bf16).item() for batch in batches)
    model.train(was_training)
    return distributed.all_reduce_sum(total) / max(distributed.all_reduce_sum(sum(b.targets for b in batches)), 1)


def _loss_sum(wrapped: Any, batch: MicroBatch, device: torch.device, use_bf16: bool) -> torch.Tensor:
    """Summed target loss of one micro-batch on `device`, under bf16 autocast when asked, run through the wrapper
    (distributed.Runner: DDP's and FSDP2's hooks surround the whole loss computation)."""
    tensors = {k: v.to(device) for k, v in batch.tensors.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return wrapped(target_loss_sum, tensors)


def generation_eval(model: Any, tokenizer: Any, examples: list[Example], evaluation: EvaluationConfig) -> dict[str, Any]:
    """Greedy replies to the held-out chats, scored against their final assistant turn (evaluate_set's result).
    Under several processes each rank answers its share (distributed.share) with its full copy of the model and
    the counts are summed; the samples shown are rank 0's first three."""
    examples = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    examples = examples[: evaluation.limit] if evaluation.limit else examples
    share = distributed.share(examples, distributed.rank(), distributed.world_size())
    result = evaluate_set(model, tokenizer, share, evaluation.metric, max_new_tokens=evaluation.max_new_tokens,
                          batch_size=evaluation.batch_size, progress=distributed.is_main())
    if distributed.world_size() > 1:
        correct = distributed.all_reduce_sum(result["correct"])
        total = distributed.all_reduce_sum(result["total"])
        result.update(correct=correct, total=total, accuracy=correct / total, stderr=binomial_stderr(correct, total))
    return result


def _print_data_summary(name: str, dataset: Dataset) -> None:
    s = dataset.stats
    note = f", {s.truncated} truncated to max_seq_len" if s.truncated else ""
    dropped = f", {s.dropped} dropped (no target left)" if s.dropped else ""
    distributed.print_main(f"{name}: {len(dataset.examples)} examples -> {len(dataset.rows)} rows, {s.total_tokens} tokens "
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


__all__ = ["RunResult", "TrainingDiverged", "eval_loss", "forgetting_enabled", "generation_eval", "score_eval_sets",
           "train", "train_step"]
