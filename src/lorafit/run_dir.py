"""The run folder: the only code that knows its file names and formats; trainers, diagnosis, report and CLI
read and write a run through `RunDir`, never through each other.

    OUTPUT/
      config.yaml            the resolved run config (run_config.to_dict), YAML
      metrics.jsonl          one JSON object per logged step, appended as training goes
      checkpoints/step-N/    resumable checkpoints, N zero-padded to 8 digits (their contents: train/checkpoint.py)
      adapter/               the trained adapter (PEFT format: adapters/io.py)
      summary.json           steps, final loss, phase times, evaluations
      diagnosis.json         the loss-curve diagnosis ({"findings": [...]})
      report.html, report/   the report page and its figures (PNG)
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import UserError
from lorafit.fileio import write_json_atomic, write_text_atomic

CHECKPOINT_MANIFEST = "manifest.json"  # written last into every checkpoint: a step-N folder without it is incomplete
LEGACY_CHECKPOINT_STATE = "trainer_state.pt"  # the pickled state of checkpoints before format version 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(UserError):
    """A file of the run folder cannot be read; the message names the file (and line) and the fix."""


class RunDir:
    """A run folder; its properties are the paths of its parts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    summary = property(lambda self: self.path / "summary.json")
    diagnosis = property(lambda self: self.path / "diagnosis.json")
    report = property(lambda self: self.path / "report.html")
    figures = property(lambda self: self.path / "report")

    # ---- config.yaml ----

    def write_config(self, config: dict[str, Any]) -> None:
        """Create the folder and record the resolved config (plain data) as config.yaml."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any] | None:
        """config.yaml as a mapping; None when the run has none."""
        if not self.config.is_file():
            return None
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RunDirError(f"{self.config}: not valid YAML ({err}); fix or delete it.") from err
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config}: expected a mapping of sections (adapter, training, ...), got {config!r}.")
        return config

    # ---- metrics.jsonl ----

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    # ---- checkpoints/step-N ----

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint after optimiser step `step` is written."""
        return self.checkpoints / f"step-{step:08d}"

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first. A step-N folder is complete by construction (it appears by an atomic
        rename); temporary folders of an interrupted save start with '.' and are ignored. Pickled checkpoints of
        earlier versions are listed too, so that resume refuses them with a reason instead of starting over."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
                 and any((p / marker).is_file() for marker in (CHECKPOINT_MANIFEST, LEGACY_CHECKPOINT_STATE))]
        return sorted(found, key=checkpoint_step)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` (>= 1) checkpoints."""
        for old in self.list_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- summary.json, diagnosis.json ----

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary, summary)

    def write_diagnosis(self, diagnosis: dict[str, Any]) -> None:
        write_json_atomic(self.diagnosis, diagnosis)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder named step-N."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise RunDirError(f"{path}: not a checkpoint folder (expected checkpoints/step-N).")
    return int(match.group(1))


class MetricsLog:
    """metrics.jsonl, append-only: one JSON row per logged step, written as it is logged so a crash loses nothing
    logged; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only rows with row['step'] <= step (an interrupted run may have logged past its last checkpoint)."""
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file ([] if it does not exist).

    Only the LAST line may be torn (an append cut short by a crash): it is skipped with a warning. Any other line
    that is not a JSON object is an error naming file:line; blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if index == last:
                warnings.warn(f"{path}:{index + 1}: the last line is cut short (an interrupted write); "
                              "it is skipped.", stacklevel=2)
                continue
            raise RunDirError(f"{path}:{index + 1}: not a JSON row ({err}); each line must be one JSON object "
                              "such as {\"step\": 1, \"loss\": 2.3}. Fix or delete that line.") from err
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{index + 1}: expected a JSON object per line, got {line[:60]!r}.")
        rows.append(row)
    return rows


__all__ = ["CHECKPOINT_MANIFEST", "LEGACY_CHECKPOINT_STATE", "MetricsLog", "RunDir", "RunDirError", "checkpoint_step", "read_metrics"]
