"""A tiny Llama with a ChatML tokenizer, and a random adapter for it (helpers for the evaluation tests)."""

from __future__ import annotations

import torch
from tiny_models import randomize_adapters, tiny_chat_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit


def tiny_chat_model(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    """A 2-block Llama (hidden 32) sized to the tiny ChatML tokenizer, in eval mode; the same seed, the same weights."""
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return model.eval(), tokenizer


def with_random_adapter(model, scale: float) -> LlamaForCausalLM:
    """Attach an all-linear r=4 adapter and give its B matrices N(0, scale) values (seed 3)."""
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=3, scale=scale)
    return model
