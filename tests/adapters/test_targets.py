"""Target selection: shorthands, PEFT's list (dot-suffix) and regex (fullmatch) rules, clear errors."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny
from torch import nn

from lorafit.adapters.targets import (
    TargetError,
    minimal_suffixes,
    name_matches,
    select_targets,
)

LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def names(arch_leaves, layers=2, prefix="model.layers"):
    return sorted(f"{prefix}.{i}.{leaf}" for i in range(layers) for leaf in arch_leaves)


def test_all_linear_is_every_block_linear_but_never_the_head():
    model = build_tiny("llama")
    assert sorted(select_targets(model, "all-linear")) == names(LLAMA_BLOCK)


def test_all_linear_excludes_a_tied_head_too():
    model = build_tiny("gpt2")  # lm_head is tied to wte
    chosen = select_targets(model, "all-linear")
    assert "lm_head" not in chosen
    assert sorted(chosen) == names(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], prefix="transformer.h")


def test_attention_and_mlp_shorthands():
    model = build_tiny("llama")
    assert sorted(select_targets(model, "attention")) == names(LLAMA_BLOCK[:4])
    assert sorted(select_targets(model, "mlp")) == names(LLAMA_BLOCK[4:])
    gpt2 = build_tiny("gpt2")
    assert sorted(select_targets(gpt2, "mlp")) == names(["mlp.c_fc", "mlp.c_proj"], prefix="transformer.h")


def test_list_matches_whole_dotted_suffixes_only():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    model = build_tiny("llama")
    assert sorted(select_targets(model, ["q_proj", "down_proj"])) == names(["self_attn.q_proj", "mlp.down_proj"])


def test_regex_is_a_full_match():
    model = build_tiny("llama")
    assert select_targets(model, r".*\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError):
        select_targets(model, "q_proj")  # fullmatch: a bare leaf name as a *string* matches nothing


def test_exclude_modules():
    model = build_tiny("llama")
    chosen = select_targets(model, "all-linear", exclude_modules=["o_proj", "down_proj"])
    assert sorted(chosen) == names(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "mlp.gate_proj", "mlp.up_proj"])


def test_no_match_lists_the_layers_the_model_has():
    model = build_tiny("llama")
    with pytest.raises(TargetError) as err:
        select_targets(model, ["query_key_value"])
    message = str(err.value)
    assert "query_key_value" in message and "q_proj (x2)" in message and "down_proj" in message


def test_matching_a_non_linear_module_is_an_error():
    model = build_tiny("llama")
    with pytest.raises(TargetError, match="LlamaMLP"):
        select_targets(model, ["mlp"])


def test_minimal_suffixes_separate_targets_from_other_modules():
    gpt2 = build_tiny("gpt2")
    attention = select_targets(gpt2, "attention")
    suffixes = minimal_suffixes(gpt2, attention)
    assert suffixes == ["attn.c_proj", "c_attn"]  # "c_proj" alone would also hit mlp.c_proj
    reselected = [n for n, _ in gpt2.named_modules() if n and name_matches(n, suffixes)]
    assert sorted(reselected) == sorted(attention)
    llama = build_tiny("llama")
    assert minimal_suffixes(llama, select_targets(llama, "all-linear")) == sorted(x.split(".")[1] for x in LLAMA_BLOCK)


def test_custom_module_without_head():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert select_targets(model, "all-linear") == ["0", "2"]
