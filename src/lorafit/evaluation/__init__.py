"""Evaluation metrics for generated completions."""

from lorafit.evaluation.metrics import METRICS, exact_match, json_exact_match, json_strict_match, score

__all__ = ["METRICS", "exact_match", "json_exact_match", "json_strict_match", "score"]
