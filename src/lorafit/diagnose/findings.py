"""Finding and Diagnosis: what the loss-curve diagnosis reports, as text for people and JSON for tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PATTERNS = ("early_plateau", "sluggish_descent", "divergent_validation", "quantization_plateau", "loss_spike", "nan",
            "healthy")


@dataclass(frozen=True)
class Finding:
    """One recognised pattern: `evidence` holds the numbers it rests on (steps, losses), `advice` what to change."""

    pattern: str
    evidence: dict[str, Any]
    advice: str

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is unknown: use one of {', '.join(PATTERNS)}.")

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "evidence": dict(self.evidence), "advice": self.advice}


@dataclass
class Diagnosis:
    """The findings for one run (`healthy` alone when nothing else applies) and notes on checks that were skipped."""

    findings: list[Finding]
    source: str = "metrics"
    notes: list[str] = field(default_factory=list)

    @property
    def patterns(self) -> list[str]:
        return [f.pattern for f in self.findings]

    def to_json(self) -> dict[str, Any]:
        """`{"findings": [{"pattern", "evidence", "advice"}, ...]}`; values are plain JSON (no NaN)."""
        return {"findings": [f.to_json() for f in self.findings]}

    def to_text(self) -> str:
        """A few lines per finding: the pattern, its evidence as key=value, the advice; then the notes."""
        lines = [f"diagnosis of {self.source}:"]
        for finding in self.findings:
            evidence = ", ".join(f"{key}={_show(value)}" for key, value in finding.evidence.items())
            lines += [f"  {finding.pattern}", f"    evidence: {evidence}", f"    advice: {finding.advice}"]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


__all__ = ["PATTERNS", "Diagnosis", "Finding"]
