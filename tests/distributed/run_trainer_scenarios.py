"""Entry point for `torchrun --nproc-per-node 2 run_trainer_scenarios.py RUNS.json`: `lorafit train` (the CLI's own
main, the trainer unchanged) once per argument list in RUNS.json, all in one launch to save start-up time."""

from __future__ import annotations

import json
import os
import sys

from lorafit import distributed
from lorafit.__main__ import exit_process
from lorafit.cli import main


@distributed.record_errors
def run_all(runs_file: str) -> None:
    try:
        for argv in json.loads(open(runs_file, encoding="utf-8").read()):
            code = main(argv)
            if code != 0:
                raise SystemExit(f"lorafit {' '.join(argv)} ended with exit code {code}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_all(sys.argv[1])
    exit_process(0, int(os.environ.get("WORLD_SIZE", "1")))  # as `python -m lorafit` ends a multi-process run
