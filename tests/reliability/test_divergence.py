"""A NaN or infinite loss stops SFT and GRPO with one line (exit 2) before the bad step is applied or logged; the
checkpoints written before it survive, verify, and resume from them works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import write_tiny_run

from lorafit.cli import main
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train import grpo, sft
from lorafit.train.checkpoint import read_checkpoint

BAD_STEP = 3  # steps 1 and 2 are fine and checkpointed; the loss of step 3 is poisoned


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_run(tmp_path_factory.mktemp("diverge"))
    (root / "rewards.py").write_text("def short(prompts, completions, **fields):\n"
                                     "    return [-len(c) / 10 for c in completions]\n")
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in ("Hello!", "Name a colour.")]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "grpo.yaml").write_text(f"""
model: {root / 'model'}
method: grpo
rewards: [{root / 'rewards.py'}:short]
adapter: {{r: 4, alpha: 8}}
data: {{train: {root / 'prompts.jsonl'}, max_seq_len: 64}}
training: {{max_steps: 4, batch_size: 2, lr: 1.0e-2, save_every: 1, keep_checkpoints: 5, seed: 3}}
evaluation: {{generation: false, every: 0}}
grpo: {{num_generations: 2, max_new_tokens: 3, num_iterations: 1}}
""")
    return root


def _poison_from_step(monkeypatch, module, name: str, calls_per_step: int, value: float) -> None:
    """Make module.name's loss `value` (NaN or inf) from step BAD_STEP on: a real non-finite loss through backward."""
    real, calls = getattr(module, name), {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)  # a loss, or (loss, ...) for grpo_token_loss
        if calls["n"] <= (BAD_STEP - 1) * calls_per_step:
            return result
        return (result[0] * value, *result[1:]) if isinstance(result, tuple) else result * value

    monkeypatch.setattr(module, name, poisoned)


def _check_stopped_keeping_good_checkpoints(out: Path, err: str, code: int) -> None:
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lorafit train: error: loss is ")
    assert f"at step {BAD_STEP}; the last checkpoint is kept" in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, BAD_STEP))
    checkpoints = RunDir(out).list_checkpoints()
    assert [p.name for p in checkpoints] == [f"step-{s:08d}" for s in range(1, BAD_STEP)]
    for path in checkpoints:
        saved = read_checkpoint(path)
        assert all(t.isfinite().all() for t in saved.adapter.values())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_sft_stops_on_a_non_finite_loss_and_resumes_from_the_last_good_checkpoint(tiny, monkeypatch, capsys, value):
    out = tiny / f"sft_{value}"
    # 2 micro-batches a step (batch 2, micro 1): the loss sum is taken once per micro-batch
    _poison_from_step(monkeypatch, sft, "target_loss_sum", calls_per_step=2, value=value)
    code = main(["train", str(tiny / "run.yaml"), f"output_dir={out}", "evaluation.generation=false",
                 "evaluation.every=0", "training.save_every=1", "training.keep_checkpoints=5"])
    _check_stopped_keeping_good_checkpoints(out, capsys.readouterr().err, code)
    monkeypatch.undo()
    assert main(["train", str(tiny / "run.yaml"), f"output_dir={out}", "evaluation.generation=false",
                 "evaluation.every=0", "training.save_every=1", "training.keep_checkpoints=5", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_grpo_stops_on_a_non_finite_loss_keeping_the_last_good_checkpoint(tiny, monkeypatch, capsys):
    out = tiny / "grpo_nan"
    _poison_from_step(monkeypatch, grpo, "grpo_token_loss", calls_per_step=1, value=float("nan"))
    code = main(["train", str(tiny / "grpo.yaml"), f"output_dir={out}"])
    _check_stopped_keeping_good_checkpoints(out, capsys.readouterr().err, code)
