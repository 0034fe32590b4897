"""The early-stopping rule (train/early_stopping.py) without a model, and evaluation.early_stopping's config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lorafit.config import ConfigError
from lorafit.run_config import EarlyStoppingConfig, load_run_config
from lorafit.train.early_stopping import (
    EarlyStoppingState,
    improves,
    observe,
    should_stop,
    stop_message,
    summary,
)


def run_rule(values: list[float], patience: int, min_delta: float = 0.0) -> tuple[EarlyStoppingState, int | None]:
    """Feed one value per evaluation (evaluation i at step 10 * i) until the rule says stop; (state, stop step)."""
    state = EarlyStoppingState(monitor="eval_loss")
    for i, value in enumerate(values, start=1):
        state = observe(state, value, 10 * i, min_delta)
        if should_stop(state, patience):
            return state, 10 * i
    return state, None


def test_stops_after_patience_evaluations_without_improvement():
    state, stopped = run_rule([3.0, 2.0, 2.5, 2.4, 2.6, 1.0], patience=3)
    assert stopped == 50  # evaluations 3, 4, 5 did not beat 2.0; the 1.0 at 60 is never seen
    assert (state.best, state.best_step, state.evaluations_without_improvement) == (2.0, 20, 3)


def test_an_improvement_resets_the_count():
    state, stopped = run_rule([3.0, 3.1, 3.2, 2.9, 3.0, 3.0], patience=3)
    assert stopped is None
    assert (state.best, state.best_step, state.evaluations_without_improvement) == (2.9, 40, 2)


def test_patience_one_stops_at_the_first_non_improvement():
    assert run_rule([3.0, 2.0, 2.0], patience=1)[1] == 30


def test_a_tie_is_no_improvement():
    state, stopped = run_rule([2.0, 2.0, 2.0], patience=2)
    assert stopped == 30 and state.best_step == 10


def test_min_delta_needs_a_larger_drop():
    # 2.95 is 0.05 below 3.0: an improvement with min_delta 0.01, not with 0.1; exactly best - min_delta is not
    assert run_rule([3.0, 2.95, 2.95], patience=2, min_delta=0.01)[0].best_step == 20
    state, stopped = run_rule([3.0, 2.95, 2.91], patience=2, min_delta=0.1)
    assert stopped == 30 and state.best == 3.0 and state.best_step == 10
    assert not improves(2.5, 3.0, 0.5) and improves(math.nextafter(2.5, 0), 3.0, 0.5)


def test_non_finite_losses_never_improve():
    assert not improves(math.nan, None, 0.0) and not improves(math.inf, None, 0.0)
    state, stopped = run_rule([math.nan, 4.0, math.nan, math.inf], patience=2)
    assert stopped == 40 and (state.best, state.best_step) == (4.0, 20)
    never, _ = run_rule([math.nan, math.nan], patience=5)
    assert never.best is None and never.best_step is None and never.evaluations_without_improvement == 2


def test_the_rule_is_pure():
    start = EarlyStoppingState(monitor="ood")
    after = observe(start, 1.0, 5, 0.0)
    assert start == EarlyStoppingState(monitor="ood") and after.monitor == "ood" and after.best_step == 5


def test_message_and_summary():
    state, stopped = run_rule([3.0, 2.0, 2.5, 2.4], patience=2)
    assert stop_message(state, stopped) == ("early stopping at step 40: eval_loss has not improved for 2 evaluations; "
                                            "best 2 at step 20, adapter from step 20")
    nothing, at = run_rule([math.nan, math.nan], patience=2)
    assert stop_message(nothing, at) == ("early stopping at step 20: eval_loss has not improved for 2 evaluations; "
                                         "no evaluation gave a finite value, adapter from step 20")
    assert summary(state, stopped, True) == {"monitor": "eval_loss", "best": 2.0, "best_step": 20, "stopped_at": 40,
                                             "stopped_early": True}


RUN = """
model: tiny
method: {method}
output_dir: out
data: {{train: train.jsonl, eval: eval.jsonl}}
training: {{max_steps: 5}}
evaluation: {{every: 2, sets: {{ood: ood.jsonl}}}}
"""


def write(tmp_path, method="sft"):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(method=method) + ("rewards: [r.py:f]\n" if method == "grpo" else ""))
    return path


def test_the_quickstart_line_is_a_valid_setting():
    """examples/quickstart.yaml carries early stopping as a commented line: uncommented, it loads."""
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    line = next(l for l in quickstart.read_text().splitlines() if l.strip().startswith("# early_stopping:"))
    setting = yaml.safe_load(line.strip().removeprefix("# "))["early_stopping"]
    config = load_run_config(quickstart, [f"evaluation.early_stopping={json.dumps(setting)}"])
    assert config.evaluation.early_stopping == EarlyStoppingConfig(**setting)


def test_config_defaults_and_off(tmp_path):
    assert load_run_config(write(tmp_path)).evaluation.early_stopping is None
    assert load_run_config(write(tmp_path), ["evaluation.early_stopping=null"]).evaluation.early_stopping is None
    on = load_run_config(write(tmp_path), ["evaluation.early_stopping={}"]).evaluation.early_stopping
    assert on == EarlyStoppingConfig(patience=3, min_delta=0.0, monitor="eval_loss")
    chosen = load_run_config(write(tmp_path), ["evaluation.early_stopping={patience: 2, min_delta: 1e-3, monitor: ood}"])
    assert chosen.evaluation.early_stopping == EarlyStoppingConfig(patience=2, min_delta=1e-3, monitor="ood")


@pytest.mark.parametrize(("overrides", "method", "needle"), [
    (["evaluation.every=0"], "sft",
     "evaluation.early_stopping decides at each held-out evaluation: set evaluation.every"),
    (["evaluation.early_stopping.monitor=odd"], "sft",
     "evaluation.early_stopping.monitor='odd': use one of eval_loss, ood"),
    (["evaluation.early_stopping.patience=0"], "sft", "evaluation.early_stopping.patience=0 must be at least 1"),
    (["evaluation.early_stopping.min_delta=-0.1"], "sft", "evaluation.early_stopping.min_delta=-0.1 must be >= 0"),
    (["evaluation.early_stopping.patience=two"], "sft", "evaluation.early_stopping.patience='two' should be int"),
    (["evaluation.early_stopping.pateince=2"], "sft", "did you mean 'patience'"),
    (["data.eval=null"], "sft", "monitor=eval_loss is the held-out loss on data.eval: set data.eval"),
    (["evaluation.sets={eval: ood.jsonl}", "evaluation.early_stopping.monitor=eval"], "sft",
     "the set's loss would be logged as eval_loss"),
    ([], "grpo", "evaluation.early_stopping needs a held-out loss, which method: grpo does not compute"),
    (["evaluation.early_stopping.monitor=ood", "evaluation.sets={}"], "dpo",
     "evaluation.early_stopping.monitor='ood': use one of eval_loss "),
])
def test_config_errors_name_the_field_and_the_fix(tmp_path, overrides, method, needle):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, method), ["evaluation.early_stopping={}", *overrides])
    message = str(err.value)
    assert needle in message and "run.yaml" in message and "\n" not in message


def test_dpo_accepts_eval_loss(tmp_path):
    config = load_run_config(write(tmp_path, "dpo"), ["evaluation.sets={}", "evaluation.early_stopping={}"])
    assert config.evaluation.early_stopping.monitor == "eval_loss"
