"""The early-stopping rule (evaluation.early_stopping), as HF's EarlyStoppingCallback applies it to a loss.

At each evaluation the monitored held-out loss either improves on the best so far, `value < best - min_delta`
(the first finite value always does), or counts one more evaluation without improvement; after `patience`
evaluations in a row without improvement training stops. A tie (value == best - min_delta, or value == best with
min_delta 0) is no improvement, and a NaN or infinite loss never improves. The run's final adapter is the one of
the best evaluation (the trainers keep it: train/loop.py).

Pure functions over a small frozen state, so the rule is tested without a model and every rank of a distributed
run, given the same values, takes the same decisions. The state is saved with each checkpoint (train/checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class EarlyStoppingState:
    """Where early stopping stands: the monitored quantity, its best value and the step it was reached at (None
    before the first evaluation), and the evaluations since then that did not improve on it."""

    monitor: str
    best: float | None = None
    best_step: int | None = None
    evaluations_without_improvement: int = 0


def improves(value: float, best: float | None, min_delta: float) -> bool:
    """Whether `value` is an improvement: finite and below best - min_delta (any finite value when there is no best)."""
    return math.isfinite(value) and (best is None or value < best - min_delta)


def observe(state: EarlyStoppingState, value: float, step: int, min_delta: float) -> EarlyStoppingState:
    """The state after an evaluation at `step` measured `value`."""
    if improves(value, state.best, min_delta):
        return replace(state, best=value, best_step=step, evaluations_without_improvement=0)
    return replace(state, evaluations_without_improvement=state.evaluations_without_improvement + 1)


def should_stop(state: EarlyStoppingState, patience: int) -> bool:
    """True once `patience` evaluations in a row have not improved on the best."""
    return state.evaluations_without_improvement >= patience


def stop_message(state: EarlyStoppingState, step: int) -> str:
    """The console line when training stops early at `step`."""
    start = (f"early stopping at step {step}: {state.monitor} has not improved for "
             f"{state.evaluations_without_improvement} evaluations")
    if state.best is None:
        return f"{start}; no evaluation gave a finite value, adapter from step {step}"
    return f"{start}; best {state.best:.6g} at step {state.best_step}, adapter from step {state.best_step}"


def summary(state: EarlyStoppingState, stopped_at: int, stopped_early: bool) -> dict[str, object]:
    """What summary.json and the report record: the monitor, best value and step, and where training ended."""
    return {"monitor": state.monitor, "best": state.best, "best_step": state.best_step, "stopped_at": stopped_at,
            "stopped_early": stopped_early}
