"""DPO (and IPO), top to bottom: read preference pairs, attach the adapter, fix the reference policy, then move the
adapter so that its implicit reward ranks each chosen reply above its rejected one.

One step of `train`:
  the step's pairs (batches.step_rows: the same deterministic, resumable order as SFT's rows)
  -> per micro-batch of micro_batch_size pairs: chosen + rejected rows in one forward (data/preferences.py),
     summed completion log-probs under the policy and under the reference (train/dpo_loss.py)
  -> loss of each pair (sigmoid or ipo), back-propagated as sum / pairs in the step: the step's loss is the mean
     over its pairs however they are split (gradient accumulation normalised per pair)
  -> one optimiser step; the row logs loss and TRL's rewards/* and logps/* means.
The reference is the policy at step 0 (train/reference.py): the adapter switched off for a fresh B = 0 or PiSSA
adapter, else the starting trainable weights, copied once right after the adapter is attached and before any
checkpoint is loaded. Every start is rebuilt exactly on resume (B = 0, the seeded init, the PiSSA / LoftQ
decomposition of the base, or the init_adapter folder), so a resumed run keeps the same reference.

Held-out evaluation: preference accuracy (share of pairs whose implicit reward ranks chosen above rejected, TRL's
rewards/accuracies, with its standard error) and loss before training, every evaluation.every steps and at the
end; and, with evaluation.measure, greedy replies to the held-out prompts scored by that function before and after.
With evaluation.early_stopping the held-out loss decides when to stop and the adapter kept is its best (as in SFT).

Memory / speed levers and their cost:
- dpo.precompute_reference: the reference log-probs of every training pair once before training, instead of one
  no-grad forward per micro-batch (~1/3 of a step); pays off after about one epoch. The held-out pairs' reference
  log-probs are always computed once (the same numbers each evaluation would recompute).
- training.micro_batch_size pairs (2x sequences) per forward bound activation memory; the loss does not change.
- the output head runs at completion positions only (train/loss.py); gradient checkpointing and bf16 as in SFT.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit import distributed
from lorafit.data.preferences import PreferencePair, collate_pairs, read_preferences
from lorafit.evaluation.generate import generate_ids
from lorafit.evaluation.metrics import mean_and_stderr
from lorafit.run_config import RewardSpec, RunConfig
from lorafit.train import loop
from lorafit.train.batches import step_rows, steps_per_epoch
from lorafit.train.dpo_loss import (
    METRICS,
    backward_micro_batch,
    evaluate_pairs,
    precompute_reference,
)
from lorafit.train.loop import RunResult
from lorafit.train.reference import StartWeights, reference_start
from lorafit.train.rewards import RewardFunction, load_rewards, score


def train(config: RunConfig, *, resume: bool = False, trust_checkpoint: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run DPO as `config` says; the adapter lands in OUTPUT/adapter (PEFT format)."""
    measure = load_measure(config.evaluation.measure)  # a missing file or function fails before any weight loads
    state = loop.begin_run(config, resume, trust_checkpoint, overwrite=overwrite)
    result, t, d = state.result, config.training, config.dpo
    loop.load_base_model(state)
    tokenizer = state.tokenizer
    with state.timed("prepare_data"):
        train_pairs = read_pairs("train", config.data.train, tokenizer, config.data.max_seq_len)
        eval_pairs = read_pairs("eval", config.data.eval, tokenizer, config.data.max_seq_len) if config.data.eval else []
    loop.attach_adapter(state.model, config, state.tokenizer)
    model = state.model
    reference = reference_start(model, config)  # before start_training loads a checkpoint: the step-0 policy
    use_bf16 = loop.use_bf16(t, model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    micro = t.micro_batch_size or t.batch_size
    with state.timed("reference"):
        if d.precompute_reference:
            train_pairs = precompute_reference(model, train_pairs, reference, pad, micro, use_bf16)
        eval_pairs = precompute_reference(model, eval_pairs, reference, pad, config.evaluation.batch_size, use_bf16)
    generation_pairs = eval_pairs[: config.evaluation.limit] if config.evaluation.limit else eval_pairs
    generate = measure is not None and config.evaluation.generation and bool(generation_pairs)

    def held_out() -> dict[str, Any]:  # through the wrapped model once training has wrapped it
        runner = state.wrapped if state.wrapped is not None else distributed.Runner(model)
        return evaluate_pairs(runner, eval_pairs, reference, d, pad, config.evaluation.batch_size, use_bf16)

    if eval_pairs and not resume:
        with state.timed("eval_before"):
            result.eval_before = evaluation_summary(held_out(), len(eval_pairs))
            if generate:
                result.eval_before.update(behaviour_eval(model, tokenizer, generation_pairs, measure, config))
        distributed.print_main(f"before training: {_describe(result.eval_before)}")

    per_epoch = steps_per_epoch(len(train_pairs), t.batch_size)
    loop.start_training(state, total_steps=t.max_steps or max(1, math.ceil(t.epochs * per_epoch)))
    if reference is not None:  # the starting weights, sharded like the parameters they are swapped into
        reference = distributed.shard_like(reference, state.wrapped)
    progress = state.trainer
    final_eval = None
    stopped = loop.early_stopped(state)
    with state.timed("train"), tqdm(total=state.total_steps, initial=progress.step, desc="dpo", unit="step",
                                    dynamic_ncols=True, disable=distributed.progress_disabled()) as bar:
        while progress.step < state.total_steps and not stopped:
            step_start = time.perf_counter()
            pairs = step_rows(train_pairs, progress.step, batch_size=t.batch_size, seed=t.seed)
            sums = train_step(state.wrapped, pairs, micro, reference, config, pad, use_bf16)
            loss = sums["loss"] / len(pairs)
            loop.check_finite(loss, progress.step + 1)
            grad_norm, lr = state.opt.step(t.max_grad_norm)
            progress.step += 1
            tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
            progress.tokens_seen += tokens
            row = {"step": progress.step, "epoch": round(progress.step / per_epoch, 4), "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, **{k: sums[k] / len(pairs) for k in METRICS},
                   "tokens_per_s": round(tokens / (time.perf_counter() - step_start), 1),
                   "tokens_seen": progress.tokens_seen}
            if eval_pairs and config.evaluation.every and (progress.step % config.evaluation.every == 0
                                                           or progress.step == state.total_steps):
                final_eval = held_out()
                row["eval_loss"] = final_eval["loss"]
                row["eval_rewards/accuracies"] = final_eval["rewards/accuracies"]
                row["eval_rewards/margins"] = final_eval["rewards/margins"]
                if config.evaluation.early_stopping:
                    stopped = loop.early_stopping_decides(state, final_eval["loss"])
            loop.end_step(state, row, force_log="eval_loss" in row)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                            margin=f"{row['rewards/margins']:.3f}", refresh=False)
            bar.update(1)
            result.final_loss = loss

    restored = loop.restore_best_adapter(state)
    loop.save_final_adapter(state)
    if eval_pairs:
        with state.timed("eval_after"):
            last = final_eval is not None and progress.step == state.total_steps and not restored
            done = final_eval if last else held_out()  # the final step's evaluation is the saved adapter's
            result.eval_after = evaluation_summary(done, len(eval_pairs))
            if generate:
                result.eval_after.update(distributed.run_whole(state.wrapped, behaviour_eval, tokenizer,
                                                               generation_pairs, measure, config))
        distributed.print_main(_side_by_side(result.eval_before, result.eval_after))
    return loop.finish(state)


def read_pairs(name: str, path: str, tokenizer: Any, max_seq_len: int) -> list[PreferencePair]:
    """The tokenized pairs of one file, with a one-line summary printed."""
    pairs, stats = read_preferences(path, tokenizer, max_seq_len)
    distributed.print_main(f"{name}: {stats}")
    return pairs


def train_step(wrapped: Any, pairs: list[PreferencePair], micro: int, reference: StartWeights | None,
               config: RunConfig, pad: int, use_bf16: bool) -> dict[str, float]:
    """Forward/backward of one step's pairs (the same list on every rank) through distributed.wrap's module: this
    rank's share in micro-batches of `micro` pairs (distributed.rank_chunks), each pair's loss scaled by
    gradient_scale(pairs in the step), so every rank ends with the gradient of the mean loss over the step's pairs;
    returns the sums over all ranks' pairs of the loss and METRICS."""
    ctx = distributed.context()
    scale = distributed.gradient_scale(len(pairs))
    device = next(distributed.unwrap(wrapped).parameters()).device
    sums = torch.zeros(1 + len(METRICS), dtype=torch.float64)
    for group, real in distributed.rank_chunks(pairs, micro, rank=ctx.rank, world_size=ctx.world_size):
        batch = {k: v.to(device) for k, v in collate_pairs(group, pad).items()}
        done = backward_micro_batch(wrapped, batch, reference, config.dpo, scale, use_bf16, real)
        sums += torch.tensor([done[k] for k in ("loss", *METRICS)], dtype=torch.float64)
    return dict(zip(("loss", *METRICS), distributed.all_reduce_sum(sums).tolist()))


def load_measure(spec: str | None) -> RewardFunction | None:
    """The behaviour measure `file.py:function` (called like a reward function: one number per reply), or None."""
    return load_rewards([RewardSpec(function=spec)])[0] if spec else None


def evaluation_summary(metrics: dict[str, float], pairs: int) -> dict[str, Any]:
    """evaluate_pairs' means as the run's evaluation: preference accuracy as correct / total / accuracy (the keys
    every report reads), its standard error, the held-out DPO loss and mean rewards/* and logps/*."""
    accuracy = metrics["rewards/accuracies"]
    return {"metric": "preference", "correct": round(accuracy * pairs), "total": pairs, "accuracy": accuracy,
            "accuracy_stderr": metrics["rewards/accuracies_stderr"], "loss": metrics["loss"],
            **{k: metrics[k] for k in METRICS if k != "rewards/accuracies"}}


def behaviour_eval(model: Any, tokenizer: Any, pairs: list[PreferencePair], measure: RewardFunction,
                   config: RunConfig) -> dict[str, Any]:
    """Greedy replies to the pairs' prompts scored by `measure`: {"measure": {name, mean, stderr, total}, "samples"}.
    Under several processes each rank answers its share (distributed.share) with its whole copy of the model
    and the scores are gathered; the samples shown are rank 0's first three. Every rank must call it."""
    mine = distributed.share(pairs, distributed.rank(), distributed.world_size())
    completion_ids = generate_ids(model, tokenizer, [p.prompt_ids for p in mine],
                                  max_new_tokens=config.evaluation.max_new_tokens,
                                  batch_size=config.evaluation.batch_size, progress=distributed.is_main())
    replies = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
    prompts = [p.prompt_text for p in mine]
    scores = torch.tensor(score([measure], prompts, replies, {})[measure.name], dtype=torch.float64)
    values = distributed.gather_shares(scores, len(pairs)).tolist()
    mean, stderr = mean_and_stderr(values)
    return {"measure": {"name": measure.name, "mean": mean, "stderr": stderr, "total": len(values)},
            "samples": [{"prompt": p, "reply": r} for p, r in zip(prompts[:3], replies[:3])]}


def _describe(evaluation: dict[str, Any]) -> str:
    text = (f"held-out preference accuracy {evaluation['accuracy']:.1%} ± {evaluation['accuracy_stderr']:.1%} "
            f"over {evaluation['total']} pairs, loss {evaluation['loss']:.4f}")
    m = evaluation.get("measure")
    if m:
        text += f"; {m['name']} {m['mean']:.3f} ± {m['stderr']:.3f} over {m['total']} greedy replies"
    return text


def _side_by_side(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    columns = [("before", before), ("after DPO", after)]
    columns = [(name, e) for name, e in columns if e is not None]
    lines = [f"{'held-out':<30}" + "".join(f"{name:>20}" for name, _ in columns)]
    lines.append(f"{'preference accuracy':<30}" + "".join(
        f"{e['accuracy']:>12.1%} ± {e['accuracy_stderr']:<5.1%}" for _, e in columns))
    lines.append(f"{'loss':<30}" + "".join(f"{e['loss']:>20.4f}" for _, e in columns))
    if all(e.get("measure") for _, e in columns):
        name = after["measure"]["name"]
        lines.append(f"{name + ' (greedy)':<30}" + "".join(
            f"{e['measure']['mean']:>12.3f} ± {e['measure']['stderr']:<5.3f}" for _, e in columns))
    for sample in after.get("samples", []):
        lines.append(f"  {sample['prompt']!r} -> {sample['reply']!r}")
    return "\n".join(lines)


__all__ = ["behaviour_eval", "evaluation_summary", "load_measure", "read_pairs", "train", "train_step"]
