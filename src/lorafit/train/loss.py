"""Next-token log-probabilities and loss computed only where there is a target, never with full-vocabulary logits.

The stock loss projects every position to the 49k-word vocabulary and keeps those logits for the backward pass
(192 MB per copy for 4 x 256 tokens, three copies alive in its backward). Here the backbone's hidden states are
gathered at target positions only (assistant-only loss: most positions have none), and the frozen output head's
log-softmax is done in chunks of `device.head_chunk_rows` rows, each chunk's gradient formed in the forward pass:
memory is one fp32 chunk of logits (64 MB) plus an (N, hidden) gradient. SFT's loss and the DPO/GRPO log-probs
both go through `head_token_logprobs`. A trained head (or soft-capped logits) takes the stock path instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data.chat import IGNORE
from lorafit.device import head_chunk_rows
from lorafit.models.frozen_16bit import compute_dtype, matmul_weight, matmul_weight_t


class _HeadTokenLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ / T)[y] per row; d/dh is formed chunk by chunk in forward, so backward is one product.

    d logp_i / d h_i = (W[y_i] - Σ_j p_ij W[j]) / T = -((p_i - onehot(y_i)) W) / T: one (N, H) tensor, and the
    gradient of any loss of the log-probs is it times the upstream (N,) gradient, row by row.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, dtype: torch.dtype, want_grad: bool):
        rows = head_chunk_rows(weight.shape[0])
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        direction = torch.empty_like(hidden) if want_grad else None  # d logprobs / d hidden: (N, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                stop = min(start + rows, hidden.shape[0])
                y = targets[start:stop, None]  # (n, 1)
                # (n, V): the one chunk buffer; a 16-bit head (QLoRA, models.frozen_16bit) upcast a slice at a time
                logits = matmul_weight_t(hidden[start:stop], weight, dtype).float()
                if temperature != 1.0:
                    logits.div_(temperature)
                logits.sub_(logits.amax(dim=1, keepdim=True))  # shifted so that exp cannot overflow
                picked = logits.gather(1, y)  # (n, 1)
                total = logits.exp_().sum(dim=1, keepdim=True)  # (n, 1); logits now hold exp(shifted)
                logprobs[start:stop] = (picked - total.log()).squeeze(1)
                if want_grad:
                    probs = logits.div_(total)  # softmax, in place
                    probs.scatter_add_(1, y, probs.new_full(y.shape, -1.0))  # p - onehot(y)
                    grad = matmul_weight(probs, weight, dtype)  # (n, H)
                    direction[start:stop] = grad.to(direction.dtype).mul_(-1.0 / temperature)
                    del probs
                del logits  # before the next chunk's logits exist: one chunk alive at a time
        ctx.save_for_backward(direction)
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs):
        (direction,) = ctx.saved_tensors
        return direction * grad_logprobs[:, None].to(direction.dtype), None, None, None, None, None


def head_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[targets] per row, (N,) fp32, for a frozen head weight (V, H).

    The matmuls run in the autocast dtype when autocast is on (as a Linear head would), else in hidden's dtype;
    the softmax is always fp32.
    """
    if weight.requires_grad:
        raise ValueError("head_token_logprobs needs a frozen output head; a trained head takes the stock loss "
                         "(has_plain_head is False for it).")
    # forward runs with grad mode off, where needs_input_grad still says True: decide here, so that evaluation and
    # reference log-probs under no_grad skip the gradient's matmul and its (N, H) tensor
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadTokenLogprobs.apply(hidden, weight, targets, float(temperature), compute_dtype(hidden), want_grad)


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
        return -head_token_logprobs(hidden[where], model.get_output_embeddings().weight, targets[where]).sum()
    logits = model(**inputs, use_cache=False).logits  # (B, L, V)
    return F.cross_entropy(logits[where].float(), targets[where], reduction="sum")


def completion_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                        use_bf16: bool = False) -> torch.Tensor:
    """log softmax(logits / temperature) of each target token, (K,) in the row-major order of targets != -100."""
    where = batch["targets"] != IGNORE  # (n, L)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    device = batch["input_ids"].device
    tokens = batch["targets"][where]  # (K,)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        if has_plain_head(model):  # the head only where a completion token is predicted, one chunk at a time
            hidden = model.base_model(**inputs).last_hidden_state[where]  # (K, H)
            return head_token_logprobs(hidden, model.get_output_embeddings().weight, tokens, temperature)
        logits = model(**inputs).logits[where]  # (K, V)
    logits = logits.float() / temperature
    return logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
