"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, arXiv 2310.05914).

    x_emb <- x_emb + (alpha / sqrt(L * d)) * eps,   eps ~ Uniform(-1, 1) elementwise,

with L the sequence length and d the hidden size, so each row's noise has norm about alpha / sqrt(3) whatever
its shape. L is the padded length of the batch (the embedding output's dim 1), as in the paper's reference code
and in transformers/TRL (`transformers.integrations.neftune.neftune_post_forward_hook`, which TRL and Unsloth call):
a forward hook on the embedding sees the token ids but not the attention mask, so it cannot count real tokens.
For lorafit's packed rows padding is small, and noise on padded positions is harmless (they are masked out of
attention and of the loss). Noise is added only while the embedding module is in training mode: evaluation,
generation and the reference forwards (model.eval()) see clean embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def neftune_magnitude(alpha: float, seq_len: int, hidden: int) -> float:
    """The bound of the uniform noise, alpha / sqrt(seq_len * hidden): the noise lies in [-bound, bound]."""
    return alpha / math.sqrt(seq_len * hidden)


@contextmanager
def neftune_noise(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """Within the block, the model's input embeddings get NEFTune noise in training mode; the hook is removed on
    exit (also on error). alpha None or 0 leaves the model untouched."""
    if alpha is not None and not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"neftune_noise_alpha={alpha!r} must be a finite number >= 0 (null or 0 = no noise)")
    if not alpha:
        yield
        return

    def add_noise(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = neftune_magnitude(alpha, output.shape[1], output.shape[2])  # output: (batch, seq, hidden)
        return output + torch.empty_like(output).uniform_(-bound, bound)

    handle = model.get_input_embeddings().register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["neftune_magnitude", "neftune_noise"]
