"""metrics.jsonl: one JSON row per logged step, appended and flushed so a crash loses nothing logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.fileio import write_text_atomic


class MetricsLog:
    """Append-only log of training metrics; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only rows with row['step'] <= step (an interrupted run may have logged past its last checkpoint)."""
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file ([] if it does not exist); a torn last line is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
