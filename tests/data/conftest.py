"""Offline fixtures for the data tests: a tiny byte-level BPE tokenizer with SmolLM2's ChatML template."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tiny_models import SMOLLM2_TEMPLATE, tiny_backend_tokenizer, tiny_chat_tokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

__all__ = ["SMOLLM2_TEMPLATE"]


@pytest.fixture(scope="session")
def backend_tokenizer() -> Tokenizer:
    return tiny_backend_tokenizer()


@pytest.fixture(scope="session")
def make_tokenizer(backend_tokenizer: Tokenizer) -> Callable[[str], PreTrainedTokenizerFast]:
    """Wrap the tiny tokenizer with a given chat template (ChatML tokens, eos <|im_end|> like SmolLM2)."""

    def make(template: str = SMOLLM2_TEMPLATE) -> PreTrainedTokenizerFast:
        return tiny_chat_tokenizer(template, backend_tokenizer)

    return make


@pytest.fixture(scope="session")
def smollm2_template() -> str:
    return SMOLLM2_TEMPLATE


@pytest.fixture(scope="session")
def chatml_tokenizer(make_tokenizer: Callable[[str], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    return make_tokenizer(SMOLLM2_TEMPLATE)
