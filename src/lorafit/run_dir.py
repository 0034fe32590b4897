"""The run folder: the only code that knows its file names and formats; trainers, diagnosis, report and CLI
read and write a run through `RunDir`, never through each other.

    OUTPUT/
      config.yaml            the resolved run config (run_config.to_dict), YAML
      metrics.jsonl          one JSON object per logged step, appended as training goes
      checkpoints/step-N/    resumable checkpoints, N zero-padded to 8 digits (their contents: train/checkpoint.py)
      adapter/               the trained adapter (PEFT format: adapters/io.py)
      summary.json           steps, final loss, phase times, evaluations
      diagnosis.json         the loss-curve diagnosis ({"findings": [...]})
      report.html, report/   the report page and its figures (PNG)
      .lock                  {"pid", "host"} of the process training into the folder now (see RunDir.claim)

A training run claims its folder first (`claim`): one run at a time (the lock), and a folder that already holds
a run's results is continued (resume) or replaced (overwrite) only when the user says so, never overwritten
silently.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import UserError
from lorafit.fileio import fsync_directory, write_json_atomic, write_text_atomic

CHECKPOINT_MANIFEST = "manifest.json"  # written last into every checkpoint: a step-N folder without it is incomplete
LEGACY_CHECKPOINT_STATE = "trainer_state.pt"  # the pickled state of checkpoints before format version 1
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Every name lorafit writes at the top of a run folder; --overwrite deletes these and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter", "summary.json", "diagnosis.json",
             "report.html", "report", LOCK_FILE)


class RunDirError(UserError):
    """A file of the run folder cannot be read; the message names the file (and line) and the fix."""


class RunDir:
    """A run folder; its properties are the paths of its parts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    summary = property(lambda self: self.path / "summary.json")
    diagnosis = property(lambda self: self.path / "diagnosis.json")
    report = property(lambda self: self.path / "report.html")
    figures = property(lambda self: self.path / "report")
    lock = property(lambda self: self.path / LOCK_FILE)

    # ---- claiming the folder for a training run ----

    def claim(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Make the folder this process's run folder, or raise a RunDirError saying why not and what to do.

        - output_dir must be a folder (created if missing), not a file;
        - the lock (`.lock`, created exclusively) keeps a second run out while this one trains; a lock left by a
          process that is gone (same host, pid dead) is taken over with a warning; `release` (or process exit) frees it;
        - a folder holding results of a previous run (metrics, checkpoints, adapter, summary, report) is refused unless
          `resume` (continue from its newest checkpoint) or `overwrite` (delete lorafit's run files, and only those:
          a folder that also holds other files is refused, so a mistyped output_dir never costs anyone their files);
        - `resume` of a finished run (summary.json) is refused: there is nothing to continue.
        A config.yaml alone (a run that stopped before its first step) is no result and is replaced.
        """
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in "
                              f"{self.path}, --overwrite replaces it; pass one.")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output_dir {self.path} is a file, not a folder; set output_dir to a folder path "
                              "(it is created if missing).")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if overwrite:
                self._clear_previous_run()
            elif resume:
                self._check_resumable()
            elif results := self.previous_results():
                raise RunDirError(f"output_dir {self.path} holds a previous run ({', '.join(results)}); pass --resume "
                                  "to continue it from its newest checkpoint, --overwrite to replace it, or choose "
                                  "another output_dir.")
        except BaseException:
            self.release()
            raise

    def previous_results(self) -> list[str]:
        """The names of a previous run's results in the folder (config.yaml alone is none, nor an empty metrics log)."""
        found = [name for name in ("checkpoints", "adapter", "summary.json", "diagnosis.json", "report.html", "report")
                 if (self.path / name).exists()]
        if self.metrics.is_file() and self.metrics.stat().st_size > 0:
            found.insert(0, "metrics.jsonl")
        return found

    def release(self) -> None:
        """Remove the lock if this process holds it (a lock of another process is never touched)."""
        if self._lock_holder() == _this_process():
            self.lock.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        for _ in range(2):
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_stale_lock()
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(_this_process()))
                handle.flush()
                os.fsync(handle.fileno())
            atexit.register(self.release)
            return
        raise RunDirError(f"{self.lock} reappeared while it was taken over: another run started in {self.path} "
                          "at the same moment; let it finish or stop it, then retry.")

    def _lock_holder(self) -> dict[str, Any] | None:
        """The {"pid", "host"} in the lock; None when there is none; {} when it is unreadable."""
        try:
            holder = json.loads(self.lock.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _remove_stale_lock(self) -> None:
        """Delete a lock left by a process that no longer runs (same host, pid gone) or by an earlier run of this
        very process (it ended in an error before releasing); else raise naming the holder."""
        holder = self._lock_holder()
        if holder is None:
            return  # released in the meantime
        me = _this_process()
        if holder == me:
            self.lock.unlink(missing_ok=True)
            return
        pid, host = holder.get("pid"), holder.get("host")
        if not (isinstance(pid, int) and pid > 0 and isinstance(host, str)):
            raise RunDirError(f"{self.lock} is not a lorafit lock ({{\"pid\": ..., \"host\": ...}}); if no run is "
                              f"training into {self.path}, delete {self.lock} and retry.")
        if host != me["host"] or _pid_alive(pid):
            raise RunDirError(f"output_dir {self.path} is in use by another run (pid {pid} on {host}, see "
                              f"{self.lock}); wait for it to end or choose another output_dir. If that run is gone, "
                              f"delete {self.lock}.")
        warnings.warn(f"{self.lock}: the run that held it (pid {pid}) is gone; taking the folder over.", stacklevel=3)
        self.lock.unlink(missing_ok=True)

    def _clear_previous_run(self) -> None:
        """--overwrite: delete lorafit's run files (RUN_FILES), after checking that the folder holds nothing else."""
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in RUN_FILES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunDirError(f"--overwrite: output_dir {self.path} also holds files lorafit did not write ({shown}); "
                              "--overwrite replaces only a lorafit run folder. Move those files or choose another "
                              "output_dir.")
        for name in RUN_FILES:
            target = self.path / name
            if name == LOCK_FILE or not (target.exists() or target.is_symlink()):
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()

    def _check_resumable(self) -> None:
        """--resume: refuse a finished run; warn that an interrupted run without any checkpoint starts over."""
        if self.summary.is_file():
            raise RunDirError(f"--resume: the run in {self.path} has finished ({self.summary} exists), there is "
                              "nothing to continue; pass --overwrite to train again, or choose another output_dir.")
        if not self.list_checkpoints() and (rows := read_metrics(self.metrics)):
            warnings.warn(f"--resume: {self.checkpoints} holds no checkpoint (the run stopped before its first one); "
                          f"starting over from step 0; the {len(rows)} rows it logged in {self.metrics} are "
                          "replaced as the steps run again.", stacklevel=3)

    # ---- config.yaml ----

    def write_config(self, config: dict[str, Any]) -> None:
        """Create the folder and record the resolved config (plain data) as config.yaml."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any] | None:
        """config.yaml as a mapping; None when the run has none."""
        if not self.config.is_file():
            return None
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RunDirError(f"{self.config}: not valid YAML ({err}); fix or delete it.") from err
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config}: expected a mapping of sections (adapter, training, ...), got {config!r}.")
        return config

    # ---- metrics.jsonl ----

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    # ---- checkpoints/step-N ----

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint after optimiser step `step` is written."""
        return self.checkpoints / f"step-{step:08d}"

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first. A step-N folder is complete by construction (it appears by an atomic
        rename); temporary folders of an interrupted save start with '.' and are ignored. Pickled checkpoints of
        earlier versions are listed too, so that resume refuses them with a reason instead of starting over."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
                 and any((p / marker).is_file() for marker in (CHECKPOINT_MANIFEST, LEGACY_CHECKPOINT_STATE))]
        return sorted(found, key=checkpoint_step)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` (>= 1) checkpoints, and what interrupted saves and deletions left.

        Each old checkpoint is renamed to a hidden name first (one atomic step) and deleted after: a kill during
        the deletion leaves a hidden folder that listing ignores and the next prune removes, never a step-N folder
        with files missing. Only the process holding the run folder's lock prunes, so no hidden folder being
        written by another process is removed."""
        for leftover in self.checkpoints.glob(".*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        doomed = []
        for old in self.list_checkpoints()[:-keep]:
            doomed.append(old.with_name(f".{old.name}.deleting"))
            os.replace(old, doomed[-1])
        if doomed:
            fsync_directory(self.checkpoints)
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- summary.json, diagnosis.json ----

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary, summary)

    def write_diagnosis(self, diagnosis: dict[str, Any]) -> None:
        write_json_atomic(self.diagnosis, diagnosis)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder named step-N."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise RunDirError(f"{path}: not a checkpoint folder (expected checkpoints/step-N).")
    return int(match.group(1))


def _this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class MetricsLog:
    """metrics.jsonl, append-only: one JSON row per logged step, written as it is logged so a crash loses nothing
    logged; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only rows with row['step'] <= step (an interrupted run may have logged past its last checkpoint)."""
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file ([] if it does not exist).

    Only the LAST line may be torn (an append cut short by a crash): it is skipped with a warning. Any other line
    that is not a JSON object is an error naming file:line; blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if index == last:
                warnings.warn(f"{path}:{index + 1}: the last line is cut short (an interrupted write); "
                              "it is skipped.", stacklevel=2)
                continue
            raise RunDirError(f"{path}:{index + 1}: not a JSON row ({err}); each line must be one JSON object "
                              "such as {\"step\": 1, \"loss\": 2.3}. Fix or delete that line.") from err
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{index + 1}: expected a JSON object per line, got {line[:60]!r}.")
        rows.append(row)
    return rows


__all__ = ["CHECKPOINT_MANIFEST", "LEGACY_CHECKPOINT_STATE", "LOCK_FILE", "RUN_FILES", "MetricsLog", "RunDir", "RunDirError", "checkpoint_step", "read_metrics"]
