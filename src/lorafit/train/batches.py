"""From example files to a deterministic schedule of micro-batches (resumable by step number alone)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.data import (
    DataError,
    Example,
    TokenizeStats,
    collate,
    count_targets,
    pack_examples,
    read_examples,
    tokenize_examples,
)
from lorafit.data.chat import IGNORE
from lorafit.distributed import rank_chunks


@dataclass
class Dataset:
    """Training rows (packs or single examples), the examples they came from, and how they were made."""

    rows: list[Any]
    stats: TokenizeStats
    examples: list[Example]


def prepare_rows(path: str, tokenizer: Any, *, max_seq_len: int, packing: bool, assistant_only: bool) -> Dataset:
    """Read, template, mask, truncate and (optionally) pack one data file. A file none of whose rows keeps a token
    to train on within max_seq_len is an error: training on empty batches would change nothing and say nothing."""
    examples = read_examples(path)
    tokenized, stats = tokenize_examples(tokenizer, examples, assistant_only=assistant_only, max_seq_len=max_seq_len)
    if not tokenized:
        raise DataError(f"{path}: all {stats.examples} rows were dropped: none keeps a token to train on within "
                        f"data.max_seq_len={max_seq_len} ({stats.truncated} cut by it); raise data.max_seq_len or "
                        "shorten the rows.")
    rows: list[Any] = pack_examples(tokenized, max_seq_len) if packing else list(tokenized)
    return Dataset(rows=rows, stats=stats, examples=examples)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(num_rows / batch_size))


@dataclass
class MicroBatch:
    """Tensors for one forward pass, with its count of real (non-padding) tokens and of loss targets."""

    tensors: dict[str, torch.Tensor]
    tokens: int
    targets: int


def step_rows(rows: list[Any], step: int, *, batch_size: int, seed: int) -> list[Any]:
    """The rows of optimiser step `step`: epoch e shuffles rows with seed+e, so any step can be rebuilt (resume)."""
    epoch, index = divmod(step, steps_per_epoch(len(rows), batch_size))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [rows[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def fixed_batches(rows: list[Any], batch_size: int, pad_token_id: int) -> list[MicroBatch]:
    """Consecutive rows batched in order (evaluation, and the rows of one step)."""
    batches = []
    for i in range(0, len(rows), batch_size):
        group = rows[i:i + batch_size]
        tensors = collate(group, pad_token_id)
        batches.append(MicroBatch(tensors, sum(len(r.input_ids) for r in group), count_targets(tensors)))
    return batches


def rank_micro_batches(rows: list[Any], micro_batch_size: int, pad_token_id: int, *, rank: int,
                       world_size: int) -> list[MicroBatch]:
    """This rank's micro-batches of one global step's rows (`step_rows`): its share (lorafit.distributed.share,
    rows[rank::world_size]) batched in order.

    Every rank gets the same number of micro-batches (lorafit.distributed.rank_chunks), because each forward and
    backward under DDP/FSDP is a collective that all ranks must enter: a rank with fewer rows (the step's row count
    is not a multiple of world_size) gets filler micro-batches, copies of a row with no targets, which add
    nothing to the loss or the gradients. In a world of one this is fixed_batches(rows, micro_batch_size).
    """
    batches = []
    for group, real in rank_chunks(rows, micro_batch_size, rank=rank, world_size=world_size):
        batch = fixed_batches(group, micro_batch_size, pad_token_id)[0]
        if not real:
            batch = MicroBatch({**batch.tensors, "targets": torch.full_like(batch.tensors["targets"], IGNORE)},
                               tokens=0, targets=0)
        batches.append(batch)
    return batches
