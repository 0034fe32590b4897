"""Entry point for `torchrun --nproc-per-node 2 run_scenarios.py OUT ONE`: every scenario of dist_scenario, once.

ONE holds checkpoints of 1-process runs (ONE/<scenario>/checkpoint) that are resumed here on 2 processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_scenario import CHECKPOINT_STEP, RESUMED, SCENARIOS, save_rank_marked_adapter, train

from lorafit import distributed


@distributed.record_errors
def main(out: Path, one_process_checkpoints: Path) -> None:
    distributed.init(timeout_minutes=5)
    for name in SCENARIOS:
        wrapped = train(name, out / name)
        if name.startswith("fsdp"):
            save_rank_marked_adapter(wrapped, out / name / "adapter-rank-marked")
    for name in RESUMED:  # interrupted after CHECKPOINT_STEP steps, then resumed on 2 processes
        train(name, out / f"{name}-first", stop=CHECKPOINT_STEP, checkpoint_at=CHECKPOINT_STEP)
        train(name, out / f"{name}-resumed", start=CHECKPOINT_STEP, resume_from=out / f"{name}-first" / "checkpoint")
        train(name, out / f"{name}-from-one", start=CHECKPOINT_STEP,  # a checkpoint written by a 1-process run
              resume_from=one_process_checkpoints / name / "checkpoint")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
