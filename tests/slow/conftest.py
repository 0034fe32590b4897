"""The real model for slow tests: SmolLM2-135M-Instruct, fetched once into lorafit's cache."""

from __future__ import annotations

import pytest

import lorafit


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real model in fp32 on the default device, shared by the slow tests."""
    return lorafit.load_model("smollm2-135m")
