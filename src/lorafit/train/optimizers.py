"""The optimiser named by training.optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW (plain or paged).

bitsandbytes' AdamW8bit keeps both moments of every tensor with >= 4096 elements in uint8 with one fp32
absmax per 256 values (~2 bytes per parameter instead of 8; smaller tensors stay fp32), and runs on
CPU since bitsandbytes 0.50. PagedAdamW8bit puts those states in CUDA unified memory, which pages to
host RAM under GPU memory pressure: it exists on CUDA only (on CPU bitsandbytes would silently fall
back to the plain one, so lorafit refuses instead). bitsandbytes is an optional extra: `pip install lorafit[bnb]`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from lorafit.config import ConfigError
from lorafit.run_config import OPTIMIZERS

BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
MIN_BNB_VERSION = (0, 50)  # the first release with CPU kernels for the 8-bit optimizers


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """training.optimizer `name` over `params` (on `device`) with AdamW's defaults (betas 0.9/0.999, eps 1e-8)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"training.optimizer={name!r}: use one of {', '.join(OPTIMIZERS)}.")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(f"training.optimizer=paged_adamw_8bit pages its state through CUDA unified memory and needs "
                          f"a CUDA GPU (this run is on {device.type}); use adamw_8bit.")
    return getattr(_bitsandbytes_optim(name), BNB_CLASSES[name])(params, lr=lr, weight_decay=weight_decay)


def _bitsandbytes_optim(name: str):
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ConfigError(f"training.optimizer={name} needs bitsandbytes, which is not installed: "
                          "pip install 'lorafit[bnb]' (or use optimizer: adamw).") from err
    version = tuple(int(part) for part in bnb.__version__.split(".")[:2])
    if version < MIN_BNB_VERSION:
        raise ConfigError(f"training.optimizer={name} needs bitsandbytes >= 0.50 (installed: {bnb.__version__}): "
                          "pip install -U 'lorafit[bnb]'.")
    return importlib.import_module("bitsandbytes.optim")
