"""Run-config keys of GRPO: method, rewards (strings or mappings), the grpo section, init_adapter; errors name keys."""

from __future__ import annotations

import pytest

from lorafit.config import ConfigError
from lorafit.run_config import GRPOConfig, RewardSpec, load_run_config, to_dict

BASE = """
model: tiny
method: grpo
data: {train: prompts.jsonl}
rewards: [my_rewards.py:correct, {function: my_rewards.py:fmt, weight: 0.5}, pkg.module:score]
grpo: {num_generations: 8, beta: 0.0}
"""


def write(tmp_path, text=BASE):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_rewards_and_grpo_section_load(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("")
    monkeypatch.chdir("/")
    config = load_run_config(write(tmp_path))
    assert config.method == "grpo"
    assert config.rewards == [RewardSpec(f"{tmp_path}/my_rewards.py:correct", 1.0),  # found beside the YAML
                              RewardSpec(f"{tmp_path}/my_rewards.py:fmt", 0.5),
                              RewardSpec("pkg.module:score", 1.0)]  # module paths are left to the import system
    assert config.grpo == GRPOConfig(num_generations=8, beta=0.0)
    assert config.grpo.temperature == 0.9 and config.grpo.epsilon == 0.2 and config.grpo.scale_rewards is True
    assert to_dict(config)["rewards"][1] == {"function": f"{tmp_path}/my_rewards.py:fmt", "weight": 0.5}


def test_sft_is_the_default_method(tmp_path):
    config = load_run_config(write(tmp_path, "model: tiny\ndata: {train: t.jsonl}\n"))
    assert config.method == "sft" and config.rewards == [] and config.init_adapter is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method=ppo", "method='ppo': use one of sft, grpo"),
        ("rewards=[]", "method grpo needs rewards"),
        ("rewards=my_rewards.py:correct", "rewards='my_rewards.py:correct' should be list"),
        ("rewards=[correct]", "rewards[0]='correct' must look like 'file.py:function'"),
        ("rewards=[3]", "rewards[0]=3 must be 'file.py:function'"),
        ("rewards=[{function: a.py:f, wieght: 2}]", "unknown key 'rewards[0].wieght'; did you mean 'weight'?"),
        ("rewards=[{function: a.py:f, weight: .nan}]", "rewards[0].weight=nan must be a finite number"),
        ("grpo.num_generations=1", "grpo.num_generations=1 must be at least 2"),
        ("grpo.temperature=0", "grpo.temperature=0.0 must be positive"),
        ("grpo.top_p=1.5", "grpo.top_p=1.5 must lie in (0, 1]"),
        ("grpo.beta=-0.1", "grpo.beta=-0.1 must be >= 0"),
        ("grpo.epsilon=1.0", "grpo.epsilon=1.0 must be below 1"),
        ("grpo.num_iterations=0", "grpo.num_iterations=0 must be positive"),
        ("grpo.num_generation=4", "unknown key 'grpo.num_generation'; did you mean 'num_generations'?"),
        ("method=sft", "rewards and the grpo section apply to method: grpo only"),
    ],
)
def test_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path), [override])
    assert needle in str(err.value) and "run.yaml" in str(err.value)


def test_init_adapter_excludes_an_adapter_section(tmp_path):
    (tmp_path / "sft_adapter").mkdir()
    config = load_run_config(write(tmp_path), ["init_adapter=sft_adapter"])
    assert config.init_adapter == str(tmp_path / "sft_adapter")
    with pytest.raises(ConfigError, match="set either adapter .* or init_adapter"):
        load_run_config(write(tmp_path), ["init_adapter=sft_adapter", "adapter.r=4"])
