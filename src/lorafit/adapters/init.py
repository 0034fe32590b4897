"""Adapter initialisers: default / gaussian (B = 0), PiSSA (A, B from the top singular triplets of W0) and
LoftQ (the base becomes NF4 and A, B absorb its quantisation error).

PiSSA (Meng et al. 2024; PEFT's `pissa_init`): W0 = U S Vᵀ; with S' = S[:r] / s,
A = sqrt(S') Vᵀ[:r] (r, in), B = U[:, :r] sqrt(S') (out, r), so s·B A is W0's principal rank-r part, and the
base keeps the residual W0 - s·B A: the wrapped layer starts equal to the base. The initial factors are kept
(non-persistent buffers) to convert the trained adapter to plain LoRA on save and to compute the original base.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.adapters.branch import dense_weight
from lorafit.adapters.lora import LoraLinear
from lorafit.config import AdapterConfig, ConfigError
from lorafit.device import default_compute_dtype
from lorafit.quant.linear4bit import Linear4bit
from lorafit.quant.loftq import loftq_quantized

PISSA_SEED = 0  # the randomised SVD of pissa_niter_K is seeded so a resumed run rebuilds the same residual


def initialize(layer: LoraLinear, config: AdapterConfig) -> None:
    """Initialise one freshly attached layer as config.init says."""
    if config.is_pissa:
        pissa_init(layer, config.pissa_niter)
    elif config.init == "loftq":
        loftq_init(layer, config.loftq_iter)
    else:
        layer.reset_parameters(config.init)


def principal_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A = the best rank-r approximation of `weight` (out, in): exact SVD, or randomised with niter."""
    if niter is None:
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)  # u (out, k), sigma (k,), vh (k, in)
        u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(PISSA_SEED)
            u, sigma, v = torch.svd_lowrank(weight, q=r, niter=niter)  # u (out, r), sigma (r,), v (in, r)
        vh = v.t()
    root = (sigma / scaling).sqrt()  # (r,)
    return root[:, None] * vh, u * root[None, :]  # A (r, in), B (out, r)


def pissa_init(layer: LoraLinear, niter: int | None = None) -> None:
    """Set A, B to W0's principal factors and the base weight to the residual W0 - s·B A."""
    weight = layer.base_layer.weight
    if not weight.is_floating_point():
        raise ConfigError(
            f"init='pissa' needs a 16/32-bit base weight, but this layer is {type(layer.base_layer).__name__} "
            f"({weight.dtype}); PiSSA's residual cannot be re-quantised exactly. Load the model without quantize= for "
            "PiSSA, or use init='loftq' (the quantisation-aware initialisation) on a 4-bit base."
        )
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        original = dense_weight(layer.base_layer).to(dtype)  # (out, in)
        lora_a, lora_b = principal_factors(original, layer.r, layer.scaling, niter)
        layer.lora_A.weight.copy_(lora_a)
        layer.lora_B.weight.copy_(lora_b)
        layer.pissa_initial_A = layer.lora_A.weight.detach().clone()
        layer.pissa_initial_B = layer.lora_B.weight.detach().clone()
        layer.write_base(original - layer.delta_weight())
    layer.reset_magnitude()


def restore_pissa_base(layer: LoraLinear) -> None:
    """Give a PiSSA layer its original weight back (residual + s·B0 A0), e.g. when the adapter is detached."""
    if layer.pissa_initial_A is None:
        return
    with torch.no_grad():
        a0, b0 = layer.pissa_initial_A, layer.pissa_initial_B
        dtype = torch.promote_types(a0.dtype, torch.float32)
        residual = dense_weight(layer.base_layer).to(dtype)
        layer.write_base(residual + layer.scaling * (b0.to(dtype) @ a0.to(dtype)))


def loftq_init(layer: LoraLinear, iterations: int = 1, double_quant: bool = True,
               compute_dtype: torch.dtype | None = None) -> None:
    """Replace the float base by its LoftQ NF4 quantisation Q and set A, B so that Q + s·B A ≈ W0."""
    base = layer.base_layer
    if not isinstance(base, nn.Linear):
        raise ConfigError(
            f"init='loftq' quantises float nn.Linear weights itself, but this layer is {type(base).__name__}; "
            "load the model without quantize= (lorafit's trainer does this when init is loftq), or use "
            "init='default' on an already 4-bit model."
        )
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(base.weight.device)
    with torch.no_grad():
        q, lora_a, lora_b = loftq_quantized(base.weight, layer.r, iterations, scaling=layer.scaling,
                                            double_quant=double_quant)
        layer.lora_A.weight.copy_(lora_a)
        layer.lora_B.weight.copy_(lora_b)
    layer.base_layer = Linear4bit(q, base.bias, compute_dtype)
    layer.reset_magnitude()
