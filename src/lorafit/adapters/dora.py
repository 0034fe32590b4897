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

from lorafit.adapters.dropped_entries import dropped_input_grad, dropped_product, sparse_dropout_pays
from lorafit.adapters.branch import (
    adapter_backward,
    adapter_dropout,
    dense_weight,
    low_rank_input,
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

    Speed: every (tokens x out) tensor is one pass and, where autograd allows, one buffer reused: the bias terms of
    the gradients come from one column sum of the upstream gradient, the magnitude gradient's product is written
    into the buffer that then holds the returned gradient, and with PEFT's dropout f is folded into B (out x r)
    instead of scaling the upstream gradient, and 1/keep-rate into addmm's beta.
    """

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, magnitude, norm, bias, base_layer, scaling: float, dropout_p: float,
                lowrank_only: bool):
        out_features, in_features = base_out.shape[-1], x.shape[-1]
        dtype = base_out.dtype
        with torch.autocast(base_out.device.type, enabled=False):
            x2 = x.reshape(-1, in_features).to(dtype)  # (T, in)
            keep, dropped, inv = adapter_dropout(x2, dropout_p)  # dropped = x2 ⊙ keep (not yet scaled)
            h = low_rank_input(dropped, lora_a, inv)  # (T, r)
            factor = (magnitude / norm).to(dtype)  # (out,)
            base2 = base_out.reshape(-1, out_features)  # (T, out)
            dropped_z = keep is not None and not lowrank_only  # PEFT's formula with dropout: z = W0 dropout(x)
            sparse = dropped_z and sparse_dropout_pays(x2.device, dtype, dropout_p)
            if not dropped_z:
                z = base2 - bias.to(dtype) if bias is not None else base2
                out = torch.addmm(z, h, lora_b.to(dtype).t(), alpha=scaling).mul_(factor)  # f ⊙ (W0 + s·B A) x
                if bias is not None:
                    out = out.add_(bias.to(dtype))
                saved = out  # the output itself: (out - bias) / m = combined / norm for the magnitude gradient
            elif sparse:  # W0 (x ⊙ keep) = W0 x - W0 (x ⊙ drop): the base output and a product over the dropped entries
                z = dropped_product(x2, keep, dense_weight(base_layer))
                z = torch.sub(base2, z, out=z) if bias is None else z.neg_().add_(base2).sub_(bias.to(dtype))
            else:
                z = dropped @ dense_weight(base_layer).to(dtype).t()  # (T, out): W0 (x ⊙ keep), unscaled
            if dropped_z:
                saved = torch.addmm(z, h, lora_b.to(dtype).t(), beta=inv, alpha=scaling)  # (W0 + s·B A) dropout(x)
                out = torch.sub(base2, z, alpha=inv, out=z).addcmul_(saved, factor)  # base - W0 dropout(x) + f ⊙ ...
        ctx.save_for_backward(x, keep, h, lora_a, lora_b, magnitude, norm, bias, saved)
        ctx.base_layer, ctx.scaling, ctx.inv, ctx.dropped_z, ctx.sparse = base_layer, scaling, inv, dropped_z, sparse
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, h, lora_a, lora_b, magnitude, norm, bias, saved = ctx.saved_tensors
        dtype = h.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (T, out)
        factor = (magnitude / norm).to(dtype)
        need_m, need_x, need_a = ctx.needs_input_grad[4], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_bias = bias is not None and ctx.needs_input_grad[6]
        column_sum = g.sum(dim=0) if (bias is not None and (need_m or need_bias)) else None  # Σ_t g, (out,)
        grad_bias = grad_m = None
        product = torch.mul(g, saved) if need_m else None  # (T, out), its buffer reused below
        if not ctx.dropped_z:
            if need_m:  # Σ_t g ⊙ (y - bias) / m
                summed = product.sum(dim=0)
                if bias is not None:
                    summed = summed.sub_(column_sum * bias.to(dtype))
                grad_m = (summed / magnitude.to(dtype)).to(magnitude.dtype)
            if need_bias:
                grad_bias = (column_sum * (1 - factor)).to(bias.dtype)  # the explicit bias term of y = bias + f ⊙ (...)
            gf = torch.mul(g, factor, out=product) if product is not None else g * factor  # reaches (W0 + s·B A) x
            grad_x, grad_a, grad_b = adapter_backward(gf, x, keep, ctx.inv, h, lora_a, lora_b, ctx.scaling,
                                                      need_x=need_x, need_a=need_a)
            grad_x = masked_input_grad(grad_x, keep, x)
            grad_base = gf.view(grad_out.shape)  # y depends on base_out only through f ⊙ (base_out - bias)
        else:
            if need_m:
                grad_m = (product.sum(dim=0) / norm.to(dtype)).to(magnitude.dtype)
            # the adapter sees g ⊙ f: f is folded into B for h's gradient and applied to B's (out x r) gradient
            scaled_b = lora_b.to(dtype) * factor[:, None]
            grad_x, grad_a, grad_b = adapter_backward(g, x, keep, ctx.inv, h, lora_a, scaled_b, ctx.scaling,
                                                      need_x=need_x, need_a=need_a)
            grad_b = grad_b.mul_(factor[:, None]).to(lora_b.dtype)
            grad_base, dropped_grad = grad_out, None
            need_z = need_x or (ctx.sparse and (need_bias or ctx.needs_input_grad[0]))
            if need_z:  # G, the gradient of z = W0 (x ⊙ keep), which enters y with weight (f - 1) / keep rate
                weight_z = (factor - 1) * ctx.inv
                scaled_g = torch.mul(g, weight_z, out=product) if product is not None else g * weight_z
            if ctx.sparse and need_z:
                # z = base_out - bias - W0 (x ⊙ drop): G joins the base output's gradient (the base layer's one
                # matmul carries it to x) and x loses drop ⊙ (G W0), a product at the dropped entries only
                if need_x:
                    dropped_grad = dropped_input_grad(scaled_g, keep, dense_weight(ctx.base_layer))
                if need_bias:  # the explicit -bias of z cancels what G sends to the bias through base_out
                    grad_bias = scaled_g.sum(dim=0).neg_().to(bias.dtype)
                grad_base = scaled_g.add_(g).view(grad_out.shape)
            elif need_x:
                grad_z = scaled_g @ dense_weight(ctx.base_layer).to(dtype)  # (T, in)
                grad_x = grad_z if grad_x is None else grad_x.add_(grad_z)
            grad_x = masked_input_grad(grad_x, keep, x)
            if dropped_grad is not None:
                dropped_grad = dropped_grad.view(x.shape).to(x.dtype)
                grad_x = dropped_grad.neg_() if grad_x is None else grad_x.sub_(dropped_grad)
        return grad_base, grad_x, grad_a, grad_b, grad_m, None, grad_bias, None, None, None, None


def dora_branch(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                magnitude: torch.Tensor, base_layer: nn.Module, scaling: float, dropout_p: float = 0.0,
                lowrank_only: bool = False) -> torch.Tensor:
    """The DoRA layer output from the base layer's output `base_out` = base_layer(x) (bias included); with
    `lowrank_only`, dropout on the low-rank path only (AdapterConfig.dora_dropout_lowrank_only)."""
    norm = dora_row_norms(base_layer, lora_a, lora_b, scaling)
    bias = getattr(base_layer, "bias", None)
    return _DoraBranch.apply(base_out, x, lora_a, lora_b, magnitude, norm, bias, base_layer, scaling, dropout_p,
                             lowrank_only)
