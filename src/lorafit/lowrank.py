"""The two formulas of a rank-r update, each once: the update W + s·B A, and the symmetric split of a matrix's top
singular triplets into factors (A, B). LoRA, DoRA, PiSSA, merging and LoftQ all call these.

Shapes: W (out, in), A (r, in), B (out, r), s the scale (alpha/r or alpha/sqrt(r), lorafit.config.lora_scale).
"""

from __future__ import annotations

import torch

RANDOMISED_SVD_SEED = 0  # the randomised SVD is seeded, so a resumed PiSSA run rebuilds the same residual


def update_dtype(lora_a: torch.Tensor) -> torch.dtype:
    """The dtype updates are formed in: the factors' dtype, at least fp32 (fp64 stays fp64 for reference tests)."""
    return torch.promote_types(lora_a.dtype, torch.float32)


def low_rank_update(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A as an (out, in) matrix in update_dtype(lora_a)."""
    dtype = update_dtype(lora_a)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scaling  # (out, in)


def add_low_rank(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s · B A, (out, in), in update_dtype(lora_a); a negative scaling subtracts the update."""
    update = low_rank_update(lora_a, lora_b, scaling)
    return weight.to(update.dtype) + update


def principal_factors(weight: torch.Tensor, r: int, scaling: float,
                      niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A = the best rank-r approximation of `weight` (out, in): exact SVD, or randomised with niter.

    The singular values are split evenly: with S' = S[:r] / s, A = sqrt(S') Vᵀ[:r] (r, in) and B = U[:, :r] sqrt(S')
    (out, r), so A and B have the same scale whatever s is (PiSSA's and LoftQ's split).
    """
    if niter is None:
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)  # u (out, k), sigma (k,), vh (k, in)
        u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(RANDOMISED_SVD_SEED)
            u, sigma, v = torch.svd_lowrank(weight, q=r, niter=niter)  # u (out, r), sigma (r,), v (in, r)
        vh = v.t()
    root = (sigma / scaling).sqrt()  # (r,)
    return root[:, None] * vh, u * root[None, :]  # A (r, in), B (out, r)
