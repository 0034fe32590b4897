"""The reference policy of GRPO's KL term and DPO's log-ratios: the policy that training started from.

No second copy of the model is kept. A fresh adapter whose start equals the base model (B = 0, or PiSSA, whose
layers add the initial factors back onto the residual when switched off) gives the reference by switching the
adapter off. Where that is not the start, the trainable weights are copied once at the start (adapter-sized) and
swapped in for each reference pass, as TRL does with its frozen "ref" adapter: a run from a saved adapter
(init_adapter), trained biases (switching the adapter off does not undo them), and LoftQ, which starts at
Q + s·B0 A0 (switched off it would be the bare 4-bit Q).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorafit.adapters.model import adapters_disabled
from lorafit.run_config import RunConfig

StartWeights = dict[str, torch.Tensor]


def reference_start(model: nn.Module, config: RunConfig) -> StartWeights | None:
    """None when the adapter switched off is the starting policy, else a copy of the starting trainable weights.

    Call it after the adapter is attached and before any checkpoint is loaded (a resumed run's weights have moved).
    """
    fresh = not config.init_adapter and config.adapter.bias == "none" and config.adapter.init != "loftq"
    return None if fresh else start_weights(model)


def start_weights(model: nn.Module) -> StartWeights:
    """A copy of the adapter's current weights (the trainable parameters only: adapter-sized, not base-sized)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def reference_policy(model: nn.Module, start: StartWeights | None) -> Iterator[None]:
    """Within the block the model computes as the reference: the adapter off (start None) or `start` swapped in."""
    if start is None:
        with adapters_disabled(model):
            yield
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        current = {name: params[name].detach().clone() for name in start}
        for name, value in start.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in current.items():
                params[name].copy_(value)


__all__ = ["StartWeights", "reference_policy", "reference_start", "start_weights"]
