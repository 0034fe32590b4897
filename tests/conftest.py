"""Shared fixtures: tiny randomly initialised models of four architectures."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny_models import VOCAB, build_tiny

import lorafit

# "bf16: auto" and the 4-bit compute dtype follow the machine (lorafit.device.bf16_worthwhile): pin them to fp32 so
# that every test computes in the same dtype on every machine; tests that want bf16 ask for it explicitly, and the
# decision itself is tested in test_device.py with this variable removed.
os.environ["LORAFIT_BF16"] = "0"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is present and are skipped, with the reason listed (-rs), elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["llama", "qwen2", "mistral", "gpt2"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_pair(arch):
    """Two identical copies of a tiny model of each architecture (one to adapt, one as reference)."""
    model = build_tiny(arch)
    return model, copy.deepcopy(model)


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 11), generator=generator)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct in fp32, fetched once into lorafit's cache (slow tests)."""
    return lorafit.load_model("smollm2-135m")
