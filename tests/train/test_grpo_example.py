"""The GRPO arithmetic example: its data generator, its reward functions and its YAML files."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from lorafit.run_config import load_run_config
from lorafit.train.rewards import load_rewards, row_fields, score

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def make():
    spec = importlib.util.spec_from_file_location("make_arithmetic", EXAMPLES / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def question(row: dict) -> tuple[int, str, int]:
    a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["messages"][1]["content"]).groups()
    return int(a), op, int(b)


def test_generator_is_seeded_disjoint_and_correct(make):
    train, eval_rows, sft = make.generate(0, 300, 100, 32)
    assert make.generate(0, 300, 100, 32) == (train, eval_rows, sft)
    assert make.generate(1, 300, 100, 32) != (train, eval_rows, sft)
    splits = [{question(r) for r in rows} for rows in (train, eval_rows, sft)]
    assert [len(s) for s in splits] == [300, 100, 32]  # no repeats inside a split
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    for row in train + eval_rows:
        a, op, b = question(row)
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == (a + b if op == "+" else a - b) >= 0
    assert {op for _, op, _ in splits[0]} == {"+", "-"}
    assert all(row["messages"][2]["content"] == f"<answer>{make.result(question(row))}</answer>" for row in sft)


def test_shipped_data_is_what_the_generator_writes(make):
    train, eval_rows, sft = make.generate(0, 1000, 100, 32)
    for name, rows in (("train", train), ("eval", eval_rows), ("sft", sft)):
        shipped = (EXAMPLES / "data" / f"arithmetic_{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in shipped] == rows, name


def test_rewards_on_hand_made_replies():
    config = load_run_config(EXAMPLES / "grpo_arithmetic.yaml")
    functions = load_rewards(config.rewards)
    replies = ["<answer>85</answer>", " <answer> 85 </answer>\n", "The sum is <answer>85</answer>.",
               "<answer>84</answer>", "85", "<answer>85</answer> or <answer>84</answer>", "<answer>-3</answer>"]
    answers = [85, 85, 85, 85, 85, 84, -3]
    scores = score(functions, ["q"] * 7, replies, row_fields([{"answer": a} for a in answers], ["x"] * 7))
    assert scores["format_reward"] == [1.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert scores["correct_reward"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # the first tag counts


def test_example_configs_load():
    grpo = load_run_config(EXAMPLES / "grpo_arithmetic.yaml")
    assert grpo.method == "grpo" and grpo.init_adapter == "runs/arithmetic_sft/adapter"
    assert (grpo.grpo.num_generations, grpo.grpo.max_new_tokens, grpo.grpo.temperature, grpo.grpo.beta,
            grpo.grpo.epsilon) == (4, 64, 0.9, 0.04, 0.2)
    sft = load_run_config(EXAMPLES / "arithmetic_sft.yaml")
    assert sft.method == "sft" and sft.output_dir + "/adapter" == grpo.init_adapter
    for path in (EXAMPLES / "grpo_arithmetic.yaml", EXAMPLES / "arithmetic_sft.yaml"):
        for line in path.read_text().splitlines():  # every key carries a comment (litgpt style)
            if re.match(r"\s*(-\s*)?[\w./]+:", line):
                assert "#" in line, f"{path.name}: {line}"
