"""LoftQ: start LoRA from factors that absorb the NF4 quantisation error, W ≈ Q + s·B A.

All in fp32 from BA = 0: for each iteration, Q = NF4(W - s·BA), then B, A = the rank-r SVD of W - Q
split symmetrically (lorafit.lowrank.principal_factors). `loftq_quantized` (what lorafit's
init='loftq' uses) quantises with the base's own settings and compensates the scale s = alpha/r;
`loftq_factors` is PEFT's loftq_init exactly (no double quantisation, scale not compensated: exact only
when alpha / r = 1, FACTS §5), kept as the reference the tests compare with bitsandbytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.lowrank import add_low_rank, principal_factors
from lorafit.quant.nf4 import NF4Tensor, QuantizationError, dequantize_nf4, quantize_nf4


def _nf4_roundtrip(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    return dequantize_nf4(quantize_nf4(weight, blocksize=blocksize, double_quant=False), torch.float32)


@torch.no_grad()
def loftq_quantized(weight: torch.Tensor, r: int, iterations: int = 1, blocksize: int = 64, scaling: float = 1.0,
                    double_quant: bool = False) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor]:
    """(q, lora_a, lora_b) for an (out, in) weight: q the NF4 base, with dequant(q) + scaling · lora_b @ lora_a ≈ W.

    q uses the quantiser the base will keep (double_quant as the model's), so the adapter absorbs exactly
    the error of the stored base; the factors carry 1/sqrt(scaling) each, so the start is right for any alpha/r.
    """
    if weight.dim() != 2:
        raise QuantizationError(f"LoftQ needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}.")
    if not 1 <= r <= min(weight.shape):
        raise QuantizationError(f"LoftQ rank r={r} must be between 1 and min(out, in) = {min(weight.shape)}.")
    if iterations < 1:
        raise QuantizationError(f"LoftQ iterations={iterations} must be at least 1 (PEFT's default is 1).")
    target = weight.detach().float()  # (out, in)
    residual = target
    for step in range(iterations):
        q = quantize_nf4(residual, blocksize=blocksize, double_quant=double_quant)
        lora_a, lora_b = principal_factors(target - dequantize_nf4(q, torch.float32), r, scaling)  # (r, in), (out, r)
        if step + 1 < iterations:
            residual = add_low_rank(target, lora_a, lora_b, -scaling)
    return q, lora_a, lora_b


def loftq_factors(weight: torch.Tensor, r: int, iterations: int = 1,
                  blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's loftq_init: (Q, lora_a, lora_b) with Q the dequantised NF4 base (no double quantisation) in weight's
    dtype, lora_a (r, in) and lora_b (out, r) in fp32, Q + lora_b @ lora_a ≈ weight (scale not compensated)."""
    q, lora_a, lora_b = loftq_quantized(weight, r, iterations, blocksize)
    return dequantize_nf4(q, torch.float32).to(weight.dtype), lora_a, lora_b


@dataclass(frozen=True)
class LoftQError:
    """Frobenius errors of the plain NF4 base and of the LoftQ start (Q + B A), for reports."""

    nf4: float  # ||W - NF4(W)||_F
    loftq: float  # ||W - (Q + B A)||_F

    @property
    def reduction(self) -> float:
        """Fraction of the plain NF4 error that LoftQ removes (0 = none, 1 = all)."""
        return 1.0 - self.loftq / self.nf4 if self.nf4 > 0 else 0.0


@torch.no_grad()
def loftq_error(weight: torch.Tensor, r: int, iterations: int = 1, blocksize: int = 64) -> LoftQError:
    """||W - (Q + BA)||_F after loftq_factors, next to ||W - NF4(W)||_F (same blocksize, no double quantisation)."""
    target = weight.detach().float()
    q, lora_a, lora_b = loftq_factors(target, r, iterations, blocksize)
    return LoftQError(nf4=torch.linalg.matrix_norm(target - _nf4_roundtrip(target, blocksize)).item(),
                      loftq=torch.linalg.matrix_norm(target - (q + lora_b @ lora_a)).item())
