"""DoRA: y = m ⊙ (W0 + s·B A) x / ||W0 + s·B A||_row + bias, the row norm detached (DoRA paper §4.3, as PEFT).

Two memory levers over PEFT's formulation:
- the row norms come from ||W0 row||², W0 Aᵀ (out, r) and B (A Aᵀ) Bᵀ: an r-row product instead of an
  (out, in) copy of W0 + s·B A per layer (`row_norms_factored`; `row_norms_direct` is the plain formula);
- the branch is one autograd function. Without dropout it saves the layer's output y (which the next op often
  keeps anyway) and recovers what the magnitude gradient needs as (y - bias) / m, instead of keeping the
  base output, the scaled output and the adapter output as separate tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.adapters.branch import (
    adapter_backward,
    adapter_forward,
    dense_weight,
    masked_input_grad,
)
from lorafit.lowrank import add_low_rank, update_dtype


def row_norms_direct(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W0 + s·B A|| per output row, by forming the (out, in) matrix; fp32 (or wider) result of shape (out,)."""
    return torch.linalg.vector_norm(add_low_rank(weight, lora_a, lora_b, scaling), dim=1)


def row_norms_factored(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same norms from ||w_o||² + 2s·b_o·(W0 Aᵀ)_o + s²·b_o (A Aᵀ) b_oᵀ, without an (out, in) temporary."""
    dtype = update_dtype(lora_a)
    w = weight.to(dtype)  # a view when the weight is fp32 already
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    squares = torch.linalg.vector_norm(w, dim=1).square_()  # (out,)
    cross = ((a @ w.t()).t() * b).sum(dim=1)  # (out, r) -> (out,)
    quadratic = ((b @ (a @ a.t())) * b).sum(dim=1)  # (out,)
    return (squares + (2 * scaling) * cross + (scaling * scaling) * quadratic).clamp_min_(0).sqrt_()


def dora_row_norms(base_layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The detached row norms DoRA divides by (no gradient flows through them, as in the paper and PEFT)."""
    with torch.no_grad():
        return row_norms_factored(dense_weight(base_layer), lora_a, lora_b, scaling)


class _DoraBranch(torch.autograd.Function):
    """y = base_out - z + f ⊙ (z + s·h Bᵀ), f = m / norm, h = dropout(x) Aᵀ, z = W0 dropout(x).

    Without dropout z = base_out - bias, so y = bias + f ⊙ (W0 x + s·B A x). With dropout the base output keeps
    the undropped input and only the DoRA correction sees the dropped one (PEFT's and NVlabs' forward). With
    `lowrank_only`, dropout reaches only h and z = base_out - bias as without dropout:
    y = bias + f ⊙ (W0 x + s·B A dropout(x)), which needs no W0·dropout(x) matmul (LoRA's cost).
    """

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, magnitude, norm, bias, base_layer, scaling: float, dropout_p: float,
                lowrank_only: bool):
        out_features, in_features = base_out.shape[-1], x.shape[-1]
        dtype = base_out.dtype
        with torch.autocast(base_out.device.type, enabled=False):
            x2 = x.reshape(-1, in_features).to(dtype)  # (T, in)
            h, keep, inv = adapter_forward(x2, lora_a, dropout_p)  # (T, r)
            factor = (magnitude / norm).to(dtype)  # (out,)
            base2 = base_out.reshape(-1, out_features)  # (T, out)
            dropped_z = keep is not None and not lowrank_only  # PEFT's formula with dropout: z = W0 dropout(x)
            if not dropped_z:
                z = base2 - bias.to(dtype) if bias is not None else base2
            else:
                z = ((x2 * keep) @ dense_weight(base_layer).to(dtype).t()).mul_(inv)  # (T, out): W0 dropout(x)
            combined = torch.addmm(z, h, lora_b.to(dtype).t(), alpha=scaling)  # (T, out): (W0 + s·B A) x
            if not dropped_z:
                out = combined.mul_(factor)
                if bias is not None:
                    out = out.add_(bias.to(dtype))
                saved = out  # the output itself: (out - bias) / m = combined / norm for the magnitude gradient
            else:
                out = torch.addcmul(base2 - z, combined, factor)
                saved = combined
        ctx.save_for_backward(x, keep, h, lora_a, lora_b, magnitude, norm, bias, saved)
        ctx.base_layer, ctx.scaling, ctx.inv, ctx.dropped_z = base_layer, scaling, inv, dropped_z
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, h, lora_a, lora_b, magnitude, norm, bias, saved = ctx.saved_tensors
        dtype = h.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (T, out)
        factor = (magnitude / norm).to(dtype)
        gf = g * factor  # gradient reaching (W0 + s·B A) dropout(x)
        grad_x, grad_a, grad_b = adapter_backward(gf, x, keep, ctx.inv, h, lora_a, lora_b, ctx.scaling,
                                                  need_x=ctx.needs_input_grad[1], need_a=ctx.needs_input_grad[2])
        grad_base = grad_bias = grad_m = None
        if not ctx.dropped_z:
            grad_base = gf.view(grad_out.shape)  # y depends on base_out only through f ⊙ (base_out - bias)
            if ctx.needs_input_grad[4]:
                shifted = saved - bias.to(dtype) if bias is not None else saved
                grad_m = ((g * shifted).sum(dim=0) / magnitude.to(dtype)).to(magnitude.dtype)
            if bias is not None and ctx.needs_input_grad[6]:
                grad_bias = (g - gf).sum(dim=0).to(bias.dtype)  # the explicit bias term of y = bias + f ⊙ (...)
        else:
            grad_base = grad_out
            if ctx.needs_input_grad[4]:
                grad_m = ((g * saved).sum(dim=0) / norm.to(dtype)).to(magnitude.dtype)
            if ctx.needs_input_grad[1]:  # z = W0 dropout(x) enters y with weight (f - 1)
                grad_z = (gf - g).mul_(ctx.inv) @ dense_weight(ctx.base_layer).to(dtype)  # (T, in)
                grad_x = grad_z if grad_x is None else grad_x.add_(grad_z)
        return (grad_base, masked_input_grad(grad_x, keep, x), grad_a, grad_b, grad_m, None, grad_bias,
                None, None, None, None)


def dora_branch(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                magnitude: torch.Tensor, base_layer: nn.Module, scaling: float, dropout_p: float = 0.0,
                lowrank_only: bool = False) -> torch.Tensor:
    """The DoRA layer output from the base layer's output `base_out` = base_layer(x) (bias included); with
    `lowrank_only`, dropout on the low-rank path only (AdapterConfig.dora_dropout_lowrank_only)."""
    norm = dora_row_norms(base_layer, lora_a, lora_b, scaling)
    bias = getattr(base_layer, "bias", None)
    return _DoraBranch.apply(base_out, x, lora_a, lora_b, magnitude, norm, bias, base_layer, scaling, dropout_p,
                             lowrank_only)
