"""Recommender: the YAML is a valid run config, each shift follows its rule, and the memory budget picks 4-bit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from lorafit.config import AdapterConfig, ConfigError, lora_scale, scale_warning
from lorafit.diagnose.checks import check_run_config
from lorafit.diagnose.memory import GB, estimate_memory
from lorafit.diagnose.model_shape import LLAMA_3_8B
from lorafit.diagnose.recommend import Recommendation, recommend
from lorafit.run_config import RunConfig, load_run_config

GRID = [(shift, examples) for shift in ("narrow", "moderate", "strong") for examples in (200, 5000, 50000)]


def load_as_run(rec: Recommendation, tmp_path) -> RunConfig:
    """The YAML with `model` and `data` added, through lorafit's own loader (unknown keys raise there)."""
    return load_yaml({**yaml.safe_load(rec.to_yaml()), "model": "smollm2-135m", "data": {"train": "train.jsonl"}}, tmp_path)


@pytest.mark.parametrize("shift, examples", GRID)
def test_yaml_is_a_valid_run_config_with_a_reason_per_key(shift, examples, tmp_path):
    rec = recommend("smollm2-135m", examples, shift)
    text = rec.to_yaml()
    assert yaml.safe_load(text) == rec.to_dict()
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and not line.endswith(":"):  # every value line, not headers
            assert "  # " in line and len(line.split("  # ", 1)[1]) > 10, line
    config = load_as_run(rec, tmp_path)
    assert dataclasses.asdict(config.adapter) | rec.to_dict()["adapter"] == dataclasses.asdict(config.adapter)
    assert check_run_config(config) == []  # lorafit's own pre-training checks find nothing to say


@pytest.mark.parametrize("shift, examples", GRID)
def test_each_shift_follows_its_rule(shift, examples):
    adapter = recommend("smollm2-135m", examples, shift).to_dict()["adapter"]
    r, alpha = adapter["r"], adapter["alpha"]
    low, high = {"narrow": (8, 16), "moderate": (16, 64), "strong": (64, 128)}[shift]
    assert low <= r <= high
    assert adapter["use_rslora"] is (r >= 32)  # rsLoRA from r 32 (and so always for a strong shift)
    assert adapter["target_modules"] == "all-linear"
    assert (16 <= alpha <= 32) if shift == "narrow" else alpha in (16, 32)
    assert adapter["init"] == "default" and adapter["use_dora"] is False
    assert scale_warning(AdapterConfig(r=r, alpha=alpha, use_rslora=adapter["use_rslora"])) is None
    assert 1 <= lora_scale(alpha, r, adapter["use_rslora"]) <= 3


def test_rank_grows_with_data_and_shift():
    ranks = {(s, n): recommend("m", n, s).to_dict()["adapter"]["r"] for s, n in GRID}
    for shift in ("narrow", "moderate", "strong"):
        assert ranks[(shift, 200)] <= ranks[(shift, 5000)] <= ranks[(shift, 50000)]
    for n in (200, 5000, 50000):
        assert ranks[("narrow", n)] <= ranks[("moderate", n)] <= ranks[("strong", n)]


def test_warmup_is_three_percent_of_the_steps():
    training = recommend("m", 5000, "moderate").to_dict()["training"]
    steps = math.ceil(5000 / training["batch_size"]) * training["epochs"]
    assert training["warmup_steps"] == round(0.03 * steps)


@pytest.mark.parametrize("shift", ["narrow", "moderate", "strong"])
def test_a_small_budget_picks_a_4bit_base_with_loftq(shift, tmp_path):
    lean16 = estimate_memory(LLAMA_3_8B, "lora", r=16, batch=1, seq=1024, grad_checkpointing=True, precision="bf16",
                             attention_mask=True).total / GB  # ~18 GB
    rec = recommend(LLAMA_3_8B, 5000, shift, memory_gb=lean16 - 2)
    values = rec.to_dict()
    assert values["quantize"] == "nf4" and values["dtype"] == "bfloat16"
    adapter = values["adapter"]
    assert 16 <= adapter["r"] <= 64 and 16 <= adapter["alpha"] <= 32 and adapter["init"] == "loftq"
    assert rec.memory.settings["method"] == "qlora" and rec.memory.total <= (lean16 - 2) * GB
    # quantize and init: loftq arrive with the QLoRA work: while lorafit's loader rejects them, they are checked
    # apart and the rest must load.
    raw = {**yaml.safe_load(rec.to_yaml()), "model": "m", "data": {"train": "t.jsonl"}}
    try:
        config = load_yaml(raw, tmp_path)
    except ConfigError as err:
        assert "quantize" in str(err) or "loftq" in str(err), err
        assert raw.pop("quantize") == "nf4" and raw["adapter"].pop("init") == "loftq"
        config = load_yaml(raw, tmp_path)
    assert config.adapter.r == adapter["r"]


def load_yaml(raw: dict, tmp_path) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_run_config(path)


def test_a_large_budget_keeps_16bit_and_the_largest_micro_batch_that_fits():
    rec = recommend(LLAMA_3_8B, 5000, "moderate", memory_gb=80)
    training = rec.to_dict()["training"]
    assert "quantize" not in rec.to_dict() and rec.memory.settings["method"] == "lora"
    micro = training["micro_batch_size"]
    assert rec.memory.total <= 80 * GB and training["batch_size"] % micro == 0
    if micro < training["batch_size"]:  # the next power of two would not fit
        bigger = estimate_memory(LLAMA_3_8B, "lora", r=rec.to_dict()["adapter"]["r"], batch=2 * micro, seq=1024,
                                 grad_checkpointing=training["gradient_checkpointing"], precision="bf16",
                                 attention_mask=True)
        assert bigger.total > 80 * GB


def test_a_budget_between_picks_checkpointing_only_when_needed():
    no_ckpt = estimate_memory(LLAMA_3_8B, "lora", r=32, batch=1, seq=1024, precision="bf16", attention_mask=True)
    rec = recommend(LLAMA_3_8B, 5000, "moderate", memory_gb=no_ckpt.total / GB - 0.5)  # fits only with checkpointing
    training = rec.to_dict()["training"]
    assert "quantize" not in rec.to_dict() and training["gradient_checkpointing"] is True


def test_an_impossible_budget_says_what_to_change():
    with pytest.raises(ConfigError, match="max_seq_len"):
        recommend(LLAMA_3_8B, 5000, "moderate", memory_gb=3)


@pytest.mark.parametrize("kwargs, field", [({"shift": "huge"}, "shift"), ({"examples": 0}, "examples"),
                                           ({"memory_gb": -1}, "memory_gb"), ({"seq_len": 0}, "seq_len")])
def test_bad_inputs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        recommend("m", **{"examples": 100, **kwargs})
