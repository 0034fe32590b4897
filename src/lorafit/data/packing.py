"""Pack tokenized examples into rows of at most `max_seq_len` tokens (best-fit decreasing).

Fewer, fuller rows mean less padding; position ids restart per example so attention
and targets can stay within each example.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from lorafit.data.chat import TokenizedExample


@dataclass(frozen=True)
class Pack:
    """Several examples concatenated into one row; `seq_lengths` marks where each one ends."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lengths: list[int]


def pack_examples(examples: list[TokenizedExample], max_seq_len: int) -> list[Pack]:
    """Best-fit decreasing: longest first, each into the fullest row that still has room."""
    for example in examples:
        if len(example.input_ids) > max_seq_len:
            raise ValueError(
                f"{example.source}: {len(example.input_ids)} tokens exceed max_seq_len={max_seq_len}; "
                "tokenize with the same max_seq_len before packing."
            )
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), kept sorted
    for i in order:
        size = len(examples[i].input_ids)
        slot = bisect_left(room, (size, -1))
        if slot == len(room):
            bins.append([i])
            free, index = max_seq_len, len(bins) - 1
        else:
            free, index = room.pop(slot)
            bins[index].append(i)
        insort(room, (free - size, index))
    positions = list(range(max_seq_len))
    return [_concatenate([examples[i] for i in members], positions) for members in bins]


def _concatenate(examples: list[TokenizedExample], positions: list[int]) -> Pack:
    """Join examples; slicing one shared `positions` list keeps this at list-copy speed."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += example.labels
        position_ids += positions[: len(example.input_ids)]
    return Pack(input_ids, labels, position_ids, seq_lengths=[len(example.input_ids) for example in examples])
