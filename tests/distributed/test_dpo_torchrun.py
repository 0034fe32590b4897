"""`lorafit train` with method dpo on 2 processes (torchrun, gloo, CPU) vs 1 process: DDP and FSDP2, the reference
as the adapter switched off, as starting weights swapped in (init_adapter), and precomputed.

The step's pairs are split across the ranks (distributed.rank_chunks) and each pair's loss is scaled by
gradient_scale(pairs in the step), so 2 processes must compute the update of 1 up to float reordering: per-step
losses, grad norms and held-out figures at rtol 1e-5 (the SFT equality tests' tolerance; fp32 sums over a handful
of terms in another order differ by ~1e-7 relative), and the saved adapters within 1e-5.

7 training pairs, 3 a step, 1 per micro-batch: shares of 2 and 1, so rank 1 runs a filler micro-batch each step;
5 held-out pairs in batches of 2: shares of 3 and 2, so rank 1 runs a filler in every evaluation, and after
training rank 0 generates in 2 batches, rank 1 in 1 (the generation under FSDP must run no collective).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file
from tiny_models import save_tiny_chat_llama

from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train import dpo
from lorafit.train.dpo_loss import METRICS

HERE = Path(__file__).parent
QUESTIONS = ["Hello!", "Tell me a joke about cats.", "What is the capital of France?", "Write a short poem.",
             "Name a colour.", "Count to three.", "Say goodbye."]
SHORT = ["Hi.", "Cats nap.", "Paris.", "Waves.", "Red.", "1 2 3.", "Bye."]
LONG = ["Hello! How can I help you today? Ask me anything at all.",
        "Cats sleep all day and judge you all night, the lazy brown cats.",
        "The capital of France is Paris, a city on the river, the capital.",
        "The sea, the waves and the wind write a short poem all night.",
        "A colour, such as red or blue or green, is what I would name.",
        "One, two and three: counting to three is easy, as you see.",
        "Goodbye, it was nice to talk, see you again another day."]
MEASURE = "def short(prompts, completions, **fields):\n    return [float(len(c) <= 12) for c in completions]\n"
STEPS = 4
# (strategy, variant): fresh = reference is the adapter switched off, computed per micro-batch; init = reference is
# the init_adapter's starting weights swapped in (sharded like the parameters under FSDP); init-pre = those,
# precomputed once before training (each rank its share, gathered)
SCENARIOS = [("ddp", "fresh"), ("fsdp", "fresh"), ("fsdp", "init"), ("ddp", "init-pre")]


def variant_overrides(root: Path, variant: str) -> list[str]:
    if variant == "fresh":
        return []
    init = ["adapter={}", f"init_adapter={root / 'out' / 'one-fresh' / 'adapter'}"]
    return init + (["dpo.precompute_reference=true"] if variant == "init-pre" else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-torchrun")
    save_tiny_chat_llama(root / "model", head_scale=30)
    rows = [{"prompt": q, "chosen": s, "rejected": long} for q, s, long in zip(QUESTIONS, SHORT, LONG)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:6]))
    (root / "measure.py").write_text(MEASURE)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
method: dpo
adapter: {{r: 4, alpha: 8, dropout: 0.0}}
dpo: {{beta: 0.1}}
data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_seq_len: 128}}
training: {{max_steps: {STEPS}, batch_size: 3, micro_batch_size: 1, lr: 1.0e-2, warmup_steps: 1, save_every: 0,
           max_grad_norm: 1.0, seed: 3}}
evaluation: {{every: 2, batch_size: 2, measure: {root / 'measure.py'}:short, max_new_tokens: 6}}
distributed: {{timeout_minutes: 5}}
""")
    out = root / "out"
    for variant in ("fresh", "init", "init-pre"):  # fresh first: its adapter is the others' init_adapter
        dpo.train(load_run_config(root / "run.yaml", [f"output_dir={out / f'one-{variant}'}",
                                                      *variant_overrides(root, variant)]))
    argv = [["train", str(root / "run.yaml"), f"output_dir={out / f'two-{strategy}-{variant}'}",
             f"distributed.strategy={strategy}", *variant_overrides(root, variant)] for strategy, variant in SCENARIOS]
    (root / "runs.json").write_text(json.dumps(argv))
    launched = torchrun(str(HERE / "run_trainer_scenarios.py"), str(root / "runs.json"))
    return out, launched.stdout


def column(folder: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(folder / "metrics.jsonl") if key in row}


@pytest.mark.parametrize(("strategy", "variant"), SCENARIOS)
def test_two_processes_train_dpo_as_one(runs, strategy, variant):
    out, _ = runs
    two, one = out / f"two-{strategy}-{variant}", out / f"one-{variant}"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "eval_loss", *METRICS, "eval_rewards/margins"):
        mine, reference = column(two, key), column(one, key)
        assert sorted(mine) == sorted(reference) == ([2, 4] if key.startswith("eval") else list(range(1, STEPS + 1)))
        got, want = [mine[s] for s in sorted(mine)], [reference[s] for s in sorted(reference)]
        print(f"{strategy}-{variant} {key}: 2 processes {got} vs 1 process {want}")
        # rewards are 0 at step 1 of a fresh start (policy = reference): an absolute floor for values near 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 if "rewards" in key else 0)
    assert max(column(one, "loss").values()) < 0.7  # the loss moved off its start ...
    assert column(one, "rewards/margins")[STEPS] > 0.01  # ... and the chosen replies gained on the rejected ones
    a, b = load_file(str(two / "adapter" / WEIGHTS_NAME)), load_file(str(one / "adapter" / WEIGHTS_NAME))
    assert sorted(a) == sorted(b) and len(a) == 7 * 2 * 2
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{strategy}-{variant}: max |adapter 2 processes - 1 process| = {diff:.1e}")
    assert diff <= 1e-5
    summary_two = json.loads((two / "summary.json").read_text())
    summary_one = json.loads((one / "summary.json").read_text())
    for phase in ("eval_before", "eval_after"):
        assert summary_two[phase]["total"] == 5  # both ranks' shares of the held-out pairs counted once
        assert summary_two[phase]["correct"] == summary_one[phase]["correct"]
        assert summary_two[phase]["loss"] == pytest.approx(summary_one[phase]["loss"], rel=1e-5)
    assert summary_two["eval_before"]["measure"] == summary_one["eval_before"]["measure"]  # greedy, each rank a share
    # after training too: DDP replicas generate their shares as they are, FSDP ranks with the weights unsharded
    assert summary_two["eval_after"]["measure"] == summary_one["eval_after"]["measure"]


def test_only_rank_zero_prints(runs):
    _, stdout = runs
    assert stdout.count("adapter saved to") == len(SCENARIOS)
    assert stdout.count("preference accuracy") == 2 * len(SCENARIOS)  # before training, then the side by side
