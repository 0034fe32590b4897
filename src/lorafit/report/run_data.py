"""Everything the report shows about one run folder, read once; a missing or unreadable piece becomes a note.

The folder's files are named by lorafit.run_dir (config.yaml, metrics.jsonl, summary.json, adapter/, diagnosis.json).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lorafit.adapters.io import AdapterFileError, read_adapter_config
from lorafit.report.norms import ModuleNorm, adapter_update_norms
from lorafit.run_dir import RunDir, RunDirError

EVAL_KEYS = ("eval_before", "eval_after")
EVAL_SET_KEYS = ("eval_sets_before", "eval_sets_after")  # {name: {metric, correct, total, accuracy, stderr, ...}}
FORGETTING_NUMBERS = ("kl_per_token", "ppl_base", "ppl_tuned", "ppl_ratio", "changed", "prompts")


@dataclass
class RunData:
    """One run as plain data; `notes` maps a section ("metrics", "adapter", ...) to why it is missing."""

    path: Path
    name: str
    metrics: list[dict[str, Any]]
    config_text: str | None = None
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    diagnosis: list[dict[str, Any]] | None = None
    norms: list[ModuleNorm] | None = None
    use_dora: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> RunDir:
        return RunDir(self.path)


def load_run(run_dir: str | Path, diagnosis: Any = None) -> RunData:
    """Read a run folder; `diagnosis` (a list of finding dicts, or {"findings": [...]}) replaces diagnosis.json."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist: pass the output_dir of a lorafit run.")
    folder = RunDir(path)
    run = RunData(path=path, name=path.name, metrics=folder.read_metrics())
    if not run.metrics:
        run.notes["metrics"] = f"no {folder.metrics.name} rows: the run logged no step."
    _read_config(run)
    _read_summary(run)
    _read_diagnosis(run, diagnosis)
    _read_norms(run)
    return run


def is_number(value: Any) -> bool:
    """A finite int or float (bools and NaN are not plottable values)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(run: RunData, column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where `column` holds a finite number."""
    points = [(row["step"], row[column]) for row in run.metrics if is_number(row.get(column)) and "step" in row]
    return [p[0] for p in points], [p[1] for p in points]


def headline(run: RunData) -> dict[str, Any]:
    """The numbers at the top of the report; a value is None when the run does not have it."""
    steps, losses = series(run, "loss")
    eval_steps, eval_losses = series(run, "eval_loss")
    speeds = series(run, "tokens_per_s")[1]
    summary = run.summary or {}
    best = min(range(len(eval_losses)), key=eval_losses.__getitem__) if eval_losses else None
    final_loss = summary.get("final_loss")
    train_s = (summary.get("phases_s") or {}).get("train_s")
    return {
        "steps": summary.get("steps", steps[-1] if steps else None),
        "final_loss": final_loss if is_number(final_loss) else (losses[-1] if losses else None),
        "best_eval_loss": eval_losses[best] if best is not None else None,
        "best_eval_step": eval_steps[best] if best is not None else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,  # the median ignores warm-up steps
        "train_s": train_s if is_number(train_s) else None,
        "eval_before": summary.get("eval_before"),
        "eval_after": summary.get("eval_after"),
        "early_stopping": summary.get("early_stopping"),
    }


def _read_config(run: RunData) -> None:
    config_file = run.folder.config
    if not config_file.is_file():
        run.notes["config"] = f"no {config_file.name} in the run folder."
        return
    run.config_text = config_file.read_text(encoding="utf-8")
    try:
        run.config = run.folder.read_config()
    except RunDirError as err:
        run.notes["config"] = f"{err} Shown as text."


def _read_summary(run: RunData) -> None:
    summary = _read_json(run, run.folder.summary, "summary")
    if summary is not None and not isinstance(summary, dict):
        run.notes["summary"] = f"{run.folder.summary.name} is not a JSON object."
        summary = None
    run.summary = summary
    if summary is None:
        run.notes.setdefault("summary", f"no {run.folder.summary.name}: the run did not finish.")
        return
    for key in EVAL_KEYS:
        evaluation = summary.get(key)
        if evaluation is not None and not (isinstance(evaluation, dict) and all(
                is_number(evaluation.get(k)) for k in ("correct", "total", "accuracy"))):
            summary[key] = None
            run.notes["evaluation"] = f"{run.folder.summary.name}: {key} lacks correct/total/accuracy; left out."
    if not any(summary.get(key) for key in EVAL_KEYS):
        run.notes.setdefault("evaluation", "no generation evaluation (needs data.eval and evaluation.generation: true).")
    for key in EVAL_SET_KEYS:
        sets = summary.get(key)
        if sets is not None and not (isinstance(sets, dict) and all(
                isinstance(result, dict) and all(is_number(result.get(k))
                                                 for k in ("correct", "total", "accuracy", "stderr"))
                for result in sets.values())):
            summary[key] = None
            run.notes["eval_sets"] = f"{run.folder.summary.name}: {key} is not {{name: accuracy +- stderr}}; left out."
    stopping = summary.get("early_stopping")
    if stopping is not None and not (isinstance(stopping, dict) and isinstance(stopping.get("monitor"), str)
                                     and is_number(stopping.get("stopped_at"))
                                     and (stopping.get("best_step") is None or is_number(stopping.get("best_step")))):
        summary["early_stopping"] = None
        run.notes["early_stopping"] = f"{run.folder.summary.name}: early_stopping lacks monitor/stopped_at; left out."
    forgetting = summary.get("forgetting")
    if forgetting is not None and not (isinstance(forgetting, dict)
                                       and all(is_number(forgetting.get(k)) for k in FORGETTING_NUMBERS)):
        summary["forgetting"] = None
        run.notes["forgetting"] = (f"{run.folder.summary.name}: forgetting lacks one of "
                                   f"{', '.join(FORGETTING_NUMBERS)}; left out.")


def _read_diagnosis(run: RunData, given: Any) -> None:
    if given is None:
        if not run.folder.diagnosis.is_file():
            run.notes["diagnosis"] = "no loss-curve diagnosis for this run."
            return
        given = _read_json(run, run.folder.diagnosis, "diagnosis")
        if given is None:
            return  # unreadable: _read_json left a note
    findings = given.get("findings") if isinstance(given, dict) else given  # {"findings": [...]} or a bare list
    if isinstance(findings, list) and all(isinstance(f, dict) and "pattern" in f for f in findings):
        run.diagnosis = list(findings)
    else:
        run.notes["diagnosis"] = "the diagnosis is not a list of findings ({pattern, evidence, advice}); left out."


def _read_norms(run: RunData) -> None:
    adapter = run.folder.adapter
    if not adapter.is_dir():
        run.notes["adapter"] = "no adapter folder: the run saved no adapter."
        return
    try:
        run.norms = adapter_update_norms(adapter)
    except AdapterFileError as err:
        run.notes["adapter"] = f"adapter not measured: {err}"
        return
    run.use_dora = read_adapter_config(adapter).use_dora


def _read_json(run: RunData, path: Path, section: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        run.notes[section] = f"{path.name} is not valid JSON ({err})."
        return None


__all__ = ["RunData", "headline", "is_number", "load_run", "series"]
