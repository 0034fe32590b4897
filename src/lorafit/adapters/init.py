"""Adapter initialisers: default / gaussian (B = 0), PiSSA (A, B from the top singular triplets of W0) and
LoftQ (the base becomes NF4 and A, B absorb its quantisation error).

PiSSA (Meng et al. 2024; PEFT's `pissa_init`): A, B = W0's principal factors (lorafit.lowrank), so s·B A is W0's
principal rank-r part, and the base keeps the residual W0 - s·B A: the wrapped layer starts equal to the base.
The initialiser keeps the initial factors B0, A0 (non-persistent buffers it registers on the layer, so they follow
.to() and deepcopy): `initial_factors` gives them to the save conversion to plain LoRA, `original_base` and
`restore_pissa_base` add s·B0 A0 back to the residual to compute or restore the original base. Training, checkpoints
and resume keep the residual form.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorafit.adapters.branch import dense_weight
from lorafit.adapters.lora import LoraLinear, lora_branch
from lorafit.config import AdapterConfig, ConfigError
from lorafit.device import default_compute_dtype
from lorafit.quant.linear4bit import Linear4bit
from lorafit.lowrank import add_low_rank, principal_factors
from lorafit.quant.loftq import loftq_quantized

PISSA_A0, PISSA_B0 = "pissa_initial_A", "pissa_initial_B"  # the layer buffers pissa_init registers


def initialize(layer: LoraLinear, config: AdapterConfig) -> None:
    """Initialise one freshly attached layer as config.init says."""
    if config.is_pissa:
        pissa_init(layer, config.pissa_niter)
    elif config.init == "loftq":
        loftq_init(layer, config.loftq_iter)
    else:
        layer.reset_parameters(config.init)


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
        layer.register_buffer(PISSA_A0, layer.lora_A.weight.detach().clone(), persistent=False)
        layer.register_buffer(PISSA_B0, layer.lora_B.weight.detach().clone(), persistent=False)
        layer.write_base(add_low_rank(original, layer.lora_A.weight, layer.lora_B.weight, -layer.scaling))
    layer.reset_magnitude()


def initial_factors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) of a PiSSA layer, whose base holds W0 - s·B0 A0; None for every other init (the base is W0)."""
    a0, b0 = getattr(layer, PISSA_A0, None), getattr(layer, PISSA_B0, None)
    return None if a0 is None else (a0, b0)


@contextmanager
def original_base(layer: LoraLinear) -> Iterator[None]:
    """Within the block the layer's base computes its original weight: a PiSSA residual base adds s·B0 A0 x to its
    output (a forward hook, no weight copy); any other base is already the original."""
    factors = initial_factors(layer)
    if factors is None:
        yield
        return
    a0, b0 = factors
    handle = layer.base_layer.register_forward_hook(lambda _, args, out: lora_branch(out, args[0], a0, b0, layer.scaling))
    try:
        yield
    finally:
        handle.remove()


def restore_pissa_base(layer: LoraLinear) -> None:
    """Give a PiSSA layer its original weight back (residual + s·B0 A0), e.g. when the adapter is detached."""
    factors = initial_factors(layer)
    if factors is None:
        return
    a0, b0 = factors
    with torch.no_grad():
        layer.write_base(add_low_rank(dense_weight(layer.base_layer), a0, b0, layer.scaling))


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
