"""Entry point for `torchrun --nproc-per-node 2 run_scenarios.py OUT`: every scenario of dist_scenario, once."""

from __future__ import annotations

import sys
from pathlib import Path

from dist_scenario import CHECKPOINT_STEP, RESUMED, SCENARIOS, save_rank_marked_adapter, scenario_name, train

from lorafit import distributed


def main(out: Path) -> None:
    distributed.init(timeout_minutes=5)
    for strategy, quantized in SCENARIOS:
        wrapped = train(strategy, quantized, out / scenario_name(strategy, quantized))
        if strategy == "fsdp":
            save_rank_marked_adapter(wrapped, out / scenario_name(strategy, quantized) / "adapter-rank-marked")
    for strategy, quantized in RESUMED:  # interrupted after CHECKPOINT_STEP steps, then resumed on 2 processes
        name = scenario_name(strategy, quantized)
        train(strategy, quantized, out / f"{name}-first", stop=CHECKPOINT_STEP, checkpoint_at=CHECKPOINT_STEP)
        train(strategy, quantized, out / f"{name}-resumed", start=CHECKPOINT_STEP,
              resume_from=out / f"{name}-first" / "checkpoint")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
