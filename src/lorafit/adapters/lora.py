"""LoraLinear: a frozen base layer plus s·B(A(dropout(x))), with merge / unmerge.

y = base(x) + s · dropout(x) Aᵀ Bᵀ,   A: (r, in),  B: (out, r),  s = alpha/r (or alpha/sqrt(r)).

The adapter branch is one autograd function (`lora_branch`) rather than three modules: it keeps
no dropped-out copy of the input (it saves x, which the caller holds anyway, and a 1-byte mask),
and it fuses the scale and the residual add into one addmm. That is where PEFT spends the time
and memory that separates it from a plain frozen forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.adapters.branch import (
    adapter_backward,
    adapter_forward,
    dense_weight,
    layer_shape,
    masked_input_grad,
)
from lorafit.adapters.dora import dora_branch, dora_row_norms
from lorafit.lowrank import add_low_rank, update_dtype


class _LoraBranch(torch.autograd.Function):
    """base_out + scaling · (dropout_p(x) Aᵀ) Bᵀ, computed in base_out's dtype; grads for x, A, B."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, dropout_p: float):
        out_features, in_features = base_out.shape[-1], x.shape[-1]
        dtype = base_out.dtype  # bf16 under autocast, else the model's dtype
        with torch.autocast(base_out.device.type, enabled=False):
            h, keep, inv = adapter_forward(x.reshape(-1, in_features).to(dtype), lora_a, dropout_p)  # (T, r)
            out = torch.addmm(base_out.reshape(-1, out_features), h, lora_b.to(dtype).t(), alpha=scaling)  # (T, out)
        ctx.save_for_backward(x, keep, h, lora_a, lora_b)
        ctx.scaling, ctx.inv = scaling, inv
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, h, lora_a, lora_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)  # (T, out)
        grad_x, grad_a, grad_b = adapter_backward(g, x, keep, ctx.inv, h, lora_a, lora_b, ctx.scaling,
                                                  need_x=ctx.needs_input_grad[1], need_a=ctx.needs_input_grad[2])
        return grad_out, masked_input_grad(grad_x, keep, x), grad_a, grad_b, None, None


def lora_branch(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """base_out + scaling · dropout(x) Aᵀ Bᵀ (dropout with rate dropout_p, inverted scaling)."""
    return _LoraBranch.apply(base_out, x, lora_a, lora_b, scaling, dropout_p)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 on a 16-bit base (as PEFT does); fp64 stays fp64 for reference tests."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


class LoraLinear(nn.Module):
    """Wraps one linear layer (kept as `base_layer`, frozen) with trainable `lora_A` and `lora_B`.

    With use_dora it also holds `lora_magnitude_vector` m (out,), initialised to ||W0 + s·B A||_row so that the
    wrapped layer starts equal to the base. Parameter names match PEFT's saved keys: `<name>.lora_A.weight`,
    `<name>.lora_B.weight`, `<name>.lora_magnitude_vector`, `<name>.base_layer.weight`.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, scaling: float, dropout: float,
                 use_dora: bool = False, dora_dropout_lowrank_only: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = layer_shape(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        dtype = adapter_dtype(weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_magnitude_vector = (
            nn.Parameter(torch.ones(self.out_features, device=weight.device, dtype=dtype)) if use_dora else None
        )
        self.r, self.alpha, self.scaling, self.dropout, self.use_dora = r, alpha, scaling, dropout, use_dora
        self.dora_dropout_lowrank_only = dora_dropout_lowrank_only  # see AdapterConfig
        self.merged = False  # the base weight holds merged_weight(): the adapter is folded in
        self.disabled = False  # the adapter is switched off (adapters_disabled): the base layer alone computes
        self._merge_factor: torch.Tensor | None = None  # DoRA's m / norm at merge time, to unmerge exactly
        self.train(base_layer.training)  # a model attached in eval mode must not start dropping out
        self.reset_parameters("default")

    def reset_parameters(self, init: str) -> None:
        """B = 0 so the wrapped model starts equal to the base; A per `init` (PEFT's two standard choices)."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, mean=0.0, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """DoRA: m <- ||W0 + s·B A||_row, so the layer's output equals W0 x + s·B A x (the base when B = 0)."""
        if self.use_dora:
            with torch.no_grad():
                norms = dora_row_norms(self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)
                self.lora_magnitude_vector.copy_(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.merged or self.disabled:  # the base layer computes the whole output
            return out
        p = self.dropout if self.training else 0.0
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.use_dora:
            return dora_branch(out, x, a, b, self.lora_magnitude_vector, self.base_layer, self.scaling, p,
                               self.dora_dropout_lowrank_only)
        return lora_branch(out, x, a, b, self.scaling, p)

    def merged_weight(self) -> torch.Tensor:
        """The weight that computes this layer alone, (out, in), fp32 or wider: W0 + s·B A, or with DoRA
        (m / ||W0 + s·B A||_row) ⊙ (W0 + s·B A). For a merged layer this is the base weight as it stands."""
        if self.merged:
            return dense_weight(self.base_layer).to(update_dtype(self.lora_A.weight))
        return self._merge_parts()[0]

    def _merge_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(merged weight, DoRA factor m / norm or None) computed from the unmerged base."""
        weight = add_low_rank(dense_weight(self.base_layer), self.lora_A.weight, self.lora_B.weight, self.scaling)
        if not self.use_dora:
            return weight, None
        factor = self.lora_magnitude_vector.detach().to(weight.dtype) / torch.linalg.vector_norm(weight, dim=1)
        return weight * factor[:, None], factor

    def merge(self) -> None:
        """Fold the adapter into the base weight (W0 <- merged_weight())."""
        if self.merged:
            return
        with torch.no_grad():
            weight, self._merge_factor = self._merge_parts()  # DoRA's factor is kept to invert the merge exactly
            self.write_base(weight)
        self.merged = True

    def unmerge(self) -> None:
        """Restore W0 from the merged weight: W' - s·B A, or W' / (m / norm) - s·B A with DoRA."""
        if not self.merged:
            return
        with torch.no_grad():
            weight = dense_weight(self.base_layer).to(update_dtype(self.lora_A.weight))
            if self.use_dora:
                weight = weight / self._merge_factor[:, None]
                self._merge_factor = None
            self.write_base(add_low_rank(weight, self.lora_A.weight, self.lora_B.weight, -self.scaling))
        self.merged = False

    def write_base(self, weight: torch.Tensor) -> None:
        """Store an (out, in) weight into the base layer in its own layout and dtype (under no_grad)."""
        target = self.base_layer.weight
        if not target.is_floating_point():
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__} base layer in place; "
                            "use merge_and_unload(), which dequantises it.")
        target.copy_((weight.t() if self.fan_in_fan_out else weight).to(target.device, target.dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}{dora}, merged={self.merged}"
