"""String and JSON metrics for scoring generated completions against references."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from lorafit.errors import UserError

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


def _whole_json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed as JSON when the whole of it is one JSON object, else None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _reference_object(reference: str) -> dict[str, Any]:
    expected = _first_json_object(_normalize(reference))
    if expected is None:
        raise UserError(f"reference contains no JSON object: {reference!r}")
    return expected


def json_exact_match(prediction: str, reference: str) -> bool:
    """True when the FIRST JSON object found anywhere in the prediction equals the reference object (metric `json`).

    Lenient: prose, code fences and other text around the object are ignored, and anything after the first
    object is not looked at. Key order is ignored; value types matter (``3`` differs from ``"3"``).
    Raises UserError (a ValueError) if the reference itself holds no JSON object.
    """
    return _first_json_object(_normalize(prediction)) == _reference_object(reference)


def json_strict_match(prediction: str, reference: str) -> bool:
    """True when the whole prediction (stripped, end-of-turn tokens removed) is one JSON object equal to the
    reference object (metric `json_strict`): no prose, no code fence, nothing after the object.

    Key order is ignored; value types matter. Raises UserError (a ValueError) if the reference holds no JSON object.
    """
    return _whole_json_object(_normalize(prediction)) == _reference_object(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """True when the normalized reference occurs in the normalized prediction (case-sensitive).

    For short factual answers ("Paris") that a chat model wraps in a sentence. An empty reference is an error:
    it would be contained in every prediction.
    """
    expected = _normalize(reference)
    if not expected:
        raise UserError("reference is empty: metric 'contains' would count every prediction as correct")
    return expected in _normalize(prediction)


METRICS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "json": json_exact_match,  # the first JSON object anywhere in the reply
    "json_strict": json_strict_match,  # the whole reply is the JSON object
    "contains": contains_match,  # the reference occurs in the reply
}


def score(predictions: list[str], references: list[str], metric: str) -> dict[str, Any]:
    """Score paired predictions/references with the named metric: "exact" (the whole reply, normalised), "json"
    (the first JSON object in the reply), "json_strict" (the whole reply is the JSON object) or "contains" (the
    reference occurs in the reply)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; valid names: {', '.join(sorted(METRICS))}")
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


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-item scores: sample std (n - 1) / sqrt(n); NaN for one item.

    For 0/1 scores this is sqrt(p (1 - p) / (n - 1)), the binomial standard error with the unbiased variance.
    """
    if not values:
        raise ValueError("mean_and_stderr needs at least one value.")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
