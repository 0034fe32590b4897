"""Score a model (with or without its adapter) on named chat eval sets: greedy replies against reference answers.

An eval set is a file of chats whose final assistant turn is the reference answer (the training format), read by
lorafit.data. Several named sets (e.g. in_distribution, out_of_distribution) are scored the same way, so that a
run can show how far what it learned carries beyond the training distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafit.data import DataError, Example, read_examples
from lorafit.errors import UserError
from lorafit.evaluation.generate import generate_responses
from lorafit.evaluation.metrics import score

SHOWN_SAMPLES = 3  # replies kept per set for the console and the report


def binomial_stderr(correct: int, total: int) -> float:
    """Standard error of an accuracy measured on `total` independent items: sqrt(p (1 - p) / n).

    0 when p is 0 or 1 (the formula's known blind spot: 60/60 still leaves a few points of doubt).
    """
    if total <= 0:
        raise ValueError(f"total={total}: a standard error needs at least one scored item")
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must lie in [0, total={total}]")
    p = correct / total
    return math.sqrt(p * (1 - p) / total)


def read_eval_set(path: str | Path, limit: int | None = None) -> list[Example]:
    """The chats of an eval file (the first `limit` rows); each must end with the assistant's reference answer."""
    if limit is not None and limit <= 0:
        raise UserError(f"limit={limit} must be positive (or None for every row)")
    examples = read_examples(path)
    for example in examples:
        if example.messages is None or example.messages[-1]["role"] != "assistant":
            raise DataError(f"{example.source}: an eval row must be a chat that ends with the assistant's reference "
                            "answer. Fix: write it as {\"messages\": [..., {\"role\": \"assistant\", \"content\": "
                            "\"<expected answer>\"}]}.")
    return examples[:limit] if limit else examples


def evaluate_set(model: Any, tokenizer: Any, examples: list[Example], metric: str, *, max_new_tokens: int = 64,
                 batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Greedy replies to each chat (without its final assistant turn), scored against that turn by `metric`.

    Returns score()'s dict (metric, correct, total, accuracy) plus `stderr` (binomial) and the first few
    `samples` ({prompt, reply, reference}).
    """
    if not examples:
        raise UserError("the eval set holds no examples")
    references = [e.messages[-1]["content"] for e in examples]
    replies = generate_responses(model, tokenizer, [e.messages[:-1] for e in examples], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress)
    result = score(replies, references, metric)
    result["stderr"] = binomial_stderr(result["correct"], result["total"])
    result["samples"] = [{"prompt": _last_user_turn(e), "reply": reply, "reference": reference}
                         for e, reply, reference in list(zip(examples, replies, references))[:SHOWN_SAMPLES]]
    return result


def evaluate_sets(model: Any, tokenizer: Any, sets: Mapping[str, tuple[str | Path, str]], *,
                  limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 64,
                  progress: bool = False) -> dict[str, dict[str, Any]]:
    """Score every named set, {name: (file, metric)}, in the given order: {name: evaluate_set result + path}.

    All files are read before the first generation, so a bad row fails the call before any model time is spent.
    """
    loaded = {name: (str(path), metric, read_eval_set(path, limit)) for name, (path, metric) in sets.items()}
    results = {}
    for name, (path, metric, examples) in loaded.items():
        result = evaluate_set(model, tokenizer, examples, metric, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress)
        results[name] = {"path": path, **result}
    return results


def describe(result: Mapping[str, Any]) -> str:
    """'json match 57/60 = 95.0% +- 2.8%' (the +- is one binomial standard error)."""
    return (f"{result['metric']} match {result['correct']}/{result['total']} = {result['accuracy']:.1%} "
            f"+- {result['stderr']:.1%}")


def format_results(after: Mapping[str, Mapping[str, Any]],
                   before: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A table of the named sets: accuracy +- standard error, with a `before` column (e.g. the base model) if given."""
    width = max(len("eval set"), *(len(name) for name in after))
    lines = [f"{'eval set':<{width}}  {'metric':<8}{'n':>5}  " + (f"{'before':>16}  " if before else "") + "after"]
    for name, result in after.items():
        cells = [f"{name:<{width}}", f"{result['metric']:<8}{result['total']:>5}"]
        if before:
            previous = before.get(name)
            cells.append(f"{_accuracy(previous):>16}" if previous else f"{'n/a':>16}")
        cells.append(_accuracy(result))
        lines.append("  ".join(cells))
    lines.append("(+- one binomial standard error, sqrt(p(1-p)/n))")
    return "\n".join(lines)


def _accuracy(result: Mapping[str, Any]) -> str:
    return f"{result['accuracy']:.1%} +- {result['stderr']:.1%}"


def _last_user_turn(example: Example) -> str:
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    return users[-1] if users else ""


__all__ = ["binomial_stderr", "describe", "evaluate_set", "evaluate_sets", "format_results", "read_eval_set"]
