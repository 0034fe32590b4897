"""Evaluation metrics for generated completions."""

from lorafit.evaluation.metrics import (
    METRICS,
    contains_match,
    exact_match,
    json_exact_match,
    json_strict_match,
    score,
)

__all__ = ["METRICS", "contains_match", "exact_match", "json_exact_match", "json_strict_match", "score"]
