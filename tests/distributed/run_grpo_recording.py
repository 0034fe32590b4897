"""Entry point for `torchrun --nproc-per-node 2 run_grpo_recording.py RUNS.json RECORD_DIR`: `lorafit train` (the
CLI's main) once per argument list, with GRPO's sampling recorded: every call of grpo.sample appends the run, step,
rank, its prompts' sources and the sampled completion ids to RECORD_DIR/samples-rank{R}.jsonl, so that a
1-process run can replay the very completions (test_grpo_torchrun.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from run_trainer_scenarios import run_all

from lorafit import distributed
from lorafit.train import grpo


def record_into(folder: Path) -> None:
    sample = grpo.sample

    def recorded(model, state, prompts, functions):
        samples = sample(model, state, prompts, functions)
        entry = {"run": str(state.config.output_dir), "step": state.trainer.step, "rank": distributed.rank(),
                 "sources": [p.source for p in prompts], "completion_ids": samples.completion_ids}
        with open(folder / f"samples-rank{distributed.rank()}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        return samples

    grpo.sample = recorded


if __name__ == "__main__":
    record_into(Path(sys.argv[2]))
    run_all(sys.argv[1])
