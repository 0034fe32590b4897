"""String and JSON metrics for scoring generated completions against references."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


def _normalize(text: str) -> str:
    """Strip surrounding whitespace and any trailing end-of-turn tokens."""
    text = text.strip()
    stripped = True
    while stripped:
        stripped = False
        for token in END_OF_TURN_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                stripped = True
    return text


def _first_json_object(text: str) -> dict[str, Any] | None:
    """Return the first JSON object embedded in `text` (prose and code fences allowed), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are identical after normalization."""
    return _normalize(prediction) == _normalize(reference)


def json_exact_match(prediction: str, reference: str) -> bool:
    """True when the first JSON object in the prediction equals the reference object.

    Key order is ignored; value types matter (``3`` differs from ``"3"``).
    Raises ValueError if the reference itself holds no JSON object.
    """
    expected = _first_json_object(_normalize(reference))
    if expected is None:
        raise ValueError(f"reference contains no JSON object: {reference!r}")
    return _first_json_object(_normalize(prediction)) == expected


def contains_match(prediction: str, reference: str) -> bool:
    """True when the normalized reference occurs in the normalized prediction (case-sensitive).

    For short factual answers ("Paris") that a chat model wraps in a sentence. An empty reference is an error:
    it would be contained in every prediction.
    """
    expected = _normalize(reference)
    if not expected:
        raise ValueError("reference is empty: metric 'contains' would count every prediction as correct")
    return expected in _normalize(prediction)


METRICS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "json": json_exact_match,
    "contains": contains_match,
}


def score(predictions: list[str], references: list[str], metric: str) -> dict[str, Any]:
    """Score paired predictions/references with the named metric ("exact", "json" or "contains")."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid names: {', '.join(sorted(METRICS))}")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references"
        )
    match = METRICS[metric]
    correct = sum(match(p, r) for p, r in zip(predictions, references))
    total = len(references)
    return {
        "metric": metric,
        "correct": correct,
        "total": total,
        "accuracy": correct / total if total else 0.0,
    }
