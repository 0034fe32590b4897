"""Best-fit-decreasing packing, and packed rows giving the same logits as unpacked ones in a real model."""

from __future__ import annotations

import pytest
import torch

from lorafit.data import (
    Example,
    TokenizedExample,
    collate,
    pack_examples,
    tokenize_example,
)


def example(length: int, first: int) -> TokenizedExample:
    """Distinct ids per example so they can be told apart after packing."""
    ids = list(range(first, first + length))
    return TokenizedExample(input_ids=ids, labels=[-100] + ids[1:], truncated=False, source=f"e{first}")


def split(pack) -> list[tuple[list[int], list[int]]]:
    parts, start = [], 0
    for size in pack.seq_lengths:
        parts.append((pack.input_ids[start : start + size], pack.labels[start : start + size]))
        start += size
    return parts


def first_fit(sizes: list[int], capacity: int) -> int:
    """Reference: first fit in the given order; returns the number of bins."""
    bins: list[int] = []
    for size in sizes:
        for i, used in enumerate(bins):
            if used + size <= capacity:
                bins[i] += size
                break
        else:
            bins.append(size)
    return len(bins)


def test_every_example_once_and_no_pack_too_long():
    lengths = [5, 17, 3, 9, 12, 1, 8, 20, 4, 4, 11, 6]
    examples = [example(n, 100 * i) for i, n in enumerate(lengths)]
    packs = pack_examples(examples, max_seq_len=20)
    assert all(len(p.input_ids) == len(p.labels) == len(p.position_ids) == sum(p.seq_lengths) <= 20 for p in packs)
    found = sorted(part for pack in packs for part in split(pack))
    assert found == sorted((e.input_ids, e.labels) for e in examples)
    assert len(packs) == 5  # 100 tokens in rows of 20: the lower bound, reached here


def test_position_ids_restart_per_example():
    (pack,) = pack_examples([example(3, 10), example(2, 20), example(4, 30)], max_seq_len=9)
    assert pack.seq_lengths == [4, 3, 2]
    assert pack.position_ids == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert pack.input_ids == [30, 31, 32, 33, 10, 11, 12, 20, 21]


def test_best_fit_reaches_the_optimum_where_first_fit_does_not():
    sizes = [3, 3, 3, 7, 7, 7]  # optimum: three rows of 7 + 3
    packs = pack_examples([example(n, 100 * i) for i, n in enumerate(sizes)], max_seq_len=10)
    assert len(packs) == 3 < first_fit(sizes, 10) == 4
    assert sorted(p.seq_lengths for p in packs) == [[7, 3]] * 3


def test_best_fit_picks_the_fullest_row():
    # After 7 | 4+4, a 2 fits both rows; best fit fills the 4+4 row (first-fit-decreasing would pick the 7 row).
    packs = pack_examples([example(n, 100 * i) for i, n in enumerate([2, 4, 7, 4])], max_seq_len=10)
    assert [p.seq_lengths for p in packs] == [[7], [4, 4, 2]]


def test_packing_is_deterministic_and_checks_lengths():
    examples = [example(n, 100 * i) for i, n in enumerate([4, 4, 4, 2, 2, 6])]
    assert pack_examples(examples, 8) == pack_examples(list(examples), 8)
    assert pack_examples([], 8) == []
    with pytest.raises(ValueError, match="e0: 9 tokens exceed max_seq_len=8"):
        pack_examples([example(9, 0)], 8)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "Cats sleep all day and judge you all night. Write a short poem about the sea.",
]


def tiny_llama(vocab_size: int, **kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM._from_config(config, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("attn_implementation, expected", [(None, "sdpa"), ("eager", "eager")])
def test_packed_logits_match_unpacked(chatml_tokenizer, attn_implementation, expected):
    """fp32 and identical math apart from the mask: each example's logits in a pack equal its logits alone."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = tiny_llama(len(chatml_tokenizer), **kwargs)
    assert model.config._attn_implementation == expected  # sdpa is the default
    examples = [tokenize_example(chatml_tokenizer, Example(source="t", text=t)) for t in TEXTS]
    assert len({len(e.input_ids) for e in examples}) == 3
    packs = pack_examples(examples, max_seq_len=sum(len(e.input_ids) for e in examples))
    assert len(packs) == 1
    batch = collate(packs, pad_token_id=chatml_tokenizer.pad_token_id, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] > sum(packs[0].seq_lengths)  # padding present
    assert "attention_mask" not in batch

    # use_cache=False: with a cache, transformers skips detecting packed sequences from position_ids.
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one causal sequence
        start = 0
        for size in packs[0].seq_lengths:
            member = next(e for e in examples if len(e.input_ids) == size)
            alone = model(input_ids=torch.tensor([member.input_ids]), use_cache=False).logits[0]
            assert (packed[start : start + size] - alone).abs().max().item() <= 1e-5
            if start:  # control: without restarting positions, later examples see earlier ones
                assert (leaky[start : start + size] - alone).abs().max().item() > 1e-3
            start += size
