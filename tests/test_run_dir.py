"""The run folder: metrics log (only a torn last line may be skipped), checkpoint naming/listing/pruning, config,
and claiming it for a run (lock, used folder, --resume / --overwrite)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    assert not (run.checkpoints / ".step-00000060.tmp").exists()  # an interrupted save's leftover is removed
    with pytest.raises(RunDirError, match="not a checkpoint folder"):
        checkpoint_step(tmp_path / "adapter")


def test_a_kill_while_pruning_leaves_no_checkpoint_with_files_missing(tmp_path, monkeypatch):
    """The deletion is cut off after its first file (as by kill -9): no step-N folder may be left half deleted."""
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        run.checkpoint_path(step).mkdir(parents=True)
        for name in ("rng.json", CHECKPOINT_MANIFEST):
            (run.checkpoint_path(step) / name).write_text("{}")

    def killed_during_delete(folder, ignore_errors=False):
        (Path(folder) / "rng.json").unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("lorafit.run_dir.shutil.rmtree", killed_during_delete)
        with pytest.raises(KeyboardInterrupt):
            run.prune_checkpoints(1)
    assert [p.name for p in run.list_checkpoints()] == ["step-00000003"]
    assert (run.checkpoint_path(3) / "rng.json").is_file()
    run.prune_checkpoints(1)  # the next prune removes the half-deleted leftovers
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-00000003"]


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


# ---- claiming a run folder ----

def _finished(folder):
    run = RunDir(folder)
    run.write_config({"model": "m"})
    run.metrics_log().append({"step": 1, "loss": 1.0})
    run.write_summary({"steps": 1})
    (run.checkpoints / "step-00000001").mkdir(parents=True)
    (run.checkpoints / "step-00000001" / "manifest.json").write_text("{}")
    return run


def test_claim_refuses_a_used_folder_without_resume_or_overwrite_and_names_both(tmp_path):
    run = _finished(tmp_path / "out")
    with pytest.raises(RunDirError, match=r"holds a previous run \(metrics.jsonl, checkpoints, summary.json\); "
                                            r"pass --resume .* --overwrite"):
        run.claim()
    assert not run.lock.exists() and run.read_metrics() == [{"step": 1, "loss": 1.0}]


def test_claim_of_a_config_only_folder_is_a_fresh_run(tmp_path):
    run = RunDir(tmp_path / "out")
    run.write_config({"model": "m"})
    run.claim()
    assert json.loads(run.lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    run.release()
    assert not run.lock.exists()


def test_overwrite_deletes_only_lorafit_run_files_and_refuses_foreign_ones(tmp_path):
    run = _finished(tmp_path / "out")
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"also holds files lorafit did not write \(notes.txt\)"):
        run.claim(overwrite=True)
    assert run.summary.exists() and (run.path / "notes.txt").read_text() == "mine"
    (run.path / "notes.txt").unlink()
    run.claim(overwrite=True)
    assert sorted(p.name for p in run.path.iterdir()) == [".lock"]
    run.release()


def test_resume_refuses_a_finished_run_and_warns_when_no_checkpoint_exists(tmp_path):
    run = _finished(tmp_path / "out")
    with pytest.raises(RunDirError, match="has finished .*summary.json.*--overwrite"):
        run.claim(resume=True)
    interrupted = RunDir(tmp_path / "interrupted")
    interrupted.write_config({"model": "m"})
    interrupted.metrics_log().append({"step": 1, "loss": 1.0})
    with pytest.warns(UserWarning, match="holds no checkpoint .* the 1 rows it logged"):
        interrupted.claim(resume=True)
    interrupted.release()
    assert interrupted.read_metrics() == [{"step": 1, "loss": 1.0}]  # claiming never truncates


def test_a_live_lock_refuses_and_a_dead_one_is_taken_over_with_a_warning(tmp_path):
    run = RunDir(tmp_path / "out")
    run.path.mkdir()
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.lock.write_text(json.dumps({"pid": live.pid, "host": host}))
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {live.pid} on {host}"):
            run.claim()
    finally:
        live.kill()
        live.wait()
    with pytest.warns(UserWarning, match=rf"the run that held it \(pid {live.pid}\) is gone; taking the folder over"):
        run.claim()
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    run.release()
    run.lock.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(RunDirError, match="in use by another run .* on another-machine"):
        run.claim()
    run.lock.write_text("garbage")
    with pytest.raises(RunDirError, match="is not a lorafit lock"):
        run.claim()


def test_output_dir_that_is_a_file_and_both_flags_are_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        RunDir(tmp_path / "f").claim()
    with pytest.raises(RunDirError, match="--resume and --overwrite exclude each other"):
        RunDir(tmp_path / "g").claim(resume=True, overwrite=True)
