"""Run-config keys of DPO: method dpo and the dpo section, validated before any weight loads; errors name keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.config import ConfigError
from lorafit.run_config import DPOConfig, load_run_config, to_dict

BASE = """
model: tiny
method: dpo
data: {train: prefs.jsonl, eval: prefs_eval.jsonl}
dpo: {beta: 0.2, loss: sigmoid, label_smoothing: 0.1, precompute_reference: true}
"""


def write(tmp_path, text=BASE):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_dpo_section_loads_with_trl_defaults(tmp_path):
    config = load_run_config(write(tmp_path))
    assert config.method == "dpo"
    assert config.dpo == DPOConfig(beta=0.2, loss="sigmoid", label_smoothing=0.1, precompute_reference=True)
    assert to_dict(config)["dpo"] == {"beta": 0.2, "loss": "sigmoid", "label_smoothing": 0.1,
                                      "precompute_reference": True}
    defaults = load_run_config(write(tmp_path, "model: tiny\nmethod: dpo\ndata: {train: p.jsonl}\n")).dpo
    assert defaults == DPOConfig(beta=0.1, loss="sigmoid", label_smoothing=0.0, precompute_reference=False)
    ipo = load_run_config(write(tmp_path), ["dpo.loss=ipo", "dpo.label_smoothing=0"]).dpo
    assert ipo.loss == "ipo"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dpo.beta=0", "dpo.beta=0.0 must be positive"),
        ("dpo.beta=-1", "dpo.beta=-1.0 must be positive"),
        ("dpo.beta=.inf", "dpo.beta=inf must be positive"),
        ("dpo.loss=hinge", "dpo.loss='hinge': use one of sigmoid, ipo"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5 must lie in [0, 0.5)"),
        ("dpo.label_smoothing=-0.1", "dpo.label_smoothing=-0.1 must lie in [0, 0.5)"),
        ("dpo.loss=ipo", "dpo.label_smoothing=0.1 applies to loss: sigmoid only"),
        ("dpo.precompute_reference=maybe", "dpo.precompute_reference='maybe' should be bool"),
        ("dpo.betta=0.1", "unknown key 'dpo.betta'; did you mean 'beta'?"),
        ("method=sft", "the dpo section applies to method: dpo only"),
        ("rewards=[a.py:f]", "rewards and the grpo section apply to method: grpo only"),
    ],
)
def test_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path), [override])
    assert needle in str(err.value) and "run.yaml" in str(err.value)


def test_the_dpo_example_config_loads():
    root = Path(__file__).resolve().parents[2]
    config = load_run_config(root / "examples" / "dpo_short_answers.yaml")
    assert config.method == "dpo" and config.dpo == DPOConfig()
    assert (root / config.data.train).is_file() and (root / config.data.eval).is_file()
