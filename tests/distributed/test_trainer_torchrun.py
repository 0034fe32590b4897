"""`lorafit train` itself on 2 processes (torchrun, gloo, CPU) vs 1 process: tiny Llama, fp32 and 4-bit base, DDP
and FSDP2; metrics, adapter, checkpoints and resume (on 2 and on 1 process) through the real trainer.

One torchrun launch runs the four 2-process trainings (run_trainer_scenarios.py calls the CLI's main for each);
a second launch, `python -m torch.distributed.run ... -m lorafit train --resume`, resumes one of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file
from tiny_models import save_tiny_chat_llama

from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train import sft
from lorafit.train.checkpoint import read_checkpoint

HERE = Path(__file__).parent
ROWS = [("Ship two red mugs to Oslo.", '{"item": "mug", "quantity": 2}'),
        ("Send one blue lamp to Rome.", '{"item": "lamp", "quantity": 1}'),
        ("Could five green boxes go to Lima?", '{"item": "box", "quantity": 5}'),
        ("Please deliver three pink cups to Paris.", '{"item": "cup", "quantity": 3}'),
        ("Mail seven black pens to Cairo now.", '{"item": "pen", "quantity": 7}')] * 3
SCENARIOS = [("ddp", "fp32"), ("fsdp", "fp32"), ("ddp", "nf4"), ("fsdp", "nf4")]
RESUMED = ("fsdp", "nf4")
STEPS = 4


def overrides(base: str, out: Path, strategy: str | None = None) -> list[str]:
    extra = [f"output_dir={out}"] + (["quantize=nf4"] if base == "nf4" else [])
    return extra + ([f"distributed.strategy={strategy}"] if strategy else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Llama run (15 rows, 6 a step: step 3 ends the epoch with 3 rows, shares of 2 and 1, so rank 1 runs
    a filler micro-batch; step 4 starts the next epoch),
    trained on 1 process here and on 2 processes by torchrun; then the 2-process FSDP/NF4 run resumed from its
    step-2 checkpoint on 2 processes (python -m lorafit) and on 1."""
    root = tmp_path_factory.mktemp("trainer")
    save_tiny_chat_llama(root / "model", hidden_size=64)
    for name, rows in (("train", ROWS), ("eval", ROWS[:5])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": reply}]}) + "\n" for user, reply in rows))
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
adapter: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_seq_len: 64, packing: false}}
training: {{max_steps: {STEPS}, batch_size: 6, micro_batch_size: 1, lr: 2.0e-2, warmup_steps: 1, save_every: 2,
           max_grad_norm: 0.5, seed: 3}}
evaluation: {{every: 2, generation: true, metric: json, max_new_tokens: 4}}
distributed: {{timeout_minutes: 5}}
""")
    out = root / "out"
    for base in ("fp32", "nf4"):
        sft.train(load_run_config(root / "run.yaml", overrides(base, out / f"one-{base}")))
    argv = [["train", str(root / "run.yaml"), *overrides(base, out / f"two-{strategy}-{base}",
                                                          None if (strategy, base) == ("ddp", "fp32") else strategy)]
            for strategy, base in SCENARIOS]  # ddp-fp32 leaves the strategy to auto (the tiny model fits: ddp)
    (root / "runs.json").write_text(json.dumps(argv))
    launched = torchrun(str(HERE / "run_trainer_scenarios.py"), str(root / "runs.json"))

    strategy, base = RESUMED
    for copy in ("resume-two", "resume-one"):  # interrupted after step 2: checkpoint step-2 and metrics up to 2
        shutil.copytree(out / f"two-{strategy}-{base}", out / copy)
        shutil.rmtree(out / copy / "adapter")
        (out / copy / "summary.json").unlink()
    resumed = torchrun("-m", "lorafit", "train", str(root / "run.yaml"),
                       *overrides(base, out / "resume-two", strategy), "--resume")
    sft.train(load_run_config(root / "run.yaml", overrides(base, out / "resume-one")), resume=True)
    return out, launched.stdout, resumed.stdout


def losses(folder: Path, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(folder / "metrics.jsonl") if key in row}


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter" / WEIGHTS_NAME)), load_file(str(b / "adapter" / WEIGHTS_NAME))
    assert sorted(x) == sorted(y) and len(x) == 7 * 2 * 2  # A and B of 7 linears x 2 blocks
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize(("strategy", "base"), SCENARIOS)
def test_two_processes_log_the_losses_and_save_the_adapter_of_one(runs, strategy, base):
    out, _, _ = runs
    two, one = out / f"two-{strategy}-{base}", out / f"one-{base}"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == list(range(1, STEPS + 1))  # rank 0 alone logs
    for key in ("loss", "eval_loss", "grad_norm"):
        mine, reference = losses(two, key), losses(one, key)
        assert sorted(mine) == sorted(reference) == ([2, 4] if key == "eval_loss" else list(range(1, STEPS + 1)))
        worst = max(abs(mine[s] - reference[s]) / abs(reference[s]) for s in reference)
        print(f"{strategy}-{base} {key}: max relative difference 2 vs 1 process {worst:.1e}")
        torch.testing.assert_close([mine[s] for s in sorted(mine)], [reference[s] for s in sorted(reference)],
                                   rtol=1e-5, atol=0)
    assert max(losses(one, "grad_norm").values()) > 0.5  # clipping at 0.5 is exercised
    assert losses(two, "tokens_seen") == losses(one, "tokens_seen")  # every rank's tokens counted once
    diff = adapter_diff(two, one)
    print(f"{strategy}-{base}: max |adapter 2 processes - 1 process| = {diff:.1e}")
    assert diff <= 1e-5
    assert json.loads((two / "summary.json").read_text())["eval_before"]["total"] == 5  # both ranks' shares summed
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["eval_before"]["correct"] == summary_one["eval_before"]["correct"]
    # after training each rank generates its share: DDP replicas as they are, FSDP with its weights unsharded
    assert summary_two["eval_after"]["total"] == 5
    assert summary_two["eval_after"]["correct"] == summary_one["eval_after"]["correct"]
    first_two, first_one = summary_two["eval_after"]["samples"][0], summary_one["eval_after"]["samples"][0]
    print(f"{strategy}-{base}: first reply after training, 2 processes {first_two} / 1 process {first_one}")
    assert first_two == first_one  # rank 0's share starts with the first example: the same greedy reply


def test_only_rank_zero_prints_and_auto_says_which_strategy(runs):
    _, stdout, _ = runs
    assert stdout.count("adapter saved to") == len(SCENARIOS)
    assert stdout.count("lorafit: 2 processes (gloo)") == 1
    assert "distributed strategy: ddp (one process needs" in stdout  # auto, the tiny model fits a device
    assert stdout.count("distributed strategy: fsdp (set in the config)") == 2


def test_checkpoint_holds_the_full_adapter_and_optimizer_state_by_name(runs):
    out, _, _ = runs
    two = read_checkpoint(RunDir(out / "two-fsdp-nf4").list_checkpoints()[-1])
    one = read_checkpoint(RunDir(out / "one-nf4").list_checkpoints()[-1])
    assert two.trainer.step == one.trainer.step == 2
    assert sorted(two.adapter) == sorted(one.adapter)
    assert max((two.adapter[k] - one.adapter[k]).abs().max().item() for k in one.adapter) <= 1e-5
    assert sorted(two.optimizer["state"]) == sorted(one.optimizer["state"])
    assert all(".lora_" in name for name in one.optimizer["state"])  # keyed by parameter name, not position
    for name, entry in one.optimizer["state"].items():
        assert entry["exp_avg"].shape == two.optimizer["state"][name]["exp_avg"].shape  # full, not a shard
        torch.testing.assert_close(two.optimizer["state"][name]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("where", ["resume-two", "resume-one"])
def test_resume_of_the_two_process_checkpoint_equals_the_uninterrupted_run(runs, where):
    out, _, resumed_stdout = runs
    whole = out / "two-{}-{}".format(*RESUMED)
    if where == "resume-two":
        assert "resumed from" in resumed_stdout and "step-00000002 at step 2" in resumed_stdout
    mine, reference = losses(out / where), losses(whole)
    assert sorted(mine) == list(range(1, STEPS + 1))  # the metrics past the checkpoint were replaced
    print(f"{where}: losses {mine} vs uninterrupted {reference}")
    torch.testing.assert_close([mine[s] for s in (3, 4)], [reference[s] for s in (3, 4)], rtol=1e-5, atol=0)
    assert adapter_diff(out / where, whole) <= 1e-5
