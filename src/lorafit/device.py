"""Device choice: CUDA when present, else CPU; nothing in lorafit names a device otherwise."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The device to train on by default: the first CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth using on `device` (CUDA with bf16 support; CPU always runs it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"
