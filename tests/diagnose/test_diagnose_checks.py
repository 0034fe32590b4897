"""Config checks: each finding appears exactly when its condition holds, with numbers from the formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny

from lorafit.adapters.targets import TargetError
from lorafit.config import AdapterConfig
from lorafit.diagnose.checks import (
    LR_SCALE_HIGH,
    Check,
    check_run_config,
    format_checks,
)
from lorafit.run_config import DataConfig, RunConfig, TrainingConfig, load_run_config

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def run_config(lr: float = 2e-4, **adapter) -> RunConfig:
    return RunConfig(model="tiny", adapter=AdapterConfig(**adapter), data=DataConfig(train="t.jsonl"),
                     training=TrainingConfig(lr=lr))


def codes(checks: list[Check]) -> list[str]:
    return [c.code for c in checks]


def test_the_quickstart_has_no_findings():
    # r=16, alpha=32 (scale 2), lr 1e-3 (lr*scale = 2e-3, at the threshold), all-linear: nothing to say.
    assert check_run_config(load_run_config(QUICKSTART)) == []


def test_small_scale_warns_with_the_fix_including_rslora_at_high_rank():
    (check,) = check_run_config(run_config(r=64, alpha=16))
    assert (check.level, check.code) == ("warning", "scale_out_of_range")
    assert "0.25" in check.message  # 16 / 64
    assert "raise alpha to at least 32" in check.fix  # 0.5 * 64
    assert "use_rslora=True (scale 2.00)" in check.fix  # 16 / sqrt(64)


def test_large_scale_warns_with_lower_alpha():
    (check,) = check_run_config(run_config(lr=5e-5, r=4, alpha=64))  # lr*scale 8e-4: no lr warning
    assert check.code == "scale_out_of_range" and "16" in check.message and "lower alpha to at most 16" in check.fix


def test_rslora_is_suggested_from_rank_32_even_when_the_scale_is_healthy():
    (check,) = check_run_config(run_config(r=64, alpha=128))
    assert (check.level, check.code) == ("info", "rslora_recommended")
    # the same scale 2 under alpha/sqrt(r) needs alpha = 2 * sqrt(64) = 16
    assert "adapter.alpha: 16 " in check.fix and "same scale 2 " in check.fix
    assert check_run_config(run_config(r=16, alpha=32)) == []
    assert check_run_config(run_config(r=64, alpha=16, use_rslora=True)) == []  # scale 16/8 = 2


@pytest.mark.parametrize(("lr", "alpha", "flagged"), [(2e-3, 32, True), (1e-3, 32, False), (6e-4, 64, True),
                                                      (2e-4, 64, False)])
def test_lr_times_scale_threshold(lr, alpha, flagged):
    checks = check_run_config(run_config(lr=lr, r=16, alpha=alpha))
    assert ("lr_scale_high" in codes(checks)) is flagged
    if flagged:
        (check,) = checks
        scale = alpha / 16
        assert f"{lr * scale:.3g}" in check.message
        assert f"lower training.lr to {LR_SCALE_HIGH / scale:.2g}" in check.fix


@pytest.mark.parametrize(
    ("targets", "exclude", "flagged"),
    [
        ("attention", None, True),
        (["q_proj", "v_proj"], None, True),
        (r".*\.(q|k|v|o)_proj", None, True),
        (["c_attn"], None, True),
        ("all-linear", r".*(mlp|moe).*", True),
        ("all-linear", None, False),
        ("mlp", None, False),
        (["q_proj", "down_proj"], None, False),
        (r".*mlp.*", None, False),
        (["c_fc"], None, False),
    ],
)
def test_targets_without_mlp_are_a_risk(targets, exclude, flagged):
    checks = check_run_config(run_config(target_modules=targets, exclude_modules=exclude))
    assert codes(checks) == (["targets_miss_mlp"] if flagged else [])


@pytest.mark.parametrize(
    ("arch", "targets", "exclude", "flagged"),
    [
        ("llama", ["q_proj", "v_proj"], None, True),
        ("llama", "all-linear", r".*mlp.*", True),
        ("llama", ["down_proj"], None, False),
        ("gpt2", ["c_attn"], None, True),
        ("gpt2", ["c_fc"], None, False),
    ],
)
def test_targets_are_resolved_on_a_model_when_given(arch, targets, exclude, flagged):
    checks = check_run_config(run_config(target_modules=targets, exclude_modules=exclude), model=build_tiny(arch))
    assert ("targets_miss_mlp" in codes(checks)) is flagged


def test_the_model_decides_where_typical_names_cannot():
    # every layer of block 1: the typical names (block 0) miss it, the model's own names show its MLP
    config = run_config(target_modules=r".*layers\.1\..*_proj")
    assert codes(check_run_config(config)) == ["targets_miss_mlp"]
    assert check_run_config(config, model=build_tiny("llama")) == []


def test_a_target_matching_nothing_in_the_model_raises():
    with pytest.raises(TargetError, match="matches no layer"):
        check_run_config(run_config(target_modules=["nope_proj"]), model=build_tiny("llama"))


def test_quantised_base_without_loftq_suggests_loftq():
    config = run_config()
    assert check_run_config(config) == []
    config.quantize = "nf4"  # the top-level key the QLoRA work adds
    (check,) = check_run_config(config)
    assert (check.level, check.code) == ("info", "quantized_without_loftq") and "loftq" in check.fix
    config.adapter.init = "loftq"  # set past validation: AdapterConfig learns loftq with the QLoRA work
    assert check_run_config(config) == []


def test_dora_is_suggested_after_an_early_plateau():
    plateau = {"pattern": "early_plateau", "evidence": {"plateau_step": 40, "loss": 1.2}, "advice": "..."}
    other = {"pattern": "overfitting", "evidence": {}, "advice": "..."}
    assert check_run_config(run_config(), [other]) == []
    (check,) = check_run_config(run_config(), [other, plateau])
    assert (check.level, check.code) == ("info", "dora_suggested")
    assert "plateau_step=40" in check.message and "use_dora: true" in check.fix
    assert check_run_config(run_config(use_dora=True), [plateau]) == []


def test_a_run_from_a_saved_adapter_is_checked_with_that_adapter(tmp_path):
    saved = {"peft_type": "LORA", "r": 64, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    config = RunConfig(model="tiny", init_adapter=str(tmp_path), data=DataConfig(train="t.jsonl"))
    assert codes(check_run_config(config)) == ["scale_out_of_range", "targets_miss_mlp"]  # 16/64; attention only


def test_format_puts_warnings_first_and_says_when_clean():
    info = Check("info", "a", "m1.", "f1.")
    warning = Check("warning", "b", "m2.", "f2.")
    text = format_checks([info, warning])
    assert text.index("warning: m2. Fix: f2. [b]") < text.index("info: m1. Fix: f1. [a]")
    assert format_checks([]) == "config checks: no issues found"
