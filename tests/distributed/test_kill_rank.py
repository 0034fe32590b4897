"""A rank of a real `torchrun ... -m lorafit train` run SIGKILLed mid-training ends every rank promptly, leaves only
complete checkpoints, and --resume (on 2 processes, then on 1) finishes with the adapter of an uninterrupted run.

Why it ends promptly: torchrun's agent polls its workers every --monitor-interval (0.1 s by default); when one has
exited with an error it sends SIGTERM to the others (SIGKILL after 30 s if one ignores it) and exits non-zero, so
nobody waits for the collective timeout (distributed.timeout_minutes, 30 min by default). The bound of 60 s below
is those 30 s of grace plus 30 s of slack for a loaded machine; the time measured is printed.

Two kills: rank 1 (a rank that writes nothing) in the first life, rank 0 (the rank that writes metrics and
checkpoints, so it may die inside a checkpoint write) in the resumed one; the last resume runs in one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file
from tiny_models import write_tiny_run

import lorafit
from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train.checkpoint import read_checkpoint

STEPS = 16
RUN = ["adapter.dropout=0.0", "evaluation.generation=false", "evaluation.every=0", f"training.max_steps={STEPS}",
       "training.batch_size=4", "training.save_every=1", "training.keep_checkpoints=2", "distributed.strategy=fsdp"]
ENDS_WITHIN_S = 60.0


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(lorafit.__file__).parents[1]), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_args(root: Path, out: Path, *flags: str) -> list[str]:
    return ["-m", "lorafit", "train", str(root / "run.yaml"), f"output_dir={out}", *RUN, *flags]


def _worker_pids(launcher: int) -> dict[int, int]:
    """{local rank: pid} of torchrun's worker processes (its children carrying LOCAL_RANK in their environment)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if parent == launcher:
            for item in environ:
                if item.startswith(b"LOCAL_RANK="):
                    workers[int(item.split(b"=", 1)[1])] = int(entry.name)
    return workers


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _newest_step(out: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in RunDir(out).list_checkpoints()), default=0)


def _kill_rank_mid_training(root: Path, out: Path, rank: int, after_step: int, *flags: str) -> tuple[float, str]:
    """Start a 2-process run, SIGKILL local rank `rank` once the checkpoint of `after_step` is on disk; returns
    (seconds from the kill until torchrun and every worker have ended, the launcher's output)."""
    log = root / f"kill-rank{rank}.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", *_train_args(root, out, *flags)],
                                    stdout=handle, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 600
    while _newest_step(out) < after_step:
        assert launcher.poll() is None, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.02)
    workers = _worker_pids(launcher.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[rank], signal.SIGKILL)
    killed_at = time.monotonic()
    code = launcher.wait(timeout=300)
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() - killed_at < 300:
        time.sleep(0.05)
    elapsed = time.monotonic() - killed_at
    output = log.read_text()
    assert code != 0, output[-4000:]
    assert not any(_alive(pid) for pid in workers.values()), output[-4000:]
    assert f"Signal 9 (SIGKILL) received by PID {workers[rank]}" in output, output[-4000:]  # torchrun names it
    assert _newest_step(out) < STEPS, "the kill landed after training: nothing was interrupted"
    return elapsed, output


def _check_checkpoints(out: Path) -> list[int]:
    """Every checkpoint left on disk reads and verifies (manifest, hashes); their steps."""
    paths = RunDir(out).list_checkpoints()
    for path in paths:
        read_checkpoint(path)  # raises CheckpointError naming the file when anything is missing or torn
    read_metrics(out / "metrics.jsonl")  # only a torn last line is tolerated
    return [int(p.name.split("-")[1]) for p in paths]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / WEIGHTS_NAME))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("kill-rank"))


def test_a_killed_rank_ends_every_rank_and_resume_finishes_the_run(root):
    reference = root / "reference"
    torchrun(*_train_args(root, reference))
    out = root / "killed"

    elapsed, _ = _kill_rank_mid_training(root, out, rank=1, after_step=3)
    steps = _check_checkpoints(out)
    print(f"rank 1 killed after step {max(steps)}: torchrun and rank 0 ended {elapsed:.1f} s later")
    assert elapsed < ENDS_WITHIN_S
    assert steps and max(steps) < STEPS

    elapsed, output = _kill_rank_mid_training(root, out, 0, max(steps) + 3, "--resume")
    assert f"resumed from {out / 'checkpoints' / f'step-{max(steps):08d}'} at step {max(steps)}" in output, output[-4000:]
    steps = _check_checkpoints(out)
    print(f"rank 0 killed after step {max(steps)}: torchrun and rank 1 ended {elapsed:.1f} s later")
    assert elapsed < ENDS_WITHIN_S
    assert max(steps) < STEPS

    finished = subprocess.run([sys.executable, *_train_args(root, out, "--resume")], env=_env(), capture_output=True,
                              text=True, timeout=600, check=False)  # one process
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert not (out / ".lock").exists()
    want, got = read_metrics(reference / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))  # each step once
    # 2 vs 1 process and resume: equal up to float reordering (the SFT equality tests' rtol 1e-5, atol 1e-5)
    torch.testing.assert_close([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=0)
    a, b = _adapter(out), _adapter(reference)
    assert sorted(a) == sorted(b) and len(a) == 7 * 2 * 2
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |adapter killed twice and resumed - uninterrupted| = {diff:.1e}")
    assert diff <= 1e-5
