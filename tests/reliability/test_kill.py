"""A real `lorafit train` process, SIGKILLed at seeded random moments (during start-up, steps and checkpoint writes)
and resumed with --resume each time, ends with exactly the adapter and metrics of an uninterrupted run; every
checkpoint left on disk after each kill reads and verifies.

Kill moments: about one kill in eight lands during start-up (a random time after the process starts, before
training); the others a random time after the adapter report is printed (training starts right after it), drawn so
that the expected progress per life is the remaining steps over the kills left: kills spread over the whole run.
With a checkpoint after every step, a step's checkpoint write follows its metrics row at once, so many kills fall
inside a checkpoint write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import write_tiny_run

from lorafit.run_dir import RunDir, read_metrics
from lorafit.train.checkpoint import read_checkpoint

STEPS = 24
RUN = ["evaluation.generation=false", "evaluation.every=0", f"training.max_steps={STEPS}", "training.save_every=1",
       "training.keep_checkpoints=2", "training.warmup_steps=2"]
TRAINING_STARTS = "trainable params:"  # the adapter report, printed right before training starts
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(root: Path, out: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorafit.cli", "train", str(root / "run.yaml"), f"output_dir={out}", *RUN, *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


class Life:
    """One process: its output collected by threads; `training` is set when the adapter report is printed."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.started = process, time.perf_counter()
        self.training, self.stdout, self.stderr = threading.Event(), [], []
        self.training_at: float | None = None
        threading.Thread(target=self._read, args=(process.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(process.stderr, self.stderr, False), daemon=True).start()

    def _read(self, stream, lines: list[str], watch: bool) -> None:
        for line in stream:
            lines.append(line)
            if watch and line.startswith(TRAINING_STARTS) and not self.training.is_set():
                self.training_at = time.perf_counter()
                self.training.set()

    def wait(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        time.sleep(0.05)  # let the reader threads drain the pipes
        return code

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


def _check_surviving_checkpoints(out: Path) -> int:
    """Read and verify every checkpoint on disk (manifest, hashes, finite values); their count."""
    checkpoints = RunDir(out).list_checkpoints()
    for path in checkpoints:
        read_checkpoint(path)  # raises CheckpointError naming the file if anything is wrong
    read_metrics(out / "metrics.jsonl")  # only a torn last line is tolerated, anything else raises
    return len(checkpoints)


def _kill_and_resume(root: Path, kills: int, seed: int) -> None:
    reference = root / f"reference_{kills}"
    life = Life(_start(root, reference))
    assert life.wait() == 0, life.output()
    startup_s = life.training_at - life.started
    step_s = json.loads((reference / "summary.json").read_text())["phases_s"]["train_s"] / STEPS  # with its checkpoint
    want_rows = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in want_rows] == list(range(1, STEPS + 1))

    out, rng = root / f"killed_{kills}", random.Random(seed)
    done_kills = resumes = 0
    for kills_left in range(kills, 0, -1):
        flags = ("--resume",) if done_kills else ()
        resumes += bool(flags)
        life = Life(_start(root, out, *flags))
        if rng.random() < 0.125:
            time.sleep(rng.uniform(0, startup_s))
        else:
            assert life.training.wait(120), life.output()
            done = max((int(p.name.split("-")[1]) for p in RunDir(out).list_checkpoints()), default=0)
            remaining = STEPS - done
            time.sleep(rng.uniform(0, min(2 * remaining / kills_left, 0.9 * remaining)) * step_s)
        assert life.process.poll() is None, f"the run ended before kill {done_kills + 1}:\n{life.output()}"
        life.process.send_signal(signal.SIGKILL)
        assert life.wait() == -signal.SIGKILL
        done_kills += 1
        _check_surviving_checkpoints(out)
    finished = (out / "summary.json").exists()  # the last kill may land after training, while the report is drawn
    life = Life(_start(root, out, "--resume"))
    resumes += 1
    if finished:  # then --resume says so (exit 2) and changes nothing; the results are already complete
        assert life.wait() == 2 and "has finished" in life.output(), life.output()
    else:
        assert life.wait() == 0, life.output()

    got_rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))  # every step exactly once
    for want, got in zip(want_rows, got_rows):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7), want["step"]
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    lost = sum(not torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)
    assert lost == 0
    assert not (out / ".lock").exists()
    print(f"{done_kills} kills, {resumes} resumes, {lost} lost")
    assert done_kills == resumes == kills


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("kill"))


def test_five_kills_lose_nothing(tiny):
    _kill_and_resume(tiny, kills=5, seed=5)


@pytest.mark.slow
def test_twenty_kills_lose_nothing(tiny):
    _kill_and_resume(tiny, kills=20, seed=20)
