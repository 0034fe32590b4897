"""finish_run: the loss-curve diagnosis only for methods whose loss is a learning curve, then the report."""

from __future__ import annotations

import json

import pytest

from lorafit.diagnose.curves import LEARNING_CURVE_METHODS, has_learning_curve
from lorafit.finish import finish_run
from lorafit.run_config import METHODS
from lorafit.run_dir import RunDir


def make_run(path, method):
    run = RunDir(path)
    run.write_config({"model": "m", "method": method} if method else {"model": "m"})
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 31)]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.mark.parametrize(("method", "diagnosed"), [("sft", True), (None, True), ("grpo", False),
                                                         ("dpo", False)])
def test_diagnosis_follows_the_method(tmp_path, method, diagnosed, capsys):
    run = make_run(tmp_path / "run", method)
    assert finish_run(run.path) == run.report and run.report.is_file()
    assert run.diagnosis.is_file() == diagnosed
    page = run.report.read_text()
    if diagnosed:
        patterns = [f["pattern"] for f in json.loads(run.diagnosis.read_text())["findings"]]
        assert patterns == ["healthy"] and "healthy" in page
    else:
        assert "no loss-curve diagnosis for this run" in page
    assert f"report written to {run.report}" in capsys.readouterr().out


def test_the_learning_curve_rule_names_known_methods():
    assert LEARNING_CURVE_METHODS <= set(METHODS)
    assert has_learning_curve("sft") and not has_learning_curve("grpo") and has_learning_curve(None)
    assert not has_learning_curve("dpo")
