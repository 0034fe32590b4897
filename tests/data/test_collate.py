"""Batching: targets shifted within each example, padding ignored, attention mask only when unpacked."""

from __future__ import annotations

import pytest
import torch

from lorafit.data import Pack, TokenizedExample, collate, count_targets, pack_examples

X = -100


def tokenized(ids: list[int], labels: list[int]) -> TokenizedExample:
    return TokenizedExample(input_ids=ids, labels=labels, truncated=False, source="t")


def test_packed_targets_never_cross_an_example_boundary():
    # Example A is plain text (all labels); example B masks its first token.
    pack = Pack(
        input_ids=[10, 11, 12, 20, 21, 22],
        labels=[10, 11, 12, X, 21, 22],
        position_ids=[0, 1, 2, 0, 1, 2],
        seq_lengths=[3, 3],
    )
    short = Pack(input_ids=[30, 31], labels=[30, 31], position_ids=[0, 1], seq_lengths=[2])
    batch = collate([pack, short], pad_token_id=0)
    assert set(batch) == {"input_ids", "position_ids", "targets"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22], [30, 31, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[11, 12, X, 21, 22, X], [31, X, X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert count_targets(batch) == 5


def test_first_token_of_next_example_is_not_a_target():
    # Built by the packer from two fully labelled examples: 12 -> 20 must not be learned.
    packs = pack_examples([tokenized([10, 11, 12], [10, 11, 12]), tokenized([20, 21], [20, 21])], max_seq_len=8)
    batch = collate(packs, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["targets"].tolist() == [[11, 12, X, 21, X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_unpacked_rows_are_right_padded_with_attention_mask():
    rows = [tokenized([5, 6, 7], [X, 6, 7]), tokenized([8, 9], [X, 9])]
    batch = collate(rows, pad_token_id=1, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 9, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["targets"].tolist() == [[6, 7, X, X], [9, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert count_targets(batch) == 3


def test_rejects_empty_and_mixed_batches():
    pack = Pack(input_ids=[1], labels=[1], position_ids=[0], seq_lengths=[1])
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)
    with pytest.raises(TypeError, match="mix"):
        collate([pack, tokenized([1], [1])], pad_token_id=0)
