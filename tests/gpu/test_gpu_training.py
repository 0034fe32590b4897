"""On CUDA: a short bf16 SFT run of the tiny Llama (tests/train/conftest.py's tiny_run), and, with 2 GPUs, an NCCL
all-reduce through lorafit.distributed under torchrun. Marked `gpu` (skipped with the reason where CUDA is absent)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train.conftest import tiny_run  # noqa: F401 - the fixture, shared with tests/train

import lorafit
from lorafit.run_config import load_run_config
from lorafit.train import sft

pytestmark = pytest.mark.gpu
HERE = Path(__file__).parent


def test_short_bf16_sft_run_on_cuda_learns(tiny_run):  # noqa: F811
    out = tiny_run / "out_cuda"
    config = load_run_config(tiny_run / "run.yaml", [f"output_dir={out}", "training.bf16=true",
                                                      "evaluation.generation=false"])
    result = sft.train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert result.steps == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]  # lr 5e-3 on 8 rows: the loss falls within 6 steps
    assert all("cuda_max_allocated_mib" in row and row["model_flops_per_s"] > 0 for row in rows if "loss" in row)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL smoke: needs 2 CUDA GPUs")
def test_nccl_all_reduce_on_two_gpus():
    src = Path(lorafit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(src)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "nccl_smoke.py")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
