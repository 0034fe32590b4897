"""evaluation.early_stopping on 2 processes (torchrun, gloo, CPU), DDP and FSDP2, vs 1 process: every rank leaves
the loop at the same step (the launch ends; a rank leaving alone would hang the other in its next collective), the
stop and best steps are those of 1 process, and the saved adapter is the best step's, put back into DDP's replicas
and FSDP2's shards (distributed.load_full_parameters).

The held-out file pairs the training prompts with each other's replies: its loss falls, then rises within a few
steps (as in tests/train/test_early_stopping_e2e.py), far from any tie, so 1 and 2 processes decide alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file
from tiny_models import TINY_RUN_ROWS, save_tiny_chat_llama

from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train import sft

HERE = Path(__file__).parent
STRATEGIES = ("ddp", "fsdp")


def write_chats(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for user, reply in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same early-stopped run on 1 process here and on 2 processes (one torchrun launch, both strategies)."""
    root = tmp_path_factory.mktemp("early_stopping_torchrun")
    save_tiny_chat_llama(root / "model", head_scale=30)
    rows = TINY_RUN_ROWS[:4]
    write_chats(root / "train.jsonl", TINY_RUN_ROWS)
    write_chats(root / "contra.jsonl", [(user, rows[(i + 1) % 4][1]) for i, (user, _) in enumerate(rows)] * 2)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
adapter: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{train: {root / 'train.jsonl'}, eval: {root / 'contra.jsonl'}, max_seq_len: 128}}
training: {{max_steps: 12, batch_size: 2, micro_batch_size: 1, lr: 0.05, save_every: 1, keep_checkpoints: 20, seed: 3}}
evaluation: {{every: 1, generation: false, early_stopping: {{patience: 2}}}}
distributed: {{timeout_minutes: 3}}
""")
    out = root / "out"
    sft.train(load_run_config(root / "run.yaml", [f"output_dir={out / 'one'}"]))
    argv = [["train", str(root / "run.yaml"), f"output_dir={out / s}", f"distributed.strategy={s}"] for s in STRATEGIES]
    (root / "runs.json").write_text(json.dumps(argv))
    launched = torchrun(str(HERE / "run_trainer_scenarios.py"), str(root / "runs.json"), timeout=600)
    return out, launched.stdout


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_stop_where_one_does_and_save_the_best_adapter(runs, strategy):
    out, printed = runs
    one, two = (json.loads((out / name / "summary.json").read_text())["early_stopping"] for name in ("one", strategy))
    assert one["stopped_early"] and two["stopped_early"]
    assert (two["best_step"], two["stopped_at"]) == (one["best_step"], one["stopped_at"])
    assert two["best"] == pytest.approx(one["best"], rel=1e-5)
    stop, best = two["stopped_at"], two["best_step"]
    assert [r["step"] for r in read_metrics(out / strategy / "metrics.jsonl")] == list(range(1, stop + 1))
    # one line per run of the launch (ddp and fsdp stop at the same step): rank 0 alone prints it
    assert printed.count(f"early stopping at step {stop}: eval_loss has not improved for 2 evaluations") == 2
    # the saved adapter is the best step's exactly (its checkpoint, gathered from the same shards) and 1 process's
    saved = adapter(out / strategy / "adapter")
    kept = adapter(RunDir(out / strategy).checkpoint_path(best) / "adapter")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    reference = adapter(out / "one" / "adapter")
    assert max((saved[k] - reference[k]).abs().max().item() for k in saved) <= 1e-5
