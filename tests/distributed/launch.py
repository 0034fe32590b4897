"""Launch 2 processes with torchrun (gloo on CPU) from a test, with this checkout's lorafit on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lorafit

HERE = Path(__file__).parent


def torchrun(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`; fails the test with the output's tail
    when a rank fails."""
    src = Path(lorafit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result
