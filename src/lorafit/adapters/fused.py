"""Installs lorafit's memory-saving forwards on a model's modules when adapters are attached, and removes them.

Two kinds, each computing its module's stock forward exactly while keeping less for the backward pass:
the gated MLP's tail (adapters/swiglu.py: keeps gate and up, not four intermediate tensors) and Llama's RMSNorm
(adapters/rmsnorm.py: keeps its output, which the adapted layers after it keep anyway, not its input). The fused
forward is an instance attribute over the class's own, so removing it restores the module as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

from torch import nn

from lorafit.adapters.rmsnorm import fused_rms_norm_forward, is_rms_norm
from lorafit.adapters.swiglu import fused_mlp_forward, is_gated_mlp

FUSED_ATTR = "lorafit_fused_forward"  # set on a module whose forward lorafit replaced
KINDS: tuple[tuple[Callable[[nn.Module], bool], Callable], ...] = (
    (is_gated_mlp, fused_mlp_forward),
    (is_rms_norm, fused_rms_norm_forward),
)


def install_fused_forwards(model: nn.Module) -> int:
    """Give every module of a kind in KINDS its fused forward; returns how many modules were changed."""
    count = 0
    for module in model.modules():
        if hasattr(module, FUSED_ATTR):
            continue
        for applies, forward in KINDS:
            if applies(module):
                module.forward = MethodType(forward, module)
                setattr(module, FUSED_ATTR, True)
                count += 1
                break
    return count


def remove_fused_forwards(model: nn.Module) -> None:
    """Give every module its class's forward back."""
    for module in model.modules():
        if hasattr(module, FUSED_ATTR):
            del module.forward
            delattr(module, FUSED_ATTR)
