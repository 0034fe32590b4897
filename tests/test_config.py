"""AdapterConfig validation and the scale formula."""

from __future__ import annotations

import math

import pytest

from lorafit.config import AdapterConfig, ConfigError, lora_scale, scale_warning


def test_scale_formula():
    assert lora_scale(32, 16, False) == 2.0
    assert lora_scale(32, 16, True) == 8.0
    assert math.isclose(lora_scale(16, 64, True), 2.0)
    assert AdapterConfig(r=8, alpha=16, use_rslora=True).scale == pytest.approx(16 / math.sqrt(8))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"r": 0}, "r=0"),
        ({"r": -2}, "r=-2"),
        ({"r": 2.5}, "r=2.5"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": -1}, "alpha=-1"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"bias": "some"}, "bias='some'"),
        ({"init": "xavier"}, "init='xavier'"),
        ({"target_modules": []}, "target_modules=[]"),
        ({"target_modules": "("}, "not a valid regex"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0"),
    ],
)
def test_bad_values_name_the_field(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        AdapterConfig(**kwargs)
    assert needle in str(err.value)


def test_scale_warning_says_what_to_change():
    assert scale_warning(AdapterConfig(r=16, alpha=32)) is None
    low = scale_warning(AdapterConfig(r=64, alpha=16))
    assert "0.25" in low and "raise alpha to at least 32" in low and "use_rslora" in low
    high = scale_warning(AdapterConfig(r=4, alpha=64))
    assert "16" in high and "lower alpha to at most 16" in high
    assert scale_warning(AdapterConfig(r=64, alpha=16, use_rslora=True)) is None  # 16/8 = 2


def test_rank_pattern_lookup_follows_peft():
    config = AdapterConfig(r=8, alpha=16, rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.0\..*": 2})
    assert config.rank_and_alpha("model.layers.3.mlp.down_proj") == (4, 16)
    assert config.rank_and_alpha("model.layers.0.self_attn.q_proj") == (8, 2)
    assert config.rank_and_alpha("model.layers.1.mlp.xdown_proj") == (8, 16)
