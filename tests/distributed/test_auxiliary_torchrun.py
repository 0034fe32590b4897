"""modules_to_save and trainable token rows (with an added token) on 2 processes (torchrun, gloo, CPU), DDP and
FSDP2, through `lorafit train`: the same losses and the same saved adapter as 1 process."""

from __future__ import annotations

import json

import pytest
from launch import HERE, torchrun
from safetensors.torch import load_file
from tiny_models import write_tiny_run

from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train import sft

EXTRA = ["training.max_steps=3", "training.save_every=0", "evaluation.every=0", "evaluation.generation=false",
         "adapter.dropout=0", "data.added_tokens=['<tool_call>']",
         "adapter.modules_to_save=[norm]",  # PEFT's rule: every module whose name ends with 'norm' (5 RMSNorms)
         "adapter.trainable_token_indices={embed_tokens: ['<tool_call>', '{'], lm_head: ['<tool_call>', '{']}"]


def test_two_processes_train_copies_and_rows_as_one(tmp_path):
    root = write_tiny_run(tmp_path)
    sft.train(load_run_config(root / "run.yaml", [f"output_dir={root / 'one'}", *EXTRA]))
    runs = [["train", str(root / "run.yaml"), f"output_dir={root / f'two-{s}'}", f"distributed.strategy={s}", *EXTRA]
            for s in ("ddp", "fsdp")]
    (root / "runs.json").write_text(json.dumps(runs))
    torchrun(str(HERE / "run_trainer_scenarios.py"), str(root / "runs.json"))

    one = load_file(str(root / "one" / "adapter" / WEIGHTS_NAME))
    assert sum(k.endswith("norm.weight") for k in one) == 5 and sum("trainable_tokens_delta" in k for k in one) == 2
    expected = [row["loss"] for row in read_metrics(root / "one" / "metrics.jsonl")]
    for strategy in ("ddp", "fsdp"):
        losses = [row["loss"] for row in read_metrics(root / f"two-{strategy}" / "metrics.jsonl")]
        assert losses == pytest.approx(expected, rel=1e-6, abs=1e-7), strategy  # sums in another order
        two = load_file(str(root / f"two-{strategy}" / "adapter" / WEIGHTS_NAME))
        assert sorted(two) == sorted(one)
        assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-6, strategy
