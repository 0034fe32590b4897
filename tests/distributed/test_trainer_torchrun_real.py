"""`torchrun -m lorafit train` on the real SmolLM2-135M (FSDP2, 2 gloo processes, 2 steps) equals 1 process."""

from __future__ import annotations

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file

from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train import sft

pytestmark = pytest.mark.slow


def test_smollm2_on_two_processes_equals_one(tmp_path, smollm2):  # smollm2: the cached model, fetched once
    data = tmp_path / "train.jsonl"
    data.write_text("".join(
        f'{{"messages": [{{"role": "user", "content": "What is {a} + {a}?"}}, '
        f'{{"role": "assistant", "content": "{2 * a}"}}]}}\n' for a in range(12)))
    (tmp_path / "run.yaml").write_text(f"""
model: smollm2-135m
adapter: {{r: 8, alpha: 16, dropout: 0.0}}
data: {{train: {data}, max_seq_len: 64, packing: false}}
training: {{max_steps: 2, batch_size: 6, micro_batch_size: 2, lr: 1.0e-3, bf16: false, seed: 0}}
evaluation: {{generation: false}}
distributed: {{strategy: fsdp, timeout_minutes: 10}}
""")
    sft.train(load_run_config(tmp_path / "run.yaml", [f"output_dir={tmp_path / 'one'}"]))
    torchrun("-m", "lorafit", "train", str(tmp_path / "run.yaml"), f"output_dir={tmp_path / 'two'}")
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    print("losses 1 process", [r["loss"] for r in one], "2 processes", [r["loss"] for r in two])
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=0)
    a, b = (load_file(str(tmp_path / name / "adapter" / WEIGHTS_NAME)) for name in ("one", "two"))
    assert sorted(a) == sorted(b) and len(a) == 30 * 7 * 2
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |adapter 2 processes - 1 process| = {diff:.1e}")
    # Not 1e-5 here: AdamW moves each weight by about lr x g / |g| per step, so a gradient component near 0 whose
    # sign depends on the summation order (2 ranks vs 1) moves by up to 2 x lr the other way. Measured: 1.3e-3
    # (lr 1e-3, 2 steps) while the losses agree to 6e-7. The tiny-model tests check the adapter at 1e-5.
    assert diff <= 2 * 1e-3 * 2
