"""Cost and sanity of the forgetting check on the real SmolLM2-135M with a quickstart-shaped adapter."""

from __future__ import annotations

import copy

import pytest
from tiny_models import randomize_adapters

import lorafit
from lorafit.evaluation.forgetting import forgetting_check, format_forgetting

pytestmark = pytest.mark.slow


def test_forgetting_cost_with_the_quickstart_adapter_shape(smollm2):
    base, tokenizer = smollm2
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=16, alpha=32, target_modules="all-linear"))
    randomize_adapters(model, seed=3, scale=0.002)  # a small random update: the cost does not depend on values
    result = forgetting_check(model, tokenizer)  # defaults: 14 prompts, 24 new tokens, 512-token chunks
    print(format_forgetting(result))
    print(f"cost: {result['cpu_seconds']:.0f} CPU-seconds, {result['seconds']:.0f} s wall, phases {result['phases']}")
    assert result["prompts"] == 14 and result["text_tokens"] > 1500
    assert 0 < result["kl_per_token"] < 0.1 and result["ppl_ratio"] != 1.0  # a tiny update: measurable, small
    assert result["warnings"] == []
