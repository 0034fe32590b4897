"""A tiny Llama with a ChatML tokenizer (saved as a model folder) and a random adapter for it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomize_adapters, tiny_chat_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit
from lorafit.adapters.io import save_adapter


def tiny_chat_model(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return model.eval(), tokenizer


def with_random_adapter(model, scale: float) -> LlamaForCausalLM:
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=3, scale=scale)
    return model


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """(model folder, adapter folder): the tiny model and a random all-linear r=4 adapter saved for it."""
    root = tmp_path_factory.mktemp("tiny_eval")
    model, tokenizer = tiny_chat_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_adapter(with_random_adapter(model, scale=0.5), root / "adapter")
    return root / "model", root / "adapter"
