"""New tokens for a run (data.added_tokens): the tokenizer learns them and the model's embeddings grow to fit.

`resize_vocabulary` grows the input embeddings and an untied head to `size` rows (a tied head grows with them,
the same parameter); every new row starts as the mean of the existing rows, deterministic and so the same for
whoever resizes the same base (transformers' default samples them at random). A vocabulary the model already
covers (checkpoints pad their embeddings, e.g. to a multiple of 64) is left as it is. QLoRA's kept-16-bit
embeddings and head (frozen_16bit.py) are resized in their 16-bit dtype and keep computing in the model's.
The new rows only mean something once trained: adapter.trainable_token_indices names them (or modules_to_save
trains the whole tables), and the adapter folder then carries them and the tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorafit.models.frozen_16bit import (
    Frozen16bitEmbedding,
    compute_in_model_dtype,
    plain_modules,
)


def add_tokens(model: nn.Module, tokenizer: Any, tokens: list[str]) -> range:
    """Add `tokens` (those the tokenizer lacks) to `tokenizer`, resize the model to it; return the embedding rows
    the resize created (empty when the model already had rows for every id)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    return resize_vocabulary(model, len(tokenizer))


def resize_vocabulary(model: nn.Module, size: int) -> range:
    """Grow the input embeddings (and an untied head) to `size` rows, new rows at the mean of the old ones; return
    the new rows' ids (empty when the model already has `size` rows or more)."""
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if size <= rows:
        return range(0)
    kept_16bit = isinstance(embeddings, Frozen16bitEmbedding)
    compute_dtype = embeddings.output_dtype if kept_16bit else None
    if kept_16bit:
        plain_modules(model)
    model.resize_token_embeddings(size, mean_resizing=False)
    tables = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None and m.weight.shape[0] == size}
    with torch.no_grad():
        for weight in tables.values():
            weight[rows:] = weight[:rows].double().mean(dim=0).to(weight.dtype)
    if kept_16bit:
        compute_in_model_dtype(model, compute_dtype)
    return range(rows, size)
