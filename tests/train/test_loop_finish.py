"""The end of a training run: summary.json always; a report that fails only warns (the results are safe)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lorafit.run_config import RunConfig, TrainingConfig, to_dict
from lorafit.train import loop


def test_a_failing_report_only_warns_and_keeps_the_summary(tmp_path, capsys):
    config = RunConfig(model="m", output_dir=str(tmp_path / "run"))
    state = loop.begin_run(config)
    assert state.folder.read_config() == to_dict(config)
    with state.timed("train"):
        pass
    state.result.steps, state.result.final_loss = 3, 0.5
    # a bad line in the middle of metrics.jsonl makes the diagnosis (and so the report) fail
    state.folder.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    result = loop.finish(state)
    out = capsys.readouterr().out
    assert "warning: the report could not be written (DiagnoseError:" in out and "metrics.jsonl:2" in out
    assert f"retry with `lorafit report {state.folder.path}`" in out
    assert not state.folder.report.exists()
    summary = json.loads(state.folder.summary.read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == 0.5 and set(summary["phases_s"]) == {"train_s"}
    assert result is state.result


def test_timed_adds_up_repeated_phases(tmp_path):
    state = loop.begin_run(RunConfig(model="m", output_dir=str(tmp_path / "run")))
    for _ in range(3):
        with state.timed("generation"):
            pass
    assert state.result.phases["generation_s"] >= state.last_s["generation_s"] >= 0
    assert list(state.result.phases) == ["generation_s"]


@pytest.mark.parametrize("release", [False, True])
def test_host_memory_is_released_only_when_asked(tmp_path, monkeypatch, release):
    """The fixed glibc mmap threshold costs page faults on every fresh buffer (2x the quickstart's CPU step): opt-in."""
    calls = []
    monkeypatch.setattr(loop, "return_freed_host_memory", lambda: calls.append(1) or True)
    training = dataclasses.replace(TrainingConfig(), release_host_memory=release)
    loop.begin_run(RunConfig(model="m", output_dir=str(tmp_path / "run"), training=training))
    assert calls == ([1] if release else [])
