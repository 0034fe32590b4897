"""DPO and IPO on preference pairs: sequence log-probs, the loss, the reference log-probs and one micro-batch.

The formulas follow TRL's DPOTrainer (FACTS_NEXT.md §b1): a reply's log-probability is the sum of its completion
tokens' log-probs (the prompt excluded); with the log-ratios c = logp_policy(chosen) - logp_ref(chosen) and
r = logp_policy(rejected) - logp_ref(rejected),
  sigmoid (DPO, conservative with label smoothing eps, as TRL's cDPO and torchtune's DPOLoss):
      loss = -(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))
  ipo (IPO, with TRL's length normalisation: each log-ratio divided by its reply's token count n):
      loss = (c / n_c - r / n_r - 1 / (2 beta))^2
The logged rewards are beta c and beta r (TRL's rewards/chosen, rewards/rejected), summed over tokens for both.
A step's loss is the mean over the step's pairs: each micro-batch back-propagates sum(losses) / pairs_in_step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafit import distributed
from lorafit.data.preferences import PreferencePair, collate_pairs, split_pairs
from lorafit.run_config import DPOConfig
from lorafit.train.loss import IGNORE, completion_logprobs
from lorafit.train.reference import StartWeights, reference_policy

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor],
                   use_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's completion tokens (2B,), completion token count of each row (2B,)).

    The output head runs at completion positions only (loss.completion_logprobs), never on prompt tokens.
    """
    where = batch["targets"] != IGNORE  # (2B, L)
    counts = where.sum(dim=1)  # (2B,)
    token_logps = completion_logprobs(model, batch, 1.0, use_bf16)  # (K,) row-major over `where`
    rows = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)  # (K,) row of each token
    return token_logps.new_zeros(len(counts)).index_add(0, rows, token_logps), counts


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of each pair (B,) and the per-pair values TRL logs (each (B,), detached; the step logs their means).

    Inputs are summed sequence log-probs (B,); ipo also needs the token counts of the replies.
    """
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' averages the log-ratios over tokens: pass chosen_tokens and "
                             "rejected_tokens.")
        delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: use 'sigmoid' or 'ipo'.")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
    return losses, metrics


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], reference: StartWeights | None,
                    use_bf16: bool = False) -> torch.Tensor:
    """Summed completion log-probs (2B,) under the reference policy (train/reference.py), computed without dropout.

    `reference` is reference_start's result: None = the adapter switched off, else the starting weights.
    """
    with reference_policy(model, reference), _evaluating(model):
        return sequence_logps(model, batch, use_bf16)[0]


def precompute_reference(model: nn.Module, pairs: list[PreferencePair], reference: StartWeights | None,
                         pad_token_id: int, batch_size: int, use_bf16: bool = False) -> list[PreferencePair]:
    """The pairs with their reference log-probs filled in, computed once in batches of `batch_size` pairs.

    Under several processes each rank computes its share (lorafit.distributed.share) and the values are gathered,
    so every rank returns every pair's; `model` is the unwrapped model, whole on each rank (call it before
    distributed.wrap: no collective runs inside the forwards).
    """
    device = next(model.parameters()).device
    mine = distributed.share(pairs, distributed.rank(), distributed.world_size())
    values = []
    for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", unit="batch",
                      disable=len(mine) <= batch_size or distributed.progress_disabled()):
        batch = {k: v.to(device) for k, v in collate_pairs(mine[start : start + batch_size], pad_token_id).items()}
        values.append(torch.stack(split_pairs(reference_logps(model, batch, reference, use_bf16).cpu()), dim=1))
    local = torch.cat(values) if values else torch.zeros(0, 2)
    chosen, rejected = distributed.gather_shares(local, len(pairs)).unbind(dim=1)
    return [replace(p, ref_chosen_logp=c, ref_rejected_logp=r)
            for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())]


def pair_losses(model: nn.Module, batch: dict[str, torch.Tensor], reference: StartWeights | None, d: DPOConfig,
                use_bf16: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """dpo_loss of a collate_pairs batch on the device: the policy forward (with grad) and the reference
    (precomputed in the batch's `reference_logps`, else one no-grad forward under the reference policy)."""
    refs = batch.get("reference_logps")
    if refs is None:
        refs = reference_logps(model, batch, reference, use_bf16)
    logps, counts = sequence_logps(model, batch, use_bf16)
    (policy_c, policy_r), (ref_c, ref_r), (n_c, n_r) = split_pairs(logps), split_pairs(refs), split_pairs(counts)
    return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=d.beta, loss_type=d.loss,
                    label_smoothing=d.label_smoothing, chosen_tokens=n_c, rejected_tokens=n_r)


def backward_micro_batch(wrapped: nn.Module, batch: dict[str, torch.Tensor], reference: StartWeights | None,
                         d: DPOConfig, scale: float, use_bf16: bool = False, real: bool = True) -> dict[str, float]:
    """Forward (through distributed.wrap's module: DDP's and FSDP2's hooks surround the policy and reference
    passes) and backward of one micro-batch of the step, its summed pair loss multiplied by `scale`
    (distributed.gradient_scale of the step's pair count: 1 / pairs in one process, so the step's loss is the
    mean over its pairs however they are split); returns the sums over its pairs of loss and METRICS. A filler
    (real False: rank_chunks) back-propagates zeros, so that its rank still enters the gradient reduction, and
    returns zeros."""
    losses, metrics = wrapped(pair_losses, batch, reference, d, use_bf16)
    weight = 1.0 if real else 0.0
    (losses.sum() * (scale * weight)).backward()
    return {"loss": weight * losses.sum().item(), **{k: weight * v.sum().item() for k, v in metrics.items()}}


@torch.no_grad()
def evaluate_pairs(wrapped: nn.Module, pairs: list[PreferencePair], reference: StartWeights | None, d: DPOConfig,
                   pad_token_id: int, batch_size: int, use_bf16: bool = False) -> dict[str, float]:
    """Held-out means over `pairs` (no dropout): loss and METRICS; rewards/accuracies is the preference accuracy
    (the policy's implicit reward ranks chosen above rejected), with its standard error. Under several processes
    each rank evaluates its share (rank_chunks) and the sums are added over ranks; every rank must call it."""
    model = distributed.unwrap(wrapped)
    device = next(model.parameters()).device
    ctx = distributed.context()
    sums = torch.zeros(1 + len(METRICS), dtype=torch.float64)
    with _evaluating(model):
        for group, real in distributed.rank_chunks(pairs, batch_size, rank=ctx.rank, world_size=ctx.world_size):
            batch = {k: v.to(device) for k, v in collate_pairs(group, pad_token_id).items()}
            losses, metrics = wrapped(pair_losses, batch, reference, d, use_bf16)
            if real:
                sums += torch.tensor([values.sum().item() for values in (losses, *(metrics[k] for k in METRICS))],
                                     dtype=torch.float64)
    totals = distributed.all_reduce_sum(sums).tolist()
    means = {key: value / len(pairs) for key, value in zip(("loss", *METRICS), totals)}
    accuracy = means["rewards/accuracies"]
    means["rewards/accuracies_stderr"] = (accuracy * (1 - accuracy) / max(len(pairs) - 1, 1)) ** 0.5
    return means


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Dropout off within the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


__all__ = ["METRICS", "backward_micro_batch", "dpo_loss", "evaluate_pairs", "pair_losses", "precompute_reference",
           "reference_logps", "sequence_logps"]
