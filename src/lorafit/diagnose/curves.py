"""Loss-curve diagnosis: early plateaus, sluggish descent, overfitting, 4-bit stalls, spikes and NaN in a run's
metrics.jsonl, each with the numbers it rests on and what to change; after training or live (CurveMonitor).

The curve is judged on robust statistics: medians of the loss in ten blocks of 10% of the logged steps, a rolling
median for smoothing, and the relative noise as the scaled median absolute deviation of loss / smoothed. Thresholds
are relative to the loss range or to that noise, so that the same rules hold for any task, loss level and batch noise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.config import HEALTHY_SCALE, RUN_FILE_NAMES, scale_advice
from lorafit.diagnose.findings import Diagnosis, Finding
from lorafit.errors import UserError
from lorafit.quant import QUANT_SCHEMES
from lorafit.run_config import RunConfig
from lorafit.run_dir import RunDir, RunDirError, checkpoint_step

# ---- Thresholds: every number the detectors use, and why ----
MIN_ROWS_SPIKE = 8          # a spike is judged against the rows before it: at least 3 candidates after SPIKE_REF_ROWS
SPIKE_REF_ROWS = 5          # the median of the 5 rows before a row is its expected level (one outlier cannot move it)
SPIKE_NOISE_SIGMAS = 6.0    # Gaussian batch noise exceeds 6 sigma about once in 10^9 rows: no false alarms
                            # (sigma is relative: batch noise grows with the loss, so early rows are noisier)
SPIKE_RANGE_FRAC = 0.25     # ... and the jump must be a quarter of the whole descent, so heavy-tailed noise is not flagged
SPIKE_LEVEL_FRAC = 0.05     # ... and 5% of the current loss, for flat curves whose range and noise are near zero
MIN_ROWS_SHAPE = 20         # ten blocks of at least 2 rows each; fewer rows cannot tell a plateau from noise
BLOCKS = 10                 # block medians at 10% of training: the "first 10-20%" and "a stretch" are block-sized
EARLY_BLOCK = 2             # early plateau: the loss of block 2 (20-30% of training) is the level after the fast drop
EARLY_DROP_MIN = 0.10       # the early drop must be >= 10% of the starting loss to count as a fast drop
STALL_FRAC = 0.10           # stalled: the rest of training gains < 10% of the early drop; a power law
                            # 1/(1 + p/0.05), half-way down at 5% of training, still gains 14%
CONVERGED_FRAC = 0.10       # below 10% of the starting loss the task is learned: a flat tail there is convergence
QUANT_STALL_BLOCKS = 2      # a 4-bit stall spans >= 2 blocks (20% of training) ...
QUANT_STALL_FLAT = 0.05     # ... in which the loss falls < 5% of the total descent ...
QUANT_BEFORE_MIN = 0.20     # ... after >= 20% of the descent happened before it (not the flat start of warmup) ...
QUANT_RESUME_MIN = 0.10     # ... and after which it falls again by >= 10% of the descent ...
QUANT_RESUME_RATIO = 2.0    # ... at least twice as fast as during the stall (a smooth convex curve only slows down) ...
SIGNIFICANCE_Z = 3.0        # ... 3 standard errors clear of block-median noise (5 stretches tried: < 1% false alarms)
MEDIAN_SE = 1.2533          # standard error of a median of k Gaussian values is 1.2533 sigma / sqrt(k)
MAD_TO_SIGMA = 1.4826       # sigma of Gaussian noise = 1.4826 x median absolute deviation (here of loss / smoothed)
SMOOTH_MIN, SMOOTH_MAX = 5, 51  # rolling-median window: ~10% of the rows, odd, within these bounds
MIN_EVALS = 4               # overfitting needs a trend in eval_loss: at least 4 evaluations
RECENT_EVALS = 3            # the median of the last third of the evaluations (>= 2) is the recent eval level
TRAIN_FALL_FRAC = 0.10      # overfitting: since the best evaluation before those the train loss fell >= 10% (near
                            # convergence it won't) ...
EVAL_KEEPUP_FRAC = 0.20     # ... and eval_loss gained < 20% of what the train loss gained (a healthy run keeps most)
EVAL_RISE_FRAC = 0.05       # a recent level >= 5% above the best eval_loss is called rising, less is called stalled
                            # (a flat but noisy eval curve sits a few % above its lowest point)
BASELINE_HALF = 0.5         # sluggish: steps to cover half of the baseline's descent ...
SLUGGISH_RATIO = 2.0        # ... at least twice the baseline's (noise moves a crossing by a few steps, not 2x)
START_MATCH_FRAC = 0.25     # runs compared must start within 25% of each other's loss: another model or data set
                            # starts far off, while batch noise moves the median of the first 3 rows by ~5-10%
BASELINE_DROP_MIN = 0.10    # a baseline that fell < 10% of its starting loss gives no speed to compare with
GAP_FRAC = 0.05             # 4-bit gap: over the second half, the median gap is >= 5% of the 16-bit baseline's descent
GAP_PERSIST = 0.8           # ... and the 4-bit loss is above the baseline at >= 80% of those rows ...
GAP_MIN_ROWS = 8            # ... which are >= 8, so that one smoothed stretch cannot decide it
MONITOR_EVERY = 10          # the live monitor re-runs the detectors after 10 rows or 2% of the rows so far,
MONITOR_GROWTH = 50         # whichever is more (NaN at once): findings lag <= 2% of the run, total cost ~ n log n
MONITOR_SHAPE_PROGRESS = 0.5  # live: plateau shapes are judged only past half of the planned steps

LEARNING_CURVE_METHODS = frozenset({"sft"})  # methods whose loss is the learning curve these detectors judge;
                            # GRPO's loss is a policy-gradient surrogate (near 0 by construction): its report shows rewards;
                            # DPO's starts at ln 2 by construction and falls as margins grow, whatever the pairs teach
                            # (no plateau/overfit scale applies): its report shows rewards/* and preference accuracy

_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DiagnoseError(UserError):
    """A run folder cannot be diagnosed; the message names the file and what is missing."""


@dataclass
class _Curve:
    """Rows with a finite loss, sorted by step, plus their smoothing, noise and evaluations."""

    steps: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray  # NaN where not logged
    epoch: np.ndarray      # NaN where not logged
    smooth: np.ndarray
    noise: float           # relative: sigma of loss / smoothed loss - 1
    eval_steps: np.ndarray
    eval_loss: np.ndarray

    @property
    def start(self) -> float:
        """The loss before the descent: the first rows, or the top of a warmup bump in the first block."""
        first_block = self.steps <= self.steps[0] + (self.steps[-1] - self.steps[0]) / BLOCKS
        return float(max(np.median(self.loss[:3]), self.smooth[first_block].max()))

    @property
    def descent(self) -> float:
        return self.start - float(self.smooth.min())

    def train_loss_at(self, step: float) -> float:
        return float(np.interp(step, self.steps, self.smooth))


@dataclass
class _Blocks:
    """Median loss, row count and median step of each tenth of training."""

    levels: np.ndarray
    counts: np.ndarray
    steps: np.ndarray

    def se(self, index: int, noise: float) -> float:
        """Standard error of block `index`'s median under relative noise `noise`."""
        return MEDIAN_SE * noise * abs(self.levels[index]) / math.sqrt(self.counts[index])


def has_learning_curve(method: str | None) -> bool:
    """Whether a run of `method` (config.yaml's `method`; None = the default) gets the loss-curve diagnosis."""
    return (method or RunConfig.method) in LEARNING_CURVE_METHODS


def diagnose_run(run_dir: str | Path, baseline_dir: str | Path | None = None) -> Diagnosis:
    """Diagnose the run in `run_dir` (metrics.jsonl, and config.yaml and checkpoints if present), optionally
    against a baseline run (a lower-rank or 16-bit run of the same task)."""
    run = Path(run_dir)
    rows, config = _read_run(run)
    base_rows, base_config = _read_run(Path(baseline_dir)) if baseline_dir is not None else (None, None)
    return diagnose_rows(rows, config, base_rows, base_config, checkpoints=find_checkpoints(run), source=str(run))


def diagnose_report(run_dir: str | Path, baseline_dir: str | Path | None = None) -> tuple[str, str]:
    """What `lorafit diagnose RUN_DIR [--baseline OTHER]` prints: (human-readable text, JSON text)."""
    diagnosis = diagnose_run(run_dir, baseline_dir)
    return diagnosis.to_text(), json.dumps(diagnosis.to_json(), indent=2, allow_nan=False)


def diagnose_rows(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None,
                  baseline_rows: Sequence[Mapping[str, Any]] | None = None,
                  baseline_config: Mapping[str, Any] | None = None, *,
                  checkpoints: Mapping[int, str] | None = None, source: str = "metrics") -> Diagnosis:
    """Diagnose metrics rows; `config` is the run config as plain data (config.yaml), `checkpoints` maps
    step -> checkpoint folder. Config-based and baseline checks are skipped, with a note, when their input is absent."""
    notes: list[str] = []
    rows = _objects(rows)
    curve = _curve(rows)
    blocks = _blocks(curve) if curve is not None else None
    if curve is None:
        notes.append("no row with a finite loss: the curve checks need logged losses.")
    elif blocks is None:
        notes.append(f"{len(curve.steps)} rows with a loss (fewer than {MIN_ROWS_SHAPE}, or a tenth of the run "
                     "with < 2 rows): the plateau checks need a longer curve.")
    if curve is not None and len(curve.eval_steps) < MIN_EVALS:
        notes.append(f"{len(curve.eval_steps)} rows with eval_loss (fewer than {MIN_EVALS}): divergent_validation "
                     "not checked; set evaluation.every to evaluate during training.")
    if config is None:
        notes.append("no run config (config.yaml): the adapter-scale and 4-bit checks are skipped.")
    baseline = _curve(_objects(baseline_rows)) if baseline_rows is not None else None
    config = config or {}
    findings = [
        _nan(rows),
        _spike(curve, config),
        _divergent(curve, checkpoints or {}, config),
        _sluggish(curve, config, baseline, baseline_config, notes),
        _early_plateau(curve, blocks, config),
        _quantization(curve, blocks, config, baseline, baseline_config, notes),
    ]
    found = [f for f in findings if f is not None]
    return Diagnosis(found or [_healthy(curve)], source=source, notes=notes)


class CurveMonitor:
    """Live diagnosis for the trainer: feed each logged row to `observe`; a pattern is reported the first time only.

    The detectors re-run after `every` rows or 2% of the rows so far, whichever is more (NaN at once).
    Plateau shapes are held back until half of the planned steps (training.max_steps, or epochs x steps
    per epoch) are done, so a stall that later resumes is not called a plateau early. `config` is plain
    data: config.yaml, or run_config.to_dict(config).
    """

    def __init__(self, config: Mapping[str, Any] | None = None, every: int = MONITOR_EVERY) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every={every!r} must be a positive integer (rows between diagnoses), e.g. 10.")
        self.config = config
        self.every = every
        self.rows: list[dict[str, Any]] = []
        self.reported: set[str] = set()
        self._next_check = 1

    def observe(self, row: Mapping[str, Any]) -> list[Finding]:
        """Record one metrics row; return the findings whose pattern appears for the first time."""
        self.rows.append(dict(row))
        n = len(self.rows)
        if n < self._next_check and not _non_finite_fields(row):
            return []
        self._next_check = n + max(self.every, n // MONITOR_GROWTH)
        new = [f for f in diagnose_rows(self.rows, self.config).findings
               if f.pattern != "healthy" and f.pattern not in self.reported and self._judged_now(f.pattern)]
        self.reported.update(f.pattern for f in new)
        return new

    def _judged_now(self, pattern: str) -> bool:
        if pattern not in ("early_plateau", "quantization_plateau"):
            return True
        planned = _planned_steps(self.config or {}, self.rows)
        step = _number(self.rows[-1].get("step")) or len(self.rows)
        return planned is None or step >= MONITOR_SHAPE_PROGRESS * planned


def find_checkpoints(run_dir: str | Path) -> dict[int, str]:
    """Checkpoint folders of a run, step -> path relative to the run: lorafit's checkpoints/step-N, or checkpoint-N."""
    run = Path(run_dir)
    found = {checkpoint_step(p): p for p in RunDir(run).list_checkpoints()}
    if run.is_dir():
        found.update({int(m.group(1)): p for p in run.iterdir() if p.is_dir() and (m := _HF_CHECKPOINT.match(p.name))})
    return {step: str(path.relative_to(run)) for step, path in sorted(found.items())}


# ---- reading ----

def _read_run(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    run = RunDir(path)
    if not run.metrics.is_file():
        where = "does not exist" if not path.exists() else f"has no {run.metrics.name}"
        raise DiagnoseError(f"run folder {str(path)!r} {where}: pass the output_dir of a training run.")
    try:
        rows = run.read_metrics()
        config = run.read_config()
    except RunDirError as err:
        raise DiagnoseError(str(err)) from err
    if not rows:
        raise DiagnoseError(f"{run.metrics} has no rows: the run logged no step yet.")
    return rows, config


def _curve(rows: Sequence[Mapping[str, Any]] | None) -> _Curve | None:
    points = []
    for index, row in enumerate(rows or []):
        step = _number(row.get("step"))
        points.append((index + 1 if step is None else step, _number(row.get("loss")), _number(row.get("grad_norm")),
                       _number(row.get("epoch")), _number(row.get("eval_loss"))))
    points.sort(key=lambda p: p[0])
    train = [p for p in points if p[1] is not None and math.isfinite(p[1])]
    if not train:
        return None
    evals = [(p[0], p[4]) for p in points if p[4] is not None and math.isfinite(p[4])]
    steps, loss = np.array([p[0] for p in train], float), np.array([p[1] for p in train], float)
    smooth = _rolling_median(loss, int(np.clip(len(loss) // 10, SMOOTH_MIN, SMOOTH_MAX)) | 1)
    noise = MAD_TO_SIGMA * float(np.median(np.abs(loss - smooth) / np.maximum(np.abs(smooth), 1e-12)))
    return _Curve(steps=steps, loss=loss, smooth=smooth, noise=noise,
                  grad_norm=np.array([np.nan if p[2] is None else p[2] for p in train], float),
                  epoch=np.array([np.nan if p[3] is None else p[3] for p in train], float),
                  eval_steps=np.array([e[0] for e in evals], float), eval_loss=np.array([e[1] for e in evals], float))


def _rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred median of `window` (odd) values; the window shrinks at the ends."""
    half = window // 2
    padded = np.pad(x, half, constant_values=np.nan)
    return np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def _blocks(curve: _Curve) -> _Blocks | None:
    if len(curve.steps) < MIN_ROWS_SHAPE:
        return None
    span = curve.steps[-1] - curve.steps[0]
    if span <= 0:
        return None
    index = np.minimum(((curve.steps - curve.steps[0]) / span * BLOCKS).astype(int), BLOCKS - 1)
    counts = np.bincount(index, minlength=BLOCKS)
    if counts.min() < 2:
        return None
    return _Blocks(levels=np.array([np.median(curve.loss[index == j]) for j in range(BLOCKS)]), counts=counts,
                   steps=np.array([np.median(curve.steps[index == j]) for j in range(BLOCKS)]))


# ---- detectors: each returns a Finding or None ----

def _nan(rows: Sequence[Mapping[str, Any]]) -> Finding | None:
    bad = [(index, row, fields) for index, row in enumerate(rows) if (fields := _non_finite_fields(row))]
    if not bad:
        return None
    index, row, fields = bad[0]
    step = _number(row.get("step"))
    first = index + 1 if step is None else _int(step)
    last_good = [_number(r.get("loss")) for r in rows[:index]]
    last_good = [v for v in last_good if v is not None and math.isfinite(v)]
    evidence = {"first_step": first, "fields": fields, "rows": len(bad)}
    if last_good:
        evidence["last_finite_loss"] = _r(last_good[-1])
    return Finding("nan", evidence,
                   f"The loss became non-finite at step {first}: lower training.lr (e.g. halve it), keep gradient "
                   "clipping on (training.max_grad_norm: 1.0), and train in bf16 rather than fp16 (fp16 overflows "
                   "above 65504); resume from the last checkpoint before that step.")


def _spike(curve: _Curve | None, config: Mapping[str, Any]) -> Finding | None:
    if curve is None or len(curve.loss) < MIN_ROWS_SPIKE:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(curve.loss[:-1], SPIKE_REF_ROWS)
    expected = np.median(windows, axis=1)  # expected[k] is the level before row k + SPIKE_REF_ROWS
    jump = curve.loss[SPIKE_REF_ROWS:] - expected
    limit = np.maximum.reduce([SPIKE_NOISE_SIGMAS * curve.noise * np.abs(expected),
                               np.full_like(expected, SPIKE_RANGE_FRAC * float(np.ptp(curve.smooth))),
                               SPIKE_LEVEL_FRAC * np.abs(expected)])
    hits = np.flatnonzero(jump > limit)
    if not len(hits):
        return None
    k = int(hits[0])
    row = k + SPIKE_REF_ROWS
    evidence = {"first_spike_step": _int(curve.steps[row]), "loss": _r(curve.loss[row]),
                "median_before": _r(expected[k]), "threshold": _r(limit[k]),
                "spike_steps": [_int(curve.steps[h + SPIKE_REF_ROWS]) for h in hits[:5]], "spikes": len(hits)}
    if math.isfinite(curve.grad_norm[row]):
        evidence["grad_norm"] = _r(curve.grad_norm[row])
    lr = _number(_section(config, "training").get("lr"))
    lower = f"lower training.lr (e.g. to {lr / 2:g})" if lr else "lower training.lr (e.g. halve it)"
    return Finding("loss_spike", evidence,
                   f"The loss jumped from {expected[k]:.3g} to {curve.loss[row]:.3g} at step {evidence['first_spike_step']}: "
                   f"{lower}, keep gradient clipping on (training.max_grad_norm: 1.0 or lower), "
                   "and train in bf16 rather than fp16.")


def _divergent(curve: _Curve | None, checkpoints: Mapping[int, str], config: Mapping[str, Any]) -> Finding | None:
    if curve is None or len(curve.eval_steps) < MIN_EVALS:
        return None
    recent = max(2, len(curve.eval_loss) // RECENT_EVALS)
    earlier = int(np.argmin(curve.eval_loss[:-recent]))
    recent_level = float(np.median(curve.eval_loss[-recent:]))
    train_then, train_last = curve.train_loss_at(curve.eval_steps[earlier]), curve.train_loss_at(curve.eval_steps[-1])
    fall = (train_then - train_last) / train_then
    if fall < TRAIN_FALL_FRAC or curve.eval_loss[earlier] - recent_level >= EVAL_KEEPUP_FRAC * (train_then - train_last):
        return None
    best = int(np.argmin(curve.eval_loss))
    best_step, best_loss = curve.eval_steps[best], float(curve.eval_loss[best])
    rising = recent_level >= (1 + EVAL_RISE_FRAC) * best_loss
    if not rising and _eval_converged(curve):
        return None  # a held-out loss flat near zero is a learned task; the train loss may still fall on other rows
    evidence: dict[str, Any] = {
        "best_eval_step": _int(best_step), "best_eval_loss": _r(best_loss),
        "recent_eval_loss": _r(recent_level), "recent_from_step": _int(curve.eval_steps[-recent]),
        "eval_trend": "rising" if rising else "stalled",
        "train_loss_then": _r(train_then), "train_loss_last": _r(train_last), "train_fall_fraction": _r(fall)}
    epoch = np.interp(best_step, curve.steps, curve.epoch) if np.isfinite(curve.epoch).all() else math.nan
    if math.isfinite(epoch):
        evidence["best_epoch"] = _r(epoch)
    usable = [step for step in checkpoints if step <= best_step]
    stopping = _section(config, "evaluation").get("early_stopping")
    if usable:
        evidence["checkpoint_step"] = max(usable)
        evidence["checkpoint"] = checkpoints[max(usable)]
    if isinstance(stopping, Mapping) and stopping.get("monitor", "eval_loss") == "eval_loss":
        keep = "the saved adapter is already the best evaluation's (evaluation.early_stopping)"
    elif usable:
        keep = f"use the checkpoint {evidence['checkpoint']} (step {max(usable)})"
    else:
        keep = ("set evaluation.early_stopping to stop there and keep the best adapter, or save checkpoints "
                "(training.save_every) to keep the best point")
    fewer = f"about {epoch:.2g} epochs" if math.isfinite(epoch) else f"about {_int(best_step)} steps"
    return Finding("divergent_validation", evidence,
                   f"Overfitting: eval_loss stopped improving (best {best_loss:.3g} at step {_int(best_step)}) while "
                   f"the train loss fell {fall:.0%} more; "
                   f"{keep}, and retrain with fewer epochs ({fewer}), a lower adapter.r or training.lr, or more data.")


def _sluggish(curve: _Curve | None, config: Mapping[str, Any], baseline: _Curve | None,
              baseline_config: Mapping[str, Any] | None, notes: list[str]) -> Finding | None:
    evidence: dict[str, Any] = {}
    advice = ""
    adapter = _section(config, "adapter")
    r, alpha, rslora = adapter.get("r"), _number(adapter.get("alpha")), bool(adapter.get("use_rslora", False))
    scale = scale_advice(alpha, r, rslora) if _positive_int(r) and alpha and alpha > 0 else None
    if scale is not None and scale.too_low:
        evidence.update({"r": r, "alpha": _r(alpha), "use_rslora": rslora, "scale": _r(scale.scale),
                         "healthy_min_scale": HEALTHY_SCALE[0]})
        advice = f"The {scale.text(RUN_FILE_NAMES)}"
    compared = _slower_than_baseline(curve, config, baseline, baseline_config, notes) if baseline else None
    if compared is not None:
        evidence.update(compared)
        took = compared["run_steps"] or f"more than {compared['compared_up_to_step']}"
        advice = advice or (f"This r={r} run took {took} steps to reach loss {compared['target_loss']:.3g}, which the "
                            f"r={compared['baseline_r']} baseline reached in {compared['baseline_steps']} at the same lr: "
                            "set adapter.use_rslora: true (alpha/sqrt(r) keeps updates from shrinking with rank) "
                            f"or raise adapter.alpha (e.g. to 2r = {2 * r}).")
    if not evidence:
        return None
    if curve is not None and len(curve.loss) >= 2:
        evidence.update({"first_loss": _r(curve.loss[0]), "last_loss": _r(curve.loss[-1])})
    return Finding("sluggish_descent", evidence, advice)


def _slower_than_baseline(curve: _Curve | None, config: Mapping[str, Any], baseline: _Curve,
                          baseline_config: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    """Steps to cover half of the baseline's descent, this run vs a lower-rank baseline at the same lr."""
    base_config = baseline_config or {}
    r, base_r = _section(config, "adapter").get("r"), _section(base_config, "adapter").get("r")
    lr, base_lr = _number(_section(config, "training").get("lr")), _number(_section(base_config, "training").get("lr"))
    if not (_positive_int(r) and _positive_int(base_r) and lr and base_lr):
        notes.append("baseline given, but adapter.r / training.lr are not in both configs: sluggish_descent "
                     "against the baseline not checked.")
        return None
    if _is_4bit(config) != _is_4bit(baseline_config):
        return None  # a baseline in another precision is the quantisation comparison, not the rank one
    if not (base_r < r and math.isclose(lr, base_lr, rel_tol=1e-6)):
        notes.append(f"baseline r={base_r}, lr={base_lr:g} vs this run r={r}, lr={lr:g}: the rank comparison needs "
                     "a lower-rank baseline at the same lr; sluggish_descent against it not checked.")
        return None
    if curve is None or len(curve.loss) < MIN_ROWS_SHAPE or len(baseline.loss) < MIN_ROWS_SHAPE:
        notes.append(f"baseline comparison needs >= {MIN_ROWS_SHAPE} rows in both runs.")
        return None
    if abs(curve.start - baseline.start) > START_MATCH_FRAC * baseline.start:
        notes.append(f"this run starts at loss {curve.start:.3g}, the baseline at {baseline.start:.3g}: not the same "
                     "model and data, so their speeds are not compared.")
        return None
    end = min(curve.steps[-1], baseline.steps[-1])
    base_in, run_in = baseline.steps <= end, curve.steps <= end
    descent = baseline.start - float(baseline.smooth[base_in].min())
    if descent < BASELINE_DROP_MIN * baseline.start:
        notes.append(f"the baseline fell only {descent:.3g} from {baseline.start:.3g}: no speed to compare with.")
        return None
    target = baseline.start - BASELINE_HALF * descent
    base_step = float(baseline.steps[base_in][np.argmax(baseline.smooth[base_in] <= target)])
    reached = curve.smooth[run_in] <= target
    run_step = float(curve.steps[run_in][np.argmax(reached)]) if reached.any() else None
    if run_step is not None and run_step < SLUGGISH_RATIO * base_step:
        return None
    return {"r": r, "baseline_r": base_r, "target_loss": _r(target), "baseline_steps": _int(base_step),
            "run_steps": None if run_step is None else _int(run_step),
            "steps_ratio": None if run_step is None else _r(run_step / base_step), "compared_up_to_step": _int(end)}


def _eval_converged(curve: _Curve) -> bool:
    """Whether the last eval_loss is below CONVERGED_FRAC of the starting train loss: the task the eval set measures
    is learned, whatever rows (general replay, harder examples) keep the train loss above it."""
    return len(curve.eval_loss) > 0 and float(curve.eval_loss[-1]) < CONVERGED_FRAC * curve.start


def _early_plateau(curve: _Curve | None, blocks: _Blocks | None, config: Mapping[str, Any]) -> Finding | None:
    if curve is None or blocks is None:
        return None
    start, knee, end = curve.start, float(blocks.levels[EARLY_BLOCK]), float(blocks.levels[-1])
    early, tail = start - knee, knee - end
    if early < EARLY_DROP_MIN * start or tail > STALL_FRAC * early or end < CONVERGED_FRAC * start:
        return None
    if _eval_converged(curve):
        return None  # the held-out loss says the task is learned: the train loss's floor is other rows (e.g. replay)
    adapter = _section(config, "adapter")
    r = adapter.get("r")
    more_rank = f"raise adapter.r (e.g. to {2 * r})" if _positive_int(r) else "raise adapter.r (e.g. double it)"
    dora = "" if adapter.get("use_dora") else " or set adapter.use_dora: true"
    return Finding("early_plateau", {
        "start_loss": _r(start), "knee_step": _int(blocks.steps[EARLY_BLOCK]), "knee_loss": _r(knee),
        "end_step": _int(curve.steps[-1]), "end_loss": _r(end), "early_drop": _r(early), "tail_drop": _r(tail),
        "tail_drop_fraction": _r(tail / early)},
        f"The loss fell {early:.3g} in the first ~20% of training, then only {tail:.3g} more: the adapter has "
        f"too little capacity for the rest; {more_rank}{dora}.")


def _quantization(curve: _Curve | None, blocks: _Blocks | None, config: Mapping[str, Any], baseline: _Curve | None,
                  baseline_config: Mapping[str, Any] | None, notes: list[str]) -> Finding | None:
    if curve is None or not _is_4bit(config):
        return None
    evidence = _stall_then_resume(curve, blocks) if blocks is not None else {}
    if baseline is not None and baseline_config is not None and not _is_4bit(baseline_config):
        evidence.update(_gap_to_baseline(curve, baseline))
    elif baseline is not None:
        notes.append("this 4-bit run's baseline is not a 16-bit run with a config.yaml: the quantisation gap is not checked.")
    if not evidence:
        return None
    adapter = _section(config, "adapter")
    fixes = [fix for fix, done in (("set adapter.init: loftq (the adapter starts as a fit of the quantisation error)",
                                    adapter.get("init") == "loftq"),
                                   ("set adapter.use_dora: true", bool(adapter.get("use_dora")))) if not done]
    advice = " or ".join(fixes) if fixes else "raise adapter.r, or train this task on the 16-bit base"
    return Finding("quantization_plateau", evidence,
                   f"The 4-bit base holds the loss back (it must first learn back the quantisation error): {advice}.")


def _stall_then_resume(curve: _Curve, blocks: _Blocks) -> dict[str, Any]:
    """The first two-block stretch where the loss stalls after a descent and then falls again, faster."""
    m, descent, last = blocks.levels, curve.descent, BLOCKS - 1
    for j in range(1, last - QUANT_STALL_BLOCKS - 1):
        k = j + QUANT_STALL_BLOCKS
        after_blocks = last - k
        stall, after, before = m[j] - m[k], m[k] - m[last], curve.start - m[j]
        stall_rate, after_rate = stall / QUANT_STALL_BLOCKS, after / after_blocks
        se_j, se_k, se_last = (blocks.se(i, curve.noise) for i in (j, k, last))
        # after_rate - stall_rate = m[k](1/after + 1/stall) - m[j]/stall - m[last]/after: its standard error
        sd = math.sqrt((se_k * (1 / after_blocks + 1 / QUANT_STALL_BLOCKS)) ** 2
                       + (se_j / QUANT_STALL_BLOCKS) ** 2 + (se_last / after_blocks) ** 2)
        if (before >= QUANT_BEFORE_MIN * descent and stall <= QUANT_STALL_FLAT * descent
                and after >= QUANT_RESUME_MIN * descent and after_rate >= QUANT_RESUME_RATIO * max(stall_rate, 0.0)
                and after_rate - stall_rate >= SIGNIFICANCE_Z * sd):
            return {"stall_from_step": _int(blocks.steps[j]), "stall_to_step": _int(blocks.steps[k]),
                    "stall_loss": _r(m[j]), "stall_drop": _r(stall), "drop_after_stall": _r(after),
                    "total_descent": _r(descent)}
    return {}


def _gap_to_baseline(curve: _Curve, baseline: _Curve) -> dict[str, Any]:
    """The gap, over the second half of the common steps, between this 4-bit run and its 16-bit baseline."""
    lo, hi = max(curve.steps[0], baseline.steps[0]), min(curve.steps[-1], baseline.steps[-1])
    half = (curve.steps >= (lo + hi) / 2) & (curve.steps <= hi)
    if half.sum() < GAP_MIN_ROWS or baseline.descent <= 0:
        return {}
    gap = curve.smooth[half] - np.interp(curve.steps[half], baseline.steps, baseline.smooth)
    median_gap, above = float(np.median(gap)), float(np.mean(gap > 0))
    if median_gap < GAP_FRAC * baseline.descent or above < GAP_PERSIST:
        return {}
    return {"gap_from_step": _int(curve.steps[half][0]), "gap_to_step": _int(curve.steps[half][-1]),
            "median_gap": _r(median_gap), "baseline_descent": _r(baseline.descent), "share_above_baseline": _r(above)}


def _healthy(curve: _Curve | None) -> Finding:
    evidence: dict[str, Any] = {"rows": 0 if curve is None else len(curve.loss)}
    if curve is not None:
        evidence.update({"first_step": _int(curve.steps[0]), "last_step": _int(curve.steps[-1]),
                         "first_loss": _r(np.median(curve.loss[:3])), "last_loss": _r(np.median(curve.loss[-3:]))})
        if len(curve.eval_loss):
            evidence["best_eval_loss"] = _r(curve.eval_loss.min())
    return Finding("healthy", evidence, "Nothing to change: no known problem pattern in this curve.")


# ---- small helpers ----

def _objects(rows: Sequence[Any]) -> list[Mapping[str, Any]]:
    """The rows that are mappings (rows passed in by a caller may hold anything; run_dir.read_metrics checks files)."""
    return [row for row in rows if isinstance(row, Mapping)]


def _non_finite_fields(row: Mapping[str, Any]) -> list[str]:
    return [key for key in ("loss", "eval_loss", "grad_norm")
            if (value := _number(row.get(key))) is not None and not math.isfinite(value)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name)
    return section if isinstance(section, Mapping) else {}


def _is_4bit(config: Mapping[str, Any] | None) -> bool:
    return str((config or {}).get("quantize") or "").lower() in QUANT_SCHEMES


def _planned_steps(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> float | None:
    """training.max_steps, else epochs x (step / epoch of the last row); None when neither is known."""
    training = _section(config, "training")
    if _positive_int(training.get("max_steps")):
        return float(training["max_steps"])
    epochs, step, epoch = (_number(training.get("epochs")), _number(rows[-1].get("step")),
                           _number(rows[-1].get("epoch")))
    return epochs * step / epoch if epochs and step and epoch else None


def _r(value: float) -> float:
    """A float rounded to 5 significant digits, for readable evidence."""
    return float(f"{float(value):.5g}")


def _int(value: float) -> int:
    return round(float(value))


__all__ = ["LEARNING_CURVE_METHODS", "CurveMonitor", "DiagnoseError", "diagnose_report", "diagnose_rows", "diagnose_run",
           "find_checkpoints", "has_learning_curve"]
