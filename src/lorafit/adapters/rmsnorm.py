"""Llama's RMSNorm as one autograd function that keeps its output instead of its input.

Stock autograd keeps the norm's fp32 input (tokens x hidden) and 1/rms; the adapted q/k/v (or gate/up) layers that
read the norm's output keep that output as well, so each norm costs two (tokens x hidden) tensors. Here the norm
keeps its output y = w ⊙ x̂ (the very tensor those layers keep: counted once) and 1/rms, and the backward pass
recovers x̂ = y / w, the one thing it needs besides 1/rms:
    dx = (1/rms) · (g - x̂ · mean(g ⊙ x̂)),   g = dy ⊙ w   (fp32, as the stock norm computes).
The forward runs the stock ops in the stock order (outputs bit for bit equal). Division by w needs every weight
entry away from zero (|w| >= MIN_WEIGHT); a norm with a smaller entry, or a trained weight, uses the stock
forward. In fp32 the recovered x̂ is within 2 ulp of the stock one; in a 16-bit model it carries the output's
rounding, of the order of the 16-bit rounding the stock backward applies to dy ⊙ w.
"""

from __future__ import annotations

import torch
from torch import nn

# transformers' RMSNorm classes whose forward is exactly Llama's (x.float() * rsqrt(mean(x²) + eps), then w * that)
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MIN_WEIGHT = 1e-20  # y / w is exact to rounding for |w| above this, far from fp32/bf16 underflow
CHECKED_ATTR = "lorafit_rms_weight_checked"  # (weight version, storage) for which the weight was found usable


class _RMSNorm(torch.autograd.Function):
    """y = w ⊙ (x · rsqrt(mean(x²) + eps)) computed as LlamaRMSNorm does; keeps y and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        input_dtype = x.dtype
        wide = x.to(torch.float32)
        inv_rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = weight * (wide * inv_rms).to(input_dtype)
        ctx.save_for_backward(y, inv_rms, weight)
        ctx.input_dtype = input_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, inv_rms, weight = ctx.saved_tensors
        w = weight.to(torch.float32)
        normed = y.to(torch.float32) / w  # x̂, recovered
        g = grad_y.to(torch.float32) * w
        dot = (g * normed).mean(-1, keepdim=True)  # (..., 1)
        grad_x = g.sub_(normed.mul_(dot)).mul_(inv_rms)
        return grad_x.to(ctx.input_dtype), None, None


def weight_allows_recovery(norm: nn.Module) -> bool:
    """A frozen weight with every |entry| >= MIN_WEIGHT; checked again only when the weight changes."""
    weight = norm.weight
    if weight.requires_grad:
        return False
    key = (weight._version, weight.data_ptr())
    checked = getattr(norm, CHECKED_ATTR, None)
    if checked is None or checked[0] != key:
        checked = (key, bool(weight.abs().min() >= MIN_WEIGHT))
        setattr(norm, CHECKED_ATTR, checked)
    return checked[1]


def fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The norm's forward through _RMSNorm, or the class's own when its weight does not allow it."""
    if not weight_allows_recovery(self):
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def is_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm computing exactly LlamaRMSNorm's forward (RMS_NORM_CLASSES)."""
    return type(module).__name__ in RMS_NORM_CLASSES
