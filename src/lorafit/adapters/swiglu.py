"""A gated MLP's tail as one autograd function: down(silu(gate) ⊙ up), down being a frozen linear or a LoRA layer.

Stock autograd keeps three (tokens x intermediate) tensors per MLP for this tail: silu's input (gate), the product's
two factors (silu(gate) and up), and the LoRA down_proj keeps its input p = silu(gate) ⊙ up as well. Here the
backward pass recomputes silu(gate) and p from gate and up (two pointwise passes), so the tail keeps gate and up
only: half the MLP's activations. When neither gate nor up needs a gradient it keeps p alone (what the LoRA
down_proj needs for A's gradient).

adapters/fused.py installs the fused forward on every Llama-style MLP of a model when lorafit attaches adapters. The forward computes exactly what the stock module does (same ops, same dtypes,
autocast as it stands for the base layer, as `lora_branch` for the adapter); a down_proj the fused path does not
cover (DoRA, a trained bias, a base other than nn.Linear or lorafit's Linear4bit, e.g. bitsandbytes') falls back to
the stock forward at call time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorafit.adapters.branch import (
    adapter_backward,
    adapter_forward,
    dense_weight,
    masked_input_grad,
)
from lorafit.adapters.lora import LoraLinear
from lorafit.quant.linear4bit import Linear4bit

# transformers' MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU_CLASSES = frozenset({"SiLU", "SiLUActivation"})


class _SwiGLUDown(torch.autograd.Function):
    """base(p) + scaling · dropout(p) Aᵀ Bᵀ with p = silu(gate) ⊙ up; A, B None for a frozen down layer alone."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, base_layer, scaling: float, dropout_p: float):
        product = F.silu(gate) * up  # (..., inter): what the stock forward computes, in gate's dtype
        out = base_layer(product)  # under the caller's autocast, as the stock forward
        keep = h = None
        inv = 1.0
        if lora_a is not None:
            out_features, inter = out.shape[-1], product.shape[-1]
            with torch.autocast(out.device.type, enabled=False):  # as lora_branch: the adapter in the output's dtype
                h, keep, inv = adapter_forward(product.reshape(-1, inter).to(out.dtype), lora_a, dropout_p)
                out = torch.addmm(out.reshape(-1, out_features), h, lora_b.to(out.dtype).t(), alpha=scaling)
            out = out.view(*product.shape[:-1], out_features)
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_adapter = lora_a is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        if need_gate or (need_up and need_adapter):
            ctx.save_for_backward(gate, up, None, keep, h, lora_a, lora_b)  # p and silu(gate) recomputed
        elif need_up:
            ctx.save_for_backward(gate, None, None, keep, h, lora_a, lora_b)  # silu(gate) recomputed
        else:
            ctx.save_for_backward(None, None, product if need_adapter else None, keep, h, lora_a, lora_b)
        ctx.base_layer, ctx.scaling, ctx.inv = base_layer, scaling, inv
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, product, keep, h, lora_a, lora_b = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_inputs = need_gate or need_up
        silu = sigmoid = None
        if gate is not None:
            wide = torch.promote_types(gate.dtype, torch.float32)  # the pointwise derivative in fp32 at least
            sigmoid = torch.sigmoid(gate.to(wide))
            silu = gate.to(wide) * sigmoid
        dtype = h.dtype if h is not None else grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (T, out)
        grad_p = g @ dense_weight(ctx.base_layer).to(dtype) if need_inputs else None  # (T, inter)
        grad_a = grad_b = None
        if lora_a is not None:
            need_a = ctx.needs_input_grad[2]
            if need_a and product is None:
                product = F.silu(gate) * up  # p exactly as the forward computed it
            grad_x, grad_a, grad_b = adapter_backward(g, product, keep, ctx.inv, h, lora_a, lora_b, ctx.scaling,
                                                      need_x=need_inputs, need_a=need_a)
            if grad_x is not None:
                grad_p = grad_p.add_(masked_input_grad(grad_x, keep, grad_x))
        grad_gate = grad_up = None
        if need_inputs:
            grad_p = grad_p.view(*grad_out.shape[:-1], -1).to(silu.dtype)
            if need_up:
                grad_up = (grad_p * silu).to(up.dtype if up is not None else gate.dtype)
            if need_gate:  # d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
                dsilu = sigmoid.mul_(gate.to(sigmoid.dtype).mul(sigmoid.neg().add_(1)).add_(1))
                grad_gate = grad_p.mul_(up.to(grad_p.dtype)).mul_(dsilu).to(gate.dtype)
        return grad_gate, grad_up, grad_a, grad_b, None, None, None


def fused_down_arguments(down: nn.Module) -> tuple | None:
    """_SwiGLUDown's (lora_a, lora_b, base_layer, scaling, dropout_p) for `down`, or None when it is a layer the
    fused function does not cover (DoRA, a trained bias, a base other than nn.Linear or lorafit's Linear4bit)."""
    if isinstance(down, LoraLinear):
        if down.use_dora:
            return None
        base = down.base_layer
        active = not (down.merged or down.disabled)
    else:
        base, active = down, False
    if type(base) is not nn.Linear and not isinstance(base, Linear4bit):  # layers whose input gradient we can form
        return None
    if any(param.requires_grad for param in base.parameters()):  # a trained bias (or a fully trained layer)
        return None
    if not active:
        return None, None, base, 0.0, 0.0
    return down.lora_A.weight, down.lora_B.weight, base, down.scaling, down.dropout if down.training else 0.0


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Module) -> torch.Tensor:
    """down(silu(gate) ⊙ up) through the fused function; `down` must be covered (fused_down_arguments)."""
    arguments = fused_down_arguments(down)
    if arguments is None:
        raise ValueError(f"the fused MLP tail does not cover a {type(down).__name__} down layer: "
                         "check fused_down_arguments first")
    return _SwiGLUDown.apply(gate, up, *arguments)


def fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's forward with its tail fused; the class's own forward for a down_proj not covered (decided
    before anything runs, so that gate and up, and their dropout draws, happen once)."""
    arguments = fused_down_arguments(self.down_proj)
    if arguments is None:
        return type(self).forward(self, x)
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), *arguments)


def is_gated_mlp(module: nn.Module) -> bool:
    """A transformers MLP computing down_proj(silu(gate_proj(x)) * up_proj(x)) (GATED_MLP_CLASSES, SiLU act)."""
    act = getattr(module, "act_fn", None)
    return type(module).__name__ in GATED_MLP_CLASSES and type(act).__name__ in SILU_CLASSES
