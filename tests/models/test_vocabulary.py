"""data.added_tokens: the tokenizer learns the tokens, the embeddings (and an untied head) grow with deterministic
placeholder rows, old rows stay bit-identical, ties stay ties, QLoRA's kept-16-bit tables stay 16-bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny, save_tiny_chat_llama, tiny_chat_tokenizer

import lorafit
from lorafit.models.frozen_16bit import Frozen16bitEmbedding, Frozen16bitLinear
from lorafit.models.vocabulary import add_tokens, resize_vocabulary

NEW = ["<tool_call>", "</tool_call>"]


@pytest.mark.parametrize("tie", [False, True])
def test_added_tokens_grow_the_tables_with_mean_rows(tmp_path, tie):
    save_tiny_chat_llama(tmp_path / "m")
    model, tokenizer = lorafit.load_model(str(tmp_path / "m"), device="cpu")
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    before = {"embed": model.model.embed_tokens.weight.detach().clone(), "head": model.lm_head.weight.detach().clone()}
    rows = before["embed"].shape[0]
    new_rows = add_tokens(model, tokenizer, [*NEW, "user"])  # 'user' exists: nothing to add for it
    assert new_rows == range(rows, rows + 2) and len(tokenizer) == rows + 2
    assert tokenizer.convert_tokens_to_ids(NEW) == list(new_rows)
    assert tokenizer("a <tool_call>b").input_ids.count(rows) == 1  # never split
    for table, name in ((model.model.embed_tokens.weight, "embed"), (model.lm_head.weight, "head")):
        assert table.shape == (rows + 2, 32)
        assert torch.equal(table[:rows], before[name])
        torch.testing.assert_close(table[rows:], before[name].double().mean(0).float().expand(2, -1), rtol=0, atol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert model.config.vocab_size == rows + 2
    assert add_tokens(model, tokenizer, NEW) == range(0)  # again: nothing new


def test_a_padded_vocabulary_is_not_resized():
    model = build_tiny("llama")  # 96 rows: room for a vocabulary of up to 96 ids
    weight = model.model.embed_tokens.weight
    assert resize_vocabulary(model, 90) == range(0) and model.model.embed_tokens.weight is weight
    assert weight.shape[0] == 96


def test_kept_16bit_tables_grow_in_16_bits(tmp_path):
    model = build_tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tiny_chat_tokenizer().save_pretrained(tmp_path / "bf16")
    model, tokenizer = lorafit.load_model(str(tmp_path / "bf16"), device="cpu", quantize="nf4")
    new_rows = add_tokens(model, tokenizer, NEW)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embeddings) is Frozen16bitEmbedding and type(head) is Frozen16bitLinear
    assert embeddings.weight.dtype == head.weight.dtype == torch.bfloat16
    assert embeddings.weight.shape[0] == head.weight.shape[0] == new_rows.stop
    assert model(torch.tensor([[1, new_rows.start]])).logits.dtype == torch.float32
