"""The run folder: metrics log (only a torn last line may be skipped), checkpoint naming/listing/pruning, config."""

from __future__ import annotations

import json

import pytest

from lorafit.run_dir import CHECKPOINT_MANIFEST, MetricsLog, RunDir, RunDirError, checkpoint_step, read_metrics

ROWS = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}]


def write_lines(path, lines):
    path.write_text("".join(lines))
    return path


def test_metrics_round_trip_and_truncate(tmp_path):
    log = RunDir(tmp_path).metrics_log()
    for row in ROWS:
        log.append(row)
    assert read_metrics(log.path) == ROWS
    log.truncate_after(2)
    assert RunDir(tmp_path).read_metrics() == ROWS[:2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) + "\n" for r in ROWS] + ['{"step": 4, "lo'])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: the last line is cut short"):
        assert read_metrics(path) == ROWS
    with pytest.warns(UserWarning, match="cut short"):
        MetricsLog(path).truncate_after(3)  # resume rewrites the log without the torn line
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in ROWS)


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    lines = [json.dumps(ROWS[0]) + "\n", '{"step": 2, "lo\n', json.dumps(ROWS[2]) + "\n"]
    path = write_lines(tmp_path / "metrics.jsonl", lines)
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a JSON row"):
        read_metrics(path)
    write_lines(path, [json.dumps(ROWS[0]) + "\n", "[1, 2]\n", json.dumps(ROWS[2]) + "\n"])
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: expected a JSON object"):
        read_metrics(path)
    write_lines(path, [json.dumps(ROWS[0]) + "\n", "\n", json.dumps(ROWS[2]) + "\n"])
    assert read_metrics(path) == [ROWS[0], ROWS[2]]  # a blank line holds no data


def test_checkpoints_are_named_listed_by_step_and_pruned(tmp_path):
    run = RunDir(tmp_path)
    assert run.list_checkpoints() == []
    for step in (10, 2, 100):
        run.checkpoint_path(step).mkdir(parents=True)
        (run.checkpoint_path(step) / CHECKPOINT_MANIFEST).write_bytes(b"")
    (run.checkpoints / "step-00000050").mkdir()  # no state file: an incomplete checkpoint is not listed
    (run.checkpoints / ".step-00000060.tmp").mkdir()  # the temporary folder of an interrupted save
    assert run.checkpoint_path(2).name == "step-00000002"
    assert [checkpoint_step(p) for p in run.list_checkpoints()] == [2, 10, 100]  # by number, not by name
    run.prune_checkpoints(2)
    assert [p.name for p in run.list_checkpoints()] == ["step-00000010", "step-00000100"]
    assert not run.checkpoint_path(2).exists()
    with pytest.raises(RunDirError, match="not a checkpoint folder"):
        checkpoint_step(tmp_path / "adapter")


def test_config_is_written_and_read_back_and_bad_yaml_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.read_config() is None
    run.write_config({"model": "m", "adapter": {"r": 8}})
    assert run.read_config() == {"model": "m", "adapter": {"r": 8}}
    run.config.write_text("adapter: [r: 8\n")
    with pytest.raises(RunDirError, match="config.yaml: not valid YAML"):
        run.read_config()
    run.config.write_text("- a list\n")
    with pytest.raises(RunDirError, match="config.yaml: expected a mapping"):
        run.read_config()
