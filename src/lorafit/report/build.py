"""write_report: a run folder (and runs to compare with it) -> report.html plus the figures as PNG files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafit.fileio import atomic_directory, write_text_atomic
from lorafit.report.html import render_page
from lorafit.report.plots import file_key, metric_panels, norm_heatmap
from lorafit.report.run_data import RunData, load_run
from lorafit.run_dir import RunDir


def write_report(run_dir: str | Path, compare: Sequence[str | Path] = (), diagnosis: Any = None) -> Path:
    """Write run_dir/report.html (self-contained) and run_dir/report/*.png; returns the HTML path.

    `compare` overlays other runs' curves on this one's; `diagnosis` (finding dicts) overrides run_dir/diagnosis.json.
    Missing pieces (no eval, adapter, summary) leave a note in their section instead of failing.
    """
    folder = RunDir(run_dir)
    runs = [load_run(run_dir, diagnosis=diagnosis)] + [load_run(path) for path in compare]
    _make_names_unique(runs)
    panels = metric_panels(runs)
    measured = [run for run in runs if run.norms]
    vmax = max((n.norm for run in measured for n in run.norms), default=None)  # one colour scale for all runs
    heatmaps = {run.name: norm_heatmap(run.norms, f"{run.name}: ‖s·B·A‖_F by block and module", vmax)
                for run in measured}
    page = render_page(runs, panels, heatmaps)
    with atomic_directory(folder.figures) as tmp:
        for panel in panels:
            (tmp / f"{panel.key}.png").write_bytes(panel.png)
        for name, png in heatmaps.items():
            (tmp / f"adapter_norms_{file_key(name)}.png").write_bytes(png)
    write_text_atomic(folder.report, page)
    return folder.report


def _make_names_unique(runs: list[RunData]) -> None:
    """Runs are named by folder; same-named folders get their parent's name too, then a number."""
    counts = Counter(run.name for run in runs)
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    for i, run in enumerate(runs):
        if any(r.name == run.name for r in runs[:i]):
            run.name = f"{run.name} ({i + 1})"


__all__ = ["write_report"]
