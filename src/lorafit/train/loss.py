"""Next-token loss computed only where there is a target, without materialising full-vocabulary logits.

The stock loss projects every position to the 49k-word vocabulary and keeps those logits for the
backward pass (192 MB per copy for 4 x 256 tokens). Here the backbone's hidden states are gathered
at target positions only, and the frozen output head's cross-entropy is done in chunks whose
gradient is formed in the forward pass: memory is one chunk of logits plus an (N, hidden) gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data.chat import IGNORE
from lorafit.device import CHUNK_ROWS
from lorafit.models.frozen_16bit import compute_dtype, matmul_weight, matmul_weight_t


class _HeadCrossEntropy(torch.autograd.Function):
    """Sum of CE(h W^T, y) over rows; the gradient w.r.t. h is computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype: torch.dtype):
        total = hidden.new_zeros((), dtype=torch.float32)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None  # (N, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], CHUNK_ROWS):
                h = hidden[start:start + CHUNK_ROWS]  # (n, H)
                y = targets[start:start + CHUNK_ROWS]  # (n,)
                logits = matmul_weight_t(h, weight, compute_dtype).float()  # (n, V); a 16-bit head upcast by slices
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not want_grad:
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax in place: (n, V)
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                grad[start:start + CHUNK_ROWS] = matmul_weight(probs, weight, compute_dtype).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits = hidden @ weight.T against targets; weight must be frozen."""
    if weight.requires_grad:
        raise ValueError("head_cross_entropy needs a frozen output head; train it through the stock loss instead.")
    return _HeadCrossEntropy.apply(hidden, weight, targets, compute_dtype(hidden))


def has_plain_head(model: nn.Module) -> bool:
    """True when logits are just lm_head(hidden) (no soft-capping or logit scaling), so the fast path is exact."""
    head = model.get_output_embeddings()
    config = model.config
    return (
        isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad
        and getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    )


def target_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (already shifted; -100 = no target)."""
    targets = batch["targets"]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    where = targets != IGNORE  # (B, L)
    if has_plain_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
        return head_cross_entropy(hidden[where], model.get_output_embeddings().weight, targets[where])
    logits = model(**inputs, use_cache=False).logits  # (B, L, V)
    return F.cross_entropy(logits[where].float(), targets[where], reduction="sum")


def completion_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                        use_bf16: bool = False) -> torch.Tensor:
    """log softmax(logits / temperature) of each target token, (K,) in the row-major order of targets != -100."""
    where = batch["targets"] != IGNORE  # (n, L)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        if has_plain_head(model):  # the head only where a completion token is predicted
            hidden = model.base_model(**inputs).last_hidden_state[where]  # (K, H)
            logits = model.get_output_embeddings()(hidden)  # (K, V)
        else:
            logits = model(**inputs).logits[where]  # (K, V)
    logits = logits.float() / temperature
    tokens = batch["targets"][where]  # (K,)
    return logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
