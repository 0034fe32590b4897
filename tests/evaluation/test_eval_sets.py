"""Named eval sets: accuracy and binomial standard error against references the model is known to match."""

from __future__ import annotations

import json
import math

import pytest
from tiny_chat import tiny_chat_model

from lorafit.cli import main
from lorafit.data import DataError
from lorafit.evaluation.eval_sets import (
    binomial_stderr,
    evaluate_set,
    evaluate_sets,
    format_results,
    read_eval_set,
)
from lorafit.evaluation.generate import generate_responses

QUESTIONS = ["What is the capital of France?", "Tell me a joke about cats.", "Write a short poem about the sea.",
             "Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog."]


def write_set(path, model, tokenizer, wrong: set[int]):
    """A chat file whose references are the model's own greedy replies (one prompt at a time), except the rows in
    `wrong`, whose reference is a string the model does not produce."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    replies = [generate_responses(model, tokenizer, [chat], max_new_tokens=6, batch_size=1)[0] for chat in chats]
    assert all(replies), "the tiny model must say something"
    rows = [{"messages": chat + [{"role": "assistant", "content": "NOT THIS" if i in wrong else reply}]}
            for i, (chat, reply) in enumerate(zip(chats, replies))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_binomial_stderr():
    assert binomial_stderr(57, 60) == pytest.approx(math.sqrt(0.95 * 0.05 / 60))
    assert binomial_stderr(0, 10) == 0 and binomial_stderr(10, 10) == 0
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            binomial_stderr(*bad)


def test_evaluate_set_scores_batched_replies(tmp_path):
    model, tokenizer = tiny_chat_model()
    path = write_set(tmp_path / "set.jsonl", model, tokenizer, wrong={1, 3})
    result = evaluate_set(model, tokenizer, read_eval_set(path), "exact", max_new_tokens=6, batch_size=4)
    assert (result["correct"], result["total"], result["accuracy"]) == (3, 5, 0.6)
    assert result["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert result["samples"][1]["reference"] == "NOT THIS" and result["samples"][0]["prompt"] == QUESTIONS[0]
    assert read_eval_set(path, limit=2)[1].messages[0]["content"] == QUESTIONS[1]


def test_evaluate_sets_and_table(tmp_path):
    model, tokenizer = tiny_chat_model()
    a = write_set(tmp_path / "a.jsonl", model, tokenizer, wrong=set())
    b = write_set(tmp_path / "b.jsonl", model, tokenizer, wrong={0, 1, 2, 3, 4})
    results = evaluate_sets(model, tokenizer, {"in_distribution": (a, "exact"), "out_of_distribution": (b, "contains")},
                            limit=4, max_new_tokens=6)
    assert list(results) == ["in_distribution", "out_of_distribution"]
    assert results["in_distribution"]["accuracy"] == 1.0 and results["in_distribution"]["total"] == 4
    assert results["out_of_distribution"]["correct"] == 0 and results["out_of_distribution"]["path"] == str(b)
    table = format_results(results, before={"in_distribution": results["out_of_distribution"]})
    assert "100.0% +- 0.0%" in table and "n/a" in table


def test_bad_eval_files(tmp_path):
    prompt_only = tmp_path / "p.jsonl"
    prompt_only.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"},
                                                    {"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: an eval row must be a chat that ends with the assistant"):
        read_eval_set(prompt_only)
    with pytest.raises(ValueError, match="limit=0"):
        read_eval_set(prompt_only, limit=0)
    model, tokenizer = tiny_chat_model()
    with pytest.raises(ValueError, match="unknown metric 'fuzzy'"):
        evaluate_sets(model, tokenizer, {"x": (write_set(tmp_path / "s.jsonl", model, tokenizer, set()), "fuzzy")})


def test_cli_eval(tiny_folders, tmp_path, capsys):
    model_dir, adapter_dir = tiny_folders
    model, tokenizer = tiny_chat_model()
    path = write_set(tmp_path / "set.jsonl", model, tokenizer, wrong={4})
    assert main(["eval", "--model", str(model_dir), "--data", str(path), "--metric", "exact", "--max-new-tokens", "6",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["correct"], result["total"]) == (4, 5)
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--data", str(path),
                 "--limit", "2", "--max-new-tokens", "6"]) == 0
    assert "exact match " in (out := capsys.readouterr().out) and "/2 = " in out and "+- " in out
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
