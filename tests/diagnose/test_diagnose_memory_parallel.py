"""estimate_memory per process of a multi-GPU run: ddp replicates, fsdp shards N ways (lorafit.distributed.wrap)."""

from __future__ import annotations

import math

import pytest
from tiny_models import build_tiny

from lorafit.cli import main
from lorafit.config import ConfigError
from lorafit.diagnose.memory import GB, estimate_memory, fsdp_weight_bytes
from lorafit.diagnose.model_shape import LLAMA_3_8B, ModelShape


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_ddp_replicates_and_fsdp_shards_weights_adapters_and_optimizer(method):
    one = estimate_memory(LLAMA_3_8B, method, precision="bf16")
    ddp = estimate_memory(LLAMA_3_8B, method, precision="bf16", gpus=8, strategy="ddp")
    fsdp = estimate_memory(LLAMA_3_8B, method, precision="bf16", gpus=8, strategy="fsdp")
    assert ddp.to_dict() | {"settings": None} == one.to_dict() | {"settings": None}
    assert estimate_memory(LLAMA_3_8B, method, precision="bf16", gpus=1, strategy="fsdp").weights == one.weights
    for bucket in ("adapters", "gradients", "optimizer"):
        assert getattr(fsdp, bucket) == math.ceil(getattr(one, bucket) / 8)
    assert (fsdp.activations, fsdp.logits) == (one.activations, one.logits)  # per micro-batch on every rank
    # weights: 1/8 of everything, plus 7/8 of what is gathered while computing: embeddings + head + final norm
    # (the root group) and two of the 32 identical blocks
    h, v = LLAMA_3_8B.hidden_size, LLAMA_3_8B.vocab_size
    root = 2 * (2 * v * h) + 2 * h
    block = (one.weights - root) / 32
    assert fsdp.weights == math.ceil(one.weights / 8 + (root + 2 * block) * 7 / 8)
    assert one.weights / 8 < fsdp.weights < one.weights / 2


def test_the_fsdp_weight_share_counts_a_tied_head_once():
    tied = ModelShape(name="tied", hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                      head_dim=16, vocab_size=1000, tie_word_embeddings=True)
    full = estimate_memory(tied, "lora", precision="fp32").weights
    root = 4 * (1000 * 64 + 64)
    assert fsdp_weight_bytes(tied, "lora", 4, 2) == math.ceil(full / 2 + (root + 2 * (full - root) / 4) / 2)


def test_bad_parallel_settings_name_the_field():
    with pytest.raises(ConfigError, match="gpus=0"):
        estimate_memory(LLAMA_3_8B, gpus=0)
    with pytest.raises(ConfigError, match="strategy='zero3'"):
        estimate_memory(LLAMA_3_8B, gpus=2, strategy="zero3")


def test_cli_takes_gpus_and_strategy(tmp_path, capsys):
    build_tiny("llama").config.save_pretrained(tmp_path)
    assert main(["estimate-memory", "--model", str(tmp_path), "--method", "qlora", "--gpus", "4", "--strategy", "fsdp"]) == 0
    text = capsys.readouterr().out
    assert "per process of 4 (fsdp" in text and "a 1/4 shard" in text
    expected = estimate_memory(str(tmp_path), "qlora", gpus=4, strategy="fsdp")
    assert f"{expected.weights / GB:>10.3f} GB" in text
