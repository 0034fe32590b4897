"""Tiny models with a vocabulary that matches the tiny BPE tokenizer, with a perturbed adapter, for GGUF export tests."""

from __future__ import annotations

import copy

import torch
from tiny_models import randomize_adapters, tiny_chat_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

from lorafit.adapters.model import attach, merge_and_unload
from lorafit.config import AdapterConfig

TOKENIZER = tiny_chat_tokenizer()


def tiny_model(arch: str, seed: int = 0, tie: bool = False):
    """A tiny random model whose vocabulary is the tiny tokenizer's (GGUF files carry the tokenizer)."""
    config = tiny_config(arch)
    config.vocab_size = len(TOKENIZER)
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def adapted(model, config: AdapterConfig | None = None):
    """`model` with an adapter whose B (and DoRA magnitudes) are random, so the merged weights differ from the base."""
    attach(model, config or AdapterConfig(r=4, alpha=8), warn_scale=False)
    randomize_adapters(model, scale=0.2)
    return model


def merged_copy(model):
    return merge_and_unload(copy.deepcopy(model), dtype=torch.float32)


def token_ids(batch: int = 3, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, len(TOKENIZER), (batch, length), generator=generator)


def load_gguf(path):
    """The GGUF file read back by transformers' GGUF loader (the reference reader), in fp32."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gguf_fields(path) -> dict:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}
