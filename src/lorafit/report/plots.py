"""The report's figures as PNG bytes: one panel per logged metric (runs overlaid) and the adapter-norm heatmap.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so no global state and no display is needed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorafit.adapters.targets import ATTENTION_WORDS
from lorafit.report.norms import ModuleNorm
from lorafit.report.run_data import RunData, is_number, series

AXIS_COLUMNS = ("step", "epoch", "tokens_seen")  # counters that only restate the x axis
FIRST_PANELS = ("loss", "lr", "tokens_per_s", "grad_norm")
TITLES = {"loss": "Loss", "lr": "Learning rate", "tokens_per_s": "Throughput (tokens/s)",
          "grad_norm": "Gradient norm (before clipping)", "peak_rss_mib": "Peak memory: process RSS (MiB)",
          "cuda_max_allocated_mib": "Peak CUDA memory allocated (MiB)",
          "cuda_max_reserved_mib": "Peak CUDA memory reserved (MiB)"}
# DPO's metrics (train/dpo_loss.METRICS, TRL's names) drawn together: one panel per group instead of one per column
GROUPS = {
    "dpo_rewards": ("DPO rewards (β × log-ratio to the reference)",
                    ("rewards/chosen", "rewards/rejected", "rewards/margins", "eval_rewards/margins")),
    "dpo_accuracy": ("Preference accuracy (chosen reward > rejected)", ("rewards/accuracies", "eval_rewards/accuracies")),
    "dpo_logps": ("DPO log-probs of the replies (summed over tokens)", ("logps/chosen", "logps/rejected")),
}
COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777")
LOG_RANGE = 20  # a loss spanning more than this factor is drawn on a log axis
DPI = 110


@dataclass(frozen=True)
class Panel:
    """One figure: `key` names its PNG file, `title` heads it in the page."""

    key: str
    title: str
    png: bytes


def metric_panels(runs: list[RunData]) -> list[Panel]:
    """Loss (train and eval), learning rate, tokens/s, gradient norm, the DPO groups (rewards, preference accuracy,
    log-probs) when logged, then every other numeric column logged."""
    logged = _logged(runs)
    lines = [Panel(file_key(c), TITLES.get(c, c), _png(line_figure(runs, c))) for c in _columns(logged)]
    groups = [Panel(key, title, _png(group_figure(runs, [c for c in columns if c in logged])))
              for key, (title, columns) in GROUPS.items() if any(c in logged for c in columns)]
    first = sum(p.key in FIRST_PANELS for p in lines)
    return lines[:first] + groups + lines[first:]


def _logged(runs: list[RunData]) -> list[str]:
    logged: list[str] = []  # in the order the runs first logged them
    for run in runs:
        for row in run.metrics:
            logged += [c for c, v in row.items() if is_number(v) and c not in logged]
    return logged


def _columns(logged: list[str]) -> list[str]:
    if "eval_loss" in logged:
        logged = [*logged, "loss"]  # eval loss is drawn in the loss panel
    grouped = {c for _, columns in GROUPS.values() for c in columns}
    first = [c for c in FIRST_PANELS if c in logged]
    return first + [c for c in logged if c not in FIRST_PANELS and c not in AXIS_COLUMNS and c != "eval_loss"
                    and c not in grouped]


def norm_heatmap(norms: list[ModuleNorm], title: str, vmax: float | None = None) -> bytes:
    """Module kind × block index, coloured by ||s·B·A||_F (0 to `vmax`, shared when runs are compared)."""
    kinds = sorted({n.kind for n in norms}, key=lambda k: (not any(w in k for w in ATTENTION_WORDS), k))
    layers = sorted({n.layer for n in norms if n.layer is not None})
    columns = [str(layer) for layer in layers] + (["other"] if any(n.layer is None for n in norms) else [])
    grid = [[float("nan")] * len(columns) for _ in kinds]
    for n in norms:
        grid[kinds.index(n.kind)][columns.index("other" if n.layer is None else str(n.layer))] = n.norm
    fig = Figure(figsize=(6.4, min(8.0, 1.5 + 0.3 * len(kinds))), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax)
    step = max(1, round(len(columns) / 16))  # at most ~16 block labels
    ax.set_xticks(range(0, len(columns), step), columns[::step], fontsize=8)
    ax.set_yticks(range(len(kinds)), _short_labels(kinds), fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=9, loc="left")
    fig.colorbar(image, ax=ax, label="‖s·B·A‖_F", pad=0.02)
    fig.tight_layout()  # kind names vary in length: measure the margins
    return _png(fig)


def line_figure(runs: list[RunData], column: str) -> Figure:
    """`column` against step, one line per run (the loss panel adds each run's eval loss, dashed)."""
    fig = Figure(figsize=(6.0, 3.3), dpi=DPI)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.95)  # fixed margins: one draw, not two
    ax = fig.add_subplot()
    many = len(runs) > 1
    values = []
    for color, run in zip(run_colors(len(runs)), runs):
        x, y = series(run, column)
        values += y
        label = (f"{run.name} train" if many else "train") if column == "loss" else (run.name if many else None)
        ax.plot(x, y, color=color, linewidth=1.6, marker="." if len(x) <= 30 else None, label=label)
        ex, ey = series(run, "eval_loss") if column == "loss" else ([], [])
        if ey:
            values += ey
            ax.plot(ex, ey, color=color if many else COLORS[1], linestyle="--", marker="o", markersize=4,
                    linewidth=1.2, label=f"{run.name} eval" if many else "eval")
    if values and min(values) > 0 and max(values) / min(values) > LOG_RANGE and column in ("loss", "grad_norm"):
        ax.set_yscale("log")
    elif column == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlabel("step")
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)
    return fig


def group_figure(runs: list[RunData], columns: list[str]) -> Figure:
    """Several columns against step: one colour per column (one run) or per run (several, a line style per
    column); eval_* columns, logged at evaluations only, are dashed with markers."""
    fig = Figure(figsize=(6.0, 3.3), dpi=DPI)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.95)
    ax = fig.add_subplot()
    many = len(runs) > 1
    styles = ("-", ":", "-.", (0, (5, 1)))
    for run_color, run in zip(run_colors(len(runs)), runs):
        for i, column in enumerate(columns):
            x, y = series(run, column)
            held_out = column.startswith("eval_")
            ax.plot(x, y, color=run_color if many else COLORS[i % len(COLORS)],
                    linestyle="--" if held_out else styles[i % len(styles)] if many else "-",
                    marker="o" if held_out else "." if len(x) <= 30 else None, markersize=4 if held_out else 6,
                    linewidth=1.2 if held_out else 1.6, label=f"{run.name} {column}" if many else column)
    ax.set_xlabel("step")
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8)
    return fig


def run_colors(n: int) -> list[str]:
    """The colour of each of n runs, the same in every figure and in the page's run table."""
    return [COLORS[i % len(COLORS)] for i in range(n)]


def _short_labels(kinds: list[str]) -> list[str]:
    """The last name part (q_proj) unless two kinds share it (GPT-2's attn.c_proj and mlp.c_proj)."""
    last = [k.rsplit(".", 1)[-1] for k in kinds]
    return [short if last.count(short) == 1 else kind for short, kind in zip(last, kinds)]


def file_key(name: str) -> str:
    """A file-name-safe form of a metric or run name ("reward/format" -> "reward_format")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


__all__ = ["Panel", "file_key", "line_figure", "metric_panels", "norm_heatmap", "run_colors"]
