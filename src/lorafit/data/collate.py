"""Batch packs or single examples into padded tensors with targets already shifted.

Shifting here, per example, guarantees the loss never asks a token to predict the
first token of the next example in a pack. Packed batches carry no attention_mask:
transformers then confines attention to each example from the position ids, but only
when the model is called with use_cache=False (a cache disables that detection).
"""

from __future__ import annotations

import torch

from lorafit.data.chat import IGNORE, TokenizedExample
from lorafit.data.packing import Pack


def collate(
    rows: list[Pack | TokenizedExample], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to one length; packed rows get no attention_mask (position ids mark examples)."""
    if not rows:
        raise ValueError("collate needs at least one row.")
    packed = isinstance(rows[0], Pack)
    if any(isinstance(row, Pack) != packed for row in rows):
        raise TypeError("collate got a mix of packed and unpacked rows; batch them separately.")
    length = max(len(row.input_ids) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "targets": []}
    if not packed:
        batch["attention_mask"] = []
    for row in rows:
        pad = length - len(row.input_ids)
        lengths = row.seq_lengths if packed else [len(row.input_ids)]
        batch["input_ids"].append(row.input_ids + [pad_token_id] * pad)
        batch["targets"].append(shift_labels(row.labels, lengths) + [IGNORE] * pad)
        if packed:
            # Padding forms its own block (positions from 0), so it never joins the last example.
            batch["position_ids"].append(row.position_ids + list(range(pad)))
        else:
            batch["position_ids"].append(list(range(length)))
            batch["attention_mask"].append([1] * len(row.input_ids) + [0] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def shift_labels(labels: list[int], seq_lengths: list[int]) -> list[int]:
    """targets[t] = labels[t + 1] inside each example, and -100 on each example's last token."""
    targets: list[int] = []
    start = 0
    for size in seq_lengths:
        targets += labels[start + 1 : start + size] + [IGNORE]
        start += size
    return targets


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions that contribute to the loss."""
    return int((batch["targets"] != IGNORE).sum())
