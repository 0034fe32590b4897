"""Learning-rate schedules: linear warmup, then cosine / linear decay to zero, or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LrSchedule:
    """lr_factor as a callable object rather than a lambda: LambdaLR's state_dict saves an object's settings (a
    plain function is saved as None), so a checkpoint records the schedule and resume can check it is the same."""

    total_steps: int
    warmup_steps: int
    kind: str

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.kind)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor; its state_dict (numbers and the LrSchedule settings: JSON) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(total_steps, warmup_steps, kind))
