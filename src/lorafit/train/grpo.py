"""GRPO, top to bottom: sample a group of completions per prompt, score them with reward functions, and move
the adapter toward the completions that beat their group's mean.

One step of `train`:
  the step's prompts -> num_generations completions each (KV-cached, batched, temperature / top-p sampling)
  -> rewards r = sum_k w_k r_k -> advantages A = (r - group mean) / (group std + 1e-4)
  -> reference log-probs: the adapter switched off (the base model: no second copy of the weights), or,
     when training goes on from a saved adapter (init_adapter) or trains biases, the starting weights swapped in
  -> per-token loss -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta KL_k3, averaged over the step's
     completion tokens -> num_iterations optimiser steps on these samples.
Under torchrun (N processes) every rank takes the same step's prompts and works on its share of whole prompts
(distributed.rank_chunks: a group never leaves its rank, so its advantages are those of one process): it samples
their groups (with its own generator; under FSDP with the weights unsharded for the sampling, distributed.run_whole,
which costs the whole model's weights on each rank while it samples), scores them, runs the reference and update
passes through the wrapped model, and normalises the loss by the step's completion tokens over all ranks; the
logged reward figures are gathered from every rank. Given the same completions, N processes take the steps of one.
The formulas follow TRL's GRPOTrainer (FACTS.md §7): Bessel-corrected group std, log-probs of
logits / temperature, ratio to the policy that sampled (logp_old), k3 estimator exp(d) - d - 1 with
d = logp_ref - logp, and token-level averaging over the whole step (TRL's "bnpo" aggregation).

Memory / speed levers and their cost:
- sampling is batched over all completions of the step and KV-cached; still 44% of a CPU step in the
  arithmetic example (reference forward 17%, forward + backward 39%).
- the output head runs at completion positions only: no full-vocabulary logits for prompt tokens; free.
- grpo.beta = 0 skips the reference forward (one no-grad forward per step) but lets the policy drift freely.
- training.micro_batch_size prompts (x num_generations completions) per forward bound activation memory.
- gradient checkpointing and bf16 autocast behave as in SFT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit import distributed
from lorafit.adapters.model import adapters_disabled
from lorafit.data import DataError, read_examples
from lorafit.data.chat import build_prompt_ids
from lorafit.evaluation.generate import generate_ids
from lorafit.evaluation.metrics import mean_and_stderr
from lorafit.run_config import GRPOConfig, RunConfig
from lorafit.train import loop
from lorafit.train.batches import step_rows, steps_per_epoch
from lorafit.train.loop import RunResult
from lorafit.train.loss import IGNORE, completion_logprobs
from lorafit.train.reference import reference_policy, reference_start
from lorafit.train.rewards import (
    RewardFunction,
    load_rewards,
    row_fields,
    score,
    weighted_total,
)

STD_EPS = 1e-4  # TRL's constant: a group with equal rewards gets advantage 0, not 0/0
STEP_PHASES = ("generation_s", "rewards_s", "reference_s", "update_s")  # each step's timed parts, logged per row


@dataclass(frozen=True)
class Prompt:
    """One prompt: token ids up to the generation prompt, the user message the rewards see, the row's other fields."""

    source: str
    ids: list[int]
    text: str
    fields: dict[str, Any]


@dataclass
class Samples:
    """Completions of a group of prompts (each prompt repeated num_generations times, consecutively)."""

    prompts: list[Prompt]
    completion_ids: list[list[int]]
    completions: list[str]
    scores: dict[str, list[float]]  # reward function name -> one reward per completion
    rewards: torch.Tensor  # (N,) weighted total


def train(config: RunConfig, *, resume: bool = False, trust_checkpoint: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run GRPO as `config` says; the adapter lands in OUTPUT/adapter (PEFT format)."""
    functions = load_rewards(config.rewards, config.grpo.reward_timeout_s)  # a missing file or function fails now,
    # before any weight loads; each call runs under grpo.reward_timeout_s
    state = loop.begin_run(config, resume, trust_checkpoint, overwrite=overwrite)
    result, t, g = state.result, config.training, config.grpo
    loop.load_base_model(state)
    model, tokenizer = state.model, state.tokenizer
    max_prompt = config.data.max_seq_len - g.max_new_tokens
    train_prompts = read_prompts(config.data.train, tokenizer, max_prompt)
    eval_prompts = read_prompts(config.data.eval, tokenizer, max_prompt) if config.data.eval else []
    eval_prompts = eval_prompts[: config.evaluation.limit] if config.evaluation.limit else eval_prompts
    distributed.print_main(f"train: {len(train_prompts)} prompts x {g.num_generations} completions; "
                           f"eval: {len(eval_prompts)} prompts")
    loop.attach_adapter(model, config, state.tokenizer)
    # The reference policy is where training starts: the base (adapter off) for a fresh adapter, else a copy of
    # the trainable weights (a saved adapter, or trained biases, which switching the adapter off would not undo).
    # LoftQ starts at Q + s·B0 A0 (B0 != 0): switching its adapter off would give the bare 4-bit Q instead.
    start = reference_start(model, config)
    use_bf16 = loop.use_bf16(t, model.device)

    evaluate = config.evaluation.generation and bool(eval_prompts)
    if evaluate and not resume:
        with state.timed("eval_before"):
            if config.init_adapter:
                with adapters_disabled(model):
                    result.eval_base = reward_eval(model, tokenizer, eval_prompts, functions, config)
            result.eval_before = reward_eval(model, tokenizer, eval_prompts, functions, config)
        distributed.print_main(f"held-out reward before training: {_describe(result.eval_before)}")

    per_epoch = steps_per_epoch(len(train_prompts), t.batch_size)
    loop.start_training(state, total_steps=t.max_steps or max(1, math.ceil(t.epochs * per_epoch)),
                        updates_per_step=g.num_iterations)
    progress, wrapped, ctx = state.trainer, state.wrapped, distributed.context()
    if start is not None:  # the starting weights, sharded like the parameters they are swapped into
        start = distributed.shard_like(start, wrapped)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with state.timed("train"), tqdm(total=state.total_steps, initial=progress.step, desc="grpo", unit="step",
                                    dynamic_ncols=True, disable=distributed.progress_disabled()) as bar:
        while progress.step < state.total_steps:
            step_start = time.perf_counter()
            prompts = step_prompts(train_prompts, progress.step, t.batch_size, t.seed)  # the same on every rank
            # this rank's whole prompts (a group is never split across ranks), micro_batch_size prompts a pass
            chunks = distributed.rank_chunks(prompts, t.micro_batch_size or t.batch_size, rank=ctx.rank,
                                             world_size=ctx.world_size)
            samples = distributed.run_whole(wrapped, sample, state, [p for chunk, _ in chunks for p in chunk],
                                            functions)
            advantages = group_advantages(samples.rewards, g.num_generations, g.scale_rewards)
            bounds = [0]
            for chunk, _ in chunks:
                bounds.append(bounds[-1] + len(chunk) * g.num_generations)
            batches = [sequence_batch(samples, advantages, a, b, pad, model.device) for a, b in pairwise(bounds)]
            weights = [1.0 if real else 0.0 for _, real in chunks]
            with state.timed("reference"):
                refs = [wrapped(reference_logprobs, b, g.temperature, use_bf16, start) if g.beta else None
                        for b in batches]
            with state.timed("update"):
                olds: list[torch.Tensor | None] = [None] * len(batches)
                updates = []
                for _ in range(g.num_iterations):
                    stats = update_step(wrapped, batches, olds, refs, g, use_bf16, weights)
                    loop.check_finite(stats["loss"], progress.step + 1)
                    stats["grad_norm"], stats["lr"] = state.opt.step(t.max_grad_norm)
                    updates.append(stats)
            times = {k: state.last_s[k] for k in STEP_PHASES}
            times["step_s"] = time.perf_counter() - step_start
            progress.step += 1
            real = bounds[sum(1 for _, is_real in chunks if is_real)]  # this rank's real completions come first
            progress.tokens_seen += distributed.all_reduce_sum(
                sum(len(p.ids) for p in samples.prompts[:real]) + sum(map(len, samples.completion_ids[:real])))

            row = {"step": progress.step, "epoch": round(progress.step / per_epoch, 4), "lr": updates[0]["lr"],
                   **{k: sum(u[k] for u in updates) / len(updates) for k in updates[0] if k != "lr"},
                   **reward_metrics(gather_samples(samples, real, len(prompts), g.num_generations, functions),
                                    functions, g.num_generations),
                   **{k: round(v, 3) for k, v in times.items()}}
            if evaluate and config.evaluation.every and (progress.step % config.evaluation.every == 0
                                                         or progress.step == state.total_steps):
                row["eval_reward"] = distributed.run_whole(wrapped, reward_eval, tokenizer, eval_prompts, functions,
                                                           config)["reward_mean"]
            loop.end_step(state, row, force_log="eval_reward" in row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", gen_s=f"{times['generation_s']:.1f}",
                            train_s=f"{times['reference_s'] + times['update_s']:.1f}", refresh=False)
            bar.update(1)
            result.final_loss = row["loss"]
    distributed.print_main(_time_split({k: result.phases.get(k, 0.0) for k in STEP_PHASES}, result.phases["train_s"]))

    loop.save_final_adapter(state)
    if evaluate:
        with state.timed("eval_after"):
            result.eval_after = distributed.run_whole(wrapped, reward_eval, tokenizer, eval_prompts, functions, config)
        distributed.print_main(_side_by_side(result))
    return loop.finish(state)


def read_prompts(path: str, tokenizer: Any, max_tokens: int) -> list[Prompt]:
    """Chat rows (a final assistant turn, if any, is dropped) as prompts no longer than `max_tokens` tokens."""
    prompts = []
    for example in read_examples(path, require_reply=False):
        if example.messages is None:
            raise DataError(f"{example.source}: GRPO needs chat rows {{\"messages\": [..., {{\"role\": \"user\", ...}}]}} "
                            "plus any fields the reward functions read, not plain 'text'.")
        messages = example.messages[:-1] if example.messages[-1]["role"] == "assistant" else example.messages
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise DataError(f"{example.source}: the chat has no user message to answer; add one.")
        ids = build_prompt_ids(tokenizer, messages)
        if len(ids) > max_tokens:
            raise DataError(f"{example.source}: the prompt has {len(ids)} tokens, more than data.max_seq_len - "
                            f"grpo.max_new_tokens = {max_tokens}; shorten it or raise data.max_seq_len.")
        prompts.append(Prompt(source=example.source, ids=ids, text=users[-1], fields=example.fields))
    return prompts


def step_prompts(prompts: list[Prompt], step: int, batch_size: int, seed: int) -> list[Prompt]:
    """The prompts of step `step`, chosen by the same rule as SFT's rows (batches.step_rows)."""
    return step_rows(prompts, step, batch_size=batch_size, seed=seed)


def sample(model: Any, state: loop.RunState, prompts: list[Prompt], functions: list[RewardFunction]) -> Samples:
    """num_generations sampled completions per prompt of the run's model, scored; timed as generation and rewards.

    One process draws from the global torch generator (a seeded run repeats). Under several processes each rank
    samples its own prompts from a generator seeded by (training.seed, step, rank) (the RNG state in a checkpoint
    is rank 0's, so per-rank streams could not be resumed otherwise, and equal streams would correlate the ranks'
    samples); `prompts` are this rank's.
    """
    g, tokenizer = state.config.grpo, state.tokenizer
    repeated = [p for p in prompts for _ in range(g.num_generations)]
    with state.timed("generation"), _rank_generator(state):
        completion_ids = generate_ids(model, tokenizer, [p.ids for p in repeated],
                                      max_new_tokens=g.max_new_tokens, batch_size=len(repeated),
                                      temperature=g.temperature, top_p=g.top_p)
    with state.timed("rewards"):
        return score_samples(repeated, completion_ids, tokenizer, functions)


@contextmanager
def _rank_generator(state: loop.RunState) -> Iterator[None]:
    """Under several processes: the global generators seeded by (seed, step, rank) within the block, restored after."""
    ctx = distributed.context()
    if ctx.world_size == 1:
        yield
        return
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = (state.config.training.seed * 2**32 + state.trainer.step) * 2**20 + ctx.rank  # distinct per (step, rank)
        torch.manual_seed(seed % 2**63)
        yield


def score_samples(repeated: list[Prompt], completion_ids: list[list[int]], tokenizer: Any,
                  functions: list[RewardFunction]) -> Samples:
    """Decode the completions (one per entry of `repeated`) and score them with the reward functions (not called
    for no completions: a rank whose share is empty)."""
    if not repeated:
        return Samples([], [], [], {f.name: [] for f in functions}, torch.zeros(0))
    completions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
    fields = row_fields([p.fields for p in repeated], [p.source for p in repeated])
    scores = score(functions, [p.text for p in repeated], completions, fields)
    rewards = torch.tensor(weighted_total(functions, scores), dtype=torch.float32)
    return Samples(repeated, completion_ids, completions, scores, rewards)


@dataclass
class SampleFigures:
    """What the metrics row reads of a step's completions: weighted rewards, each function's scores, lengths."""

    rewards: torch.Tensor  # (N,) float64
    scores: dict[str, list[float]]
    lengths: list[int]


def gather_samples(samples: Samples, real: int, prompts: int, group_size: int,
                   functions: list[RewardFunction]) -> SampleFigures:
    """The figures of the completions of the step's `prompts` prompts from every rank (this rank's are its first
    `real` samples), in the order one process samples them (lorafit.distributed.share is by prompt, and a prompt's
    completions are consecutive). A collective; in one process the samples' own figures (in float64)."""
    rewards = weighted_total(functions, {name: values[:real] for name, values in samples.scores.items()})
    columns = [torch.tensor(rewards, dtype=torch.float64),
               *(torch.tensor(samples.scores[f.name][:real], dtype=torch.float64) for f in functions),
               torch.tensor([len(ids) for ids in samples.completion_ids[:real]], dtype=torch.float64)]
    mine = torch.stack(columns, dim=1).view(real // group_size, group_size, len(columns))
    every = distributed.gather_shares(mine, prompts).view(prompts * group_size, len(columns))
    return SampleFigures(rewards=every[:, 0], lengths=[int(n) for n in every[:, -1].tolist()],
                         scores={f.name: every[:, 1 + i].tolist() for i, f in enumerate(functions)})


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4); groups are consecutive blocks; std is Bessel-corrected."""
    groups = rewards.view(-1, group_size)  # (prompts, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def sequence_batch(samples: Samples, advantages: torch.Tensor, start: int, stop: int, pad: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Completions start..stop as right-padded prompt+completion rows; targets mark the completion tokens.

    targets[b, t] is the token at t+1 when that is a completion token, else -100; `advantages` holds one
    value per target token, in the row-major order of `targets != -100`.
    """
    rows = [samples.prompts[i].ids + samples.completion_ids[i] for i in range(start, stop)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (n, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (n, L)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (n, L)
    per_token = []
    for b, (i, row) in enumerate(zip(range(start, stop), rows)):
        prompt_len, length = len(samples.prompts[i].ids), len(row)
        input_ids[b, :length] = torch.tensor(row)
        mask[b, :length] = 1
        targets[b, prompt_len - 1:length - 1] = torch.tensor(samples.completion_ids[i])
        per_token.append(advantages[i].expand(length - prompt_len))
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "targets": targets.to(device),
            "advantages": torch.cat(per_token).to(device)}


@torch.no_grad()
def reference_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float, use_bf16: bool = False,
                       start: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Target-token log-probs under the reference policy: the policy that training started from.

    A fresh adapter (B = 0, or PiSSA, whose layers add the initial factors back when switched off) starts as the
    base model, so the reference is the model with its adapter switched off
    (no copy of any weight). A run from a saved adapter passes that adapter's starting weights (`start`,
    from start_weights) and they are swapped in for this pass, as TRL does with its frozen "ref" adapter:
    measured against the base, the KL term would pull the policy back out of what the saved adapter taught.
    """
    with reference_policy(model, start):
        return completion_logprobs(model, batch, temperature, use_bf16)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, *, epsilon: float, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token GRPO loss, the k3 KL (None without a reference) and which tokens the clip holds back; all (K,).

    loss = -min(r A, clip(r, 1-eps, 1+eps) A) + beta (exp(d) - d - 1),  r = exp(logp - old_logp),  d = ref - logp.
    """
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def update_step(wrapped: Any, batches: list[dict[str, torch.Tensor]], olds: list[torch.Tensor | None],
                refs: list[torch.Tensor | None], g: GRPOConfig, use_bf16: bool,
                weights: list[float] | None = None) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches through distributed.wrap's module; the loss is averaged over
    all completion tokens of the step on every rank (all-reduced; gradient_scale), so N processes take the update
    of one. `weights` 0 marks filler micro-batches (distributed.rank_chunks): they back-propagate zeros and count
    nothing. Returns the step's loss, kl and clip_fraction per completion token, over all ranks.

    The first pass records each micro-batch's log-probs as logp_old (the sampling policy: no step taken yet),
    in `olds`, for the later passes of num_iterations.
    """
    weights = weights if weights is not None else [1.0] * len(batches)
    n_tokens = distributed.all_reduce_sum(sum(len(b["advantages"]) for b, w in zip(batches, weights) if w))
    scale = distributed.gradient_scale(n_tokens)
    totals = torch.zeros(3, dtype=torch.float64)  # loss, kl, clipped tokens
    for i, (batch, weight) in enumerate(zip(batches, weights)):
        logp = wrapped(completion_logprobs, batch, g.temperature, use_bf16)
        if olds[i] is None:
            olds[i] = logp.detach()
        loss, kl, clipped = grpo_token_loss(logp, olds[i], refs[i], batch["advantages"], epsilon=g.epsilon,
                                            beta=g.beta)
        (loss.sum() * (scale * weight)).backward()
        totals += weight * torch.tensor([loss.sum().item(), kl.sum().item() if kl is not None else 0.0,
                                         clipped.sum().item()], dtype=torch.float64)
    loss, kl, clipped = (distributed.all_reduce_sum(totals) / n_tokens).tolist()
    stats = {"loss": loss, "kl": kl, "clip_fraction": clipped}
    if refs[0] is None:
        del stats["kl"]
    return stats


def reward_metrics(figures: SampleFigures, functions: list[RewardFunction], group_size: int) -> dict[str, float]:
    """The step's reward columns for metrics.jsonl: per function, total, mean group std, lengths."""
    groups = figures.rewards.view(-1, group_size)
    std = groups.std(dim=1)
    count = len(figures.lengths)
    metrics = {f"reward/{f.name}": sum(figures.scores[f.name]) / count for f in functions}
    metrics.update({
        "reward_mean": figures.rewards.mean().item(),
        "reward_std": std.mean().item(),  # within-group spread: 0 means no learning signal
        "frac_reward_zero_std": (std == 0).double().mean().item(),
        "completion_length": sum(figures.lengths) / count,
    })
    return metrics


def reward_eval(model: Any, tokenizer: Any, prompts: list[Prompt], functions: list[RewardFunction],
                config: RunConfig) -> dict[str, Any]:
    """Greedy completions of the held-out prompts: mean total reward and per function, each with its standard error.
    Under several processes each rank answers its share (distributed.share) with the whole model (in
    distributed.run_whole under FSDP) and the figures are gathered; the samples shown are rank 0's first three.
    Every rank must call it."""
    mine = distributed.share(prompts, distributed.rank(), distributed.world_size())
    completion_ids = generate_ids(model, tokenizer, [p.ids for p in mine],
                                  max_new_tokens=config.evaluation.max_new_tokens, batch_size=config.evaluation.batch_size)
    samples = score_samples(mine, completion_ids, tokenizer, functions)
    figures = gather_samples(samples, len(mine), len(prompts), 1, functions)
    total = figures.rewards.tolist()
    result = {"total": len(prompts), **_mean_and_stderr("reward", total),
              "completion_length": sum(figures.lengths) / len(prompts)}
    for f in functions:
        result.update(_mean_and_stderr(f"reward/{f.name}", figures.scores[f.name]))
    mine_total = weighted_total(functions, samples.scores)
    result["samples"] = [{"prompt": p.text, "completion": c, "reward": r}
                         for p, c, r in zip(mine[:3], samples.completions[:3], mine_total[:3])]
    return result


def _mean_and_stderr(name: str, values: list[float]) -> dict[str, float]:
    mean, stderr = mean_and_stderr(values)
    return {f"{name}_mean": mean, f"{name}_stderr": stderr}


def _describe(evaluation: dict[str, Any]) -> str:
    return (f"mean reward {evaluation['reward_mean']:.3f} ± {evaluation['reward_stderr']:.3f} "
            f"over {evaluation['total']} prompts (greedy)")


def _time_split(timing: dict[str, float], train_s: float) -> str:
    parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s ({v / max(train_s, 1e-9):.0%})" for k, v in timing.items())
    return f"training took {train_s:.1f}s: {parts}"


def _side_by_side(result: RunResult) -> str:
    columns = [("base model", result.eval_base), ("start", result.eval_before), ("after GRPO", result.eval_after)]
    columns = [(name, e) for name, e in columns if e is not None]
    keys = ["reward"] + sorted(k.removesuffix("_mean") for k in result.eval_after if k.startswith("reward/")
                               and k.endswith("_mean"))
    lines = [f"{'held-out (greedy)':<28}" + "".join(f"{name:>18}" for name, _ in columns)]
    for key in keys:
        cells = "".join(f"{e[key + '_mean']:>10.3f} ± {e[key + '_stderr']:<5.3f}" for _, e in columns)
        lines.append(f"{key:<28}{cells}")
    for s in result.eval_after["samples"]:
        lines.append(f"  {s['prompt']!r} -> {s['completion']!r} (reward {s['reward']:g})")
    return "\n".join(lines)


__all__ = ["Prompt", "Samples", "completion_logprobs", "group_advantages", "grpo_token_loss", "read_prompts",
           "reference_logprobs", "reward_eval", "sequence_batch", "train", "update_step"]
