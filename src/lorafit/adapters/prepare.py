"""A base model and its adapter, in the order quantisation needs: the one place that knows LoftQ's order.

Plain QLoRA: load_model(quantize=...) quantises every block linear while it loads, then the adapter wraps them.
LoftQ: the model is loaded in float (quantize_at_load says so), the targets are chosen first, the other block
linears are quantised, then attach's LoftQ init quantises each adapted layer while it fits A and B to its error.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorafit.adapters.io import load_adapter, read_adapter_config
from lorafit.adapters.model import attach
from lorafit.adapters.targets import select_targets
from lorafit.config import AdapterConfig
from lorafit.device import default_compute_dtype
from lorafit.models import quantize_block_linears


def quantize_at_load(init: str, quantize: str | None) -> str | None:
    """What load_model should quantise for an adapter with this init: nothing for LoftQ (prepare_model does it)."""
    return None if init == "loftq" else quantize


def prepare_model(model: nn.Module, adapter: AdapterConfig | str | Path, *, quantize: str | None = None,
                  double_quant: bool = True, warn_scale: bool = True) -> nn.Module:
    """Attach a fresh adapter (an AdapterConfig) or a saved one (its folder; loaded trainable) to `model`.

    `model` is the base as load_model(quantize=quantize_at_load(init, quantize)) gives it; with init loftq and
    `quantize`, the block linears that are not targets are quantised here before the adapter is attached.
    """
    config = adapter if isinstance(adapter, AdapterConfig) else read_adapter_config(adapter)
    if quantize and config.init == "loftq":
        targets = select_targets(model, config.target_modules, config.exclude_modules)
        device = next(model.parameters()).device
        quantize_block_linears(model, double_quant=double_quant, compute_dtype=default_compute_dtype(device),
                               skip=targets)
    if isinstance(adapter, AdapterConfig):
        attach(model, config, warn_scale=warn_scale)
    else:
        load_adapter(model, adapter, trainable=True)
    return model
