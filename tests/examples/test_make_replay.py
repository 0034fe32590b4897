"""Tests for examples/make_replay.py and its committed output examples/data/general_replay.jsonl (the script is
loaded from its path: examples/ is not a package)."""

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from example_scripts import load_example
import torch
from tiny_models import save_tiny_chat_llama, tiny_chat_tokenizer
from transformers import LlamaForCausalLM

from lorafit.data.chat import build_prompt_ids
from lorafit.data.sources import read_examples
from lorafit.evaluation.forgetting import general_prompts
from lorafit.evaluation.generate import generate_ids

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "make_replay.py"
PROMPTS = EXAMPLES / "data" / "replay_prompts.jsonl"
REPLAY = EXAMPLES / "data" / "general_replay.jsonl"

# what the quickstart's own task looks like: none of it may appear in the general replay rows
TASK_WORDS = re.compile(r"\b(json|orders?|ship(ping|ped)?|deliver(y|ed)?|extract(ion)?|quantity)\b", re.IGNORECASE)
TASK_KEYS = re.compile(r'"(item|color|quantity|city)"\s*:')


@pytest.fixture(scope="module")
def mr() -> ModuleType:
    return load_example("make_replay")


def _normalised(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces: 'What's 7x8?' and 'whats 7x8' compare equal."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower().replace("'", "")).split())


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in REPLAY.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prompts(mr: ModuleType) -> list[str]:
    return mr.read_prompts(PROMPTS)


def test_committed_rows_are_user_then_assistant_with_text(rows: list[dict]) -> None:
    assert len(rows) >= 120
    assert len(read_examples(REPLAY)) == len(rows)  # the training data reader accepts every row
    for row in rows:
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        for message in row["messages"]:
            assert list(message) == ["role", "content"]
            assert isinstance(message["content"], str) and message["content"].strip() == message["content"] != ""


def test_committed_rows_answer_the_prompts_file_in_its_order(rows: list[dict], prompts: list[str]) -> None:
    users = [row["messages"][0]["content"] for row in rows]
    positions = [prompts.index(user) for user in users]  # ValueError: a row whose prompt is not in the file
    assert positions == sorted(set(positions))


def test_prompts_are_distinct_and_disjoint_from_the_forgetting_prompts(prompts: list[str]) -> None:
    ours = [_normalised(p) for p in prompts]
    assert len(set(ours)) == len(ours)
    forgetting = general_prompts()
    assert len(forgetting) >= 100  # the shipped set, not an empty read
    assert not set(prompts) & set(forgetting)
    assert not set(ours) & {_normalised(p) for p in forgetting}


def test_normalisation_catches_case_and_punctuation_variants() -> None:
    assert _normalised("What's the capital of Canada?") == _normalised("whats the Capital of canada")
    assert _normalised("What is 7 times 8?") != _normalised("What is 7 times 9?")


def test_no_row_is_about_the_order_extraction_task(rows: list[dict], prompts: list[str]) -> None:
    assert not [p for p in prompts if TASK_WORDS.search(p)]
    replies = [row["messages"][1]["content"] for row in rows]
    assert not [r for r in replies if TASK_KEYS.search(r) or re.search(r"\bjson\b", r, re.IGNORECASE)]
    assert TASK_WORDS.search("Ship 3 red mugs to Oslo") and TASK_KEYS.search('{"item": "mug"}')  # the checks bite


def _tiny_model_folder(folder: Path) -> Path:
    """The tiny ChatML Llama with a sharpened head (x10) and its end-of-turn logit raised further (x1.5), so that
    some greedy replies end within a few tokens and others run on."""
    save_tiny_chat_llama(folder, head_scale=10.0)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[tiny_chat_tokenizer().eos_token_id] *= 1.5
    model.save_pretrained(folder)
    return folder


TINY_PROMPTS = ["Hello!", "What is the capital of France?", "Tell me a joke about cats.",
                "Write a short poem about the sea.", "The quick brown fox.", "How can I help you today?",
                "system user assistant", "Cats sleep all day.", "Paris", "wind and waves"]


def test_script_keeps_exactly_the_replies_that_ended_and_repeats_itself(mr: ModuleType, tmp_path: Path) -> None:
    folder = _tiny_model_folder(tmp_path / "model")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"kind": "test", "prompt": p}) + "\n" for p in TINY_PROMPTS))
    outputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outputs:
        mr.main(["--model", str(folder), "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "12",
                 "--batch-size", "4", "--device", "cpu"])
    assert outputs[0].read_bytes() == outputs[1].read_bytes()

    # reference: the same greedy generation, one prompt at a time (no padding), ended = last token is <|im_end|>
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = tiny_chat_tokenizer()
    expected = []
    for prompt in TINY_PROMPTS:
        [ids] = generate_ids(model, tokenizer, [build_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])],
                             max_new_tokens=12)
        if ids[-1] == tokenizer.eos_token_id:
            expected.append((prompt, tokenizer.decode(ids, skip_special_tokens=True).strip()))
    assert 0 < len(expected) < len(TINY_PROMPTS)  # both kinds occur, so the filter is exercised
    written = [json.loads(line)["messages"] for line in outputs[0].read_text().splitlines()]
    assert [(m[0]["content"], m[1]["content"]) for m in written] == expected
    assert all(reply for _, reply in expected)


@pytest.mark.parametrize("line", ["not json", '["a list"]', '{"prompt": ""}', '{"text": "no prompt field"}'])
def test_a_bad_prompts_line_is_named(mr: ModuleType, tmp_path: Path, line: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello!"}\n' + line + "\n")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}:2: "):
        mr.read_prompts(path)
