"""How `python -m lorafit` ends a process: a multi-process run's rank skips the interpreter's finalization (where
objects holding the destroyed process group could abort it) after flushing its output; one process exits normally."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from lorafit.__main__ import exit_process
atexit.register(lambda: print("finalized", flush=True))
print("written", end="")  # unflushed on purpose
exit_process({code}, {world_size})
"""


@pytest.mark.parametrize("code", [0, 3])
@pytest.mark.parametrize("world_size", [1, 2])
def test_exit_process_keeps_output_and_code(code, world_size):
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(code=code, world_size=world_size)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == code
    assert result.stdout.startswith("written")  # flushed before os._exit
    assert ("finalized" in result.stdout) == (world_size == 1)  # finalization (atexit) skipped with several ranks


def test_exit_process_without_a_code_is_success():
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(code=None, world_size=2)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "written"
