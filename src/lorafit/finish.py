"""How a run ends, the same for `lorafit train` and `lorafit report`: the loss-curve diagnosis (for methods whose loss
is a learning curve) written to diagnosis.json, then the report page.

It sits above diagnose/ and report/ (it calls both) and below train/ and the CLI (they call it), so neither
diagnose/ nor report/ needs to know the other or the trainers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorafit.diagnose.curves import diagnose_run, has_learning_curve
from lorafit.report import write_report
from lorafit.run_dir import RunDir


def finish_run(run_dir: str | Path, compare: Sequence[str | Path] = ()) -> Path:
    """Diagnose the run's loss curve when its method has one (config.yaml's `method`), write diagnosis.json and
    print the findings; then write report.html (other runs in `compare` overlaid). Returns the report's path."""
    folder = RunDir(run_dir)
    diagnosis = None
    if has_learning_curve((folder.read_config() or {}).get("method")):
        found = diagnose_run(folder.path)
        diagnosis = found.to_json()
        folder.write_diagnosis(diagnosis)
        print(found.to_text())
    path = write_report(folder.path, compare=compare, diagnosis=diagnosis)
    print(f"report written to {path}")
    return path


__all__ = ["finish_run"]
