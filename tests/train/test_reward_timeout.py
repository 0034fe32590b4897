"""Reward functions run under grpo.reward_timeout_s: a hanging one stops the run with an error naming it."""

from __future__ import annotations

import time

import pytest

from lorafit.cli import main
from lorafit.config import ConfigError
from lorafit.errors import UserError
from lorafit.run_config import RewardSpec, load_run_config
from lorafit.run_dir import RunDir
from lorafit.train.rewards import RewardError, load_rewards, score

REWARDS = '''
import sys
import time

def hang(prompts, completions, **fields):
    time.sleep(30)
    return [0.0] * len(completions)

def slow(prompts, completions, **fields):
    time.sleep(0.05)
    return [1.0] * len(completions)

def leaves(prompts, completions, **fields):
    sys.exit(3)

def infinite(prompts, completions, **fields):
    return [float("inf")] * len(completions)

def none(prompts, completions, **fields):
    return [None] * len(completions)
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "hanging.py"
    path.write_text(REWARDS)
    return path


def test_a_hanging_reward_stops_with_the_function_and_timeout_named(reward_file):
    (function,) = load_rewards([RewardSpec(f"{reward_file}:hang")], timeout_s=0.3)
    clock = time.perf_counter()
    with pytest.raises(RewardError) as err:
        score([function], ["p", "p"], ["a", "b"], {})
    waited = time.perf_counter() - clock
    assert 0.3 <= waited < 10  # the timeout, not the function's 30 s (generous upper bound: a shared, busy CPU)
    message = str(err.value)
    assert f"reward function {reward_file}:hang did not return within 0.3 s (grpo.reward_timeout_s=0.3)" in message
    assert "grpo.reward_timeout_s=120" in message  # how to allow more time
    assert isinstance(err.value, UserError)


def test_a_reward_within_its_timeout_is_scored(reward_file):
    (function,) = load_rewards([RewardSpec(f"{reward_file}:slow")], timeout_s=5)
    assert score([function], ["p"], ["a"], {}) == {"slow": [1.0]}


@pytest.mark.parametrize(("name", "needle"), [
    ("leaves", "reward function {file}:leaves raised SystemExit: 3"),
    ("infinite", "reward function {file}:infinite returned inf for completion 0"),
    ("none", "reward function {file}:none returned None for completion 0"),
])
def test_bad_reward_outputs_name_the_function(reward_file, name, needle):
    (function,) = load_rewards([RewardSpec(f"{reward_file}:{name}")])
    with pytest.raises(RewardError) as err:
        score([function], ["p"], ["a"], {})
    assert needle.format(file=reward_file) in str(err.value)


@pytest.mark.parametrize("value", ["0", "-1", ".inf", "'soon'"])
def test_reward_timeout_must_be_a_positive_number(tiny_run, value):
    with pytest.raises(ConfigError, match=r"grpo.reward_timeout_s"):
        load_run_config(tiny_run / "run.yaml", ["method=grpo", f"rewards=[{tiny_run / 'x.py'}:f]",
                                                f"grpo.reward_timeout_s={value}"])


def test_the_default_timeout_is_60_s(tiny_run):
    config = load_run_config(tiny_run / "run.yaml", ["method=grpo", "rewards=[math:hypot]"])
    assert config.grpo.reward_timeout_s == 60.0


def test_cli_run_with_a_hanging_reward_ends_in_one_line(tiny_run, reward_file, tmp_path, capsys):
    out = tmp_path / "hang_run"
    code = main(["train", str(tiny_run / "run.yaml"), f"output_dir={out}", "method=grpo",
                 f"rewards=[{reward_file}:hang]", "grpo.reward_timeout_s=0.5", "grpo.num_generations=2",
                 "grpo.max_new_tokens=2", "training.max_steps=2", "training.save_every=0",
                 "evaluation.generation=false", "evaluation.every=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lorafit train: error: reward function ")
    assert f"{reward_file}:hang did not return within 0.5 s" in err
    assert RunDir(out).list_checkpoints() == []
