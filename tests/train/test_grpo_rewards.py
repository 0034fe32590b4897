"""Reward functions: loading from a file or a module, calling with row fields, weights, and clear errors."""

from __future__ import annotations

import math

import pytest

from lorafit.config import ConfigError
from lorafit.data import DataError
from lorafit.run_config import RewardSpec
from lorafit.train.rewards import (
    RewardError,
    load_rewards,
    row_fields,
    score,
    weighted_total,
)

REWARDS = '''
calls = []

def exact(prompts, completions, answer, **fields):
    calls.append(len(completions))
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

def length(prompts, completions, **fields):
    return [len(c) for c in completions]

def boom(prompts, completions, **fields):
    raise KeyError("answer")

def short(prompts, completions, **fields):
    return [1.0]

def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)

def text(prompts, completions, **fields):
    return ["1"] * len(completions)

def scalar(prompts, completions, **fields):
    return 1.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_file_functions_are_called_with_row_fields_and_weighted(reward_file):
    functions = load_rewards([RewardSpec(f"{reward_file}:exact", 2.0), RewardSpec(f"{reward_file}:length", 0.5)])
    assert [f.name for f in functions] == ["exact", "length"]
    assert functions[0].fn.__module__ == functions[1].fn.__module__  # one import per file
    fields = row_fields([{"answer": 5}, {"answer": 7}, {"answer": 7, "extra": "x"}], ["a:1", "a:2", "a:3"])
    assert fields == {"answer": [5, 7, 7], "extra": [None, None, "x"]}
    scores = score(functions, ["q1", "q2", "q3"], ["5", " 8", "7 "], fields)
    assert scores == {"exact": [1.0, 0.0, 1.0], "length": [1.0, 2.0, 2.0]}
    assert weighted_total(functions, scores) == [2.5, 1.0, 3.0]


def test_module_path_functions_load():
    (function,) = load_rewards([RewardSpec("math:hypot")])
    assert function.fn is math.hypot and function.name == "hypot" and function.weight == 1.0


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{dir}/missing.py:exact", "reward file '{dir}/missing.py' does not exist"),
        ("{file}:absent", "has no function 'absent'; it defines boom, exact, length, nan, scalar, short, text"),
        ("{file}:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
        ("no_such_package_xyz.rewards:f", "cannot import 'no_such_package_xyz.rewards'"),
    ],
)
def test_loading_errors_name_the_file_and_function(reward_file, spec, needle):
    fill = {"dir": reward_file.parent, "file": reward_file}
    with pytest.raises(ConfigError) as err:
        load_rewards([RewardSpec(spec.format(**fill))])
    assert needle.format(**fill) in str(err.value)


def test_a_file_that_fails_to_import_is_named(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_xyz\n")
    with pytest.raises(ConfigError, match=r"broken.py' fails to import: ModuleNotFoundError"):
        load_rewards([RewardSpec(f"{broken}:f")])


def test_duplicate_names_are_refused(reward_file, tmp_path):
    other = tmp_path / "other.py"
    other.write_text("def exact(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match="two reward functions are named 'exact'"):
        load_rewards([RewardSpec(f"{reward_file}:exact"), RewardSpec(f"{other}:exact")])


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("boom", "reward function {file}:boom raised KeyError: 'answer'"),
        ("short", "reward function {file}:short returned 1 values for 2 completions"),
        ("nan", "reward function {file}:nan returned nan for completion 0 ('a')"),
        ("text", "reward function {file}:text returned '1' for completion 0"),
        ("scalar", "reward function {file}:scalar returned a float; it must return a list of 2 numbers"),
    ],
)
def test_bad_rewards_are_errors_naming_the_function(reward_file, name, needle):
    functions = load_rewards([RewardSpec(f"{reward_file}:{name}")])
    with pytest.raises(RewardError) as err:
        score(functions, ["p", "p"], ["a", "b"], {})
    assert needle.format(file=reward_file) in str(err.value)


def test_fields_named_like_the_arguments_are_refused():
    with pytest.raises(DataError, match="train.jsonl:2: a data field named 'completions'"):
        row_fields([{"answer": 1}, {"completions": 2}], ["train.jsonl:1", "train.jsonl:2"])
