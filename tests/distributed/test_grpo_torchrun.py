"""`lorafit train` with method grpo on 2 processes (torchrun, gloo, CPU), DDP and FSDP2, vs 1 process given the same
completions.

Each rank samples the groups of its own prompts (a prompt's group never leaves its rank) from its own generator, so
2 processes draw other completions than 1 process; what must hold is that, given the same completions, they take
the same steps. The 2-process runs record every rank's completions (run_grpo_recording.py); each 1-process run
replays the completions of its 2-process twin (grpo.sample patched to score the recorded ids) and everything else
runs as usual: advantages per group, the reference pass, num_iterations updates with the loss averaged over all
completion tokens of the step, clipping, logging, the greedy evaluation. Losses, grad norms, reward columns and
held-out rewards at rtol 1e-5, as the SFT and DPO equality tests (fp32 sums in another order: ~1e-7 relative;
the loss also within 1e-6 absolute, see below); the saved adapters within 1e-5.

5 prompts, 3 a step, 1 per micro-batch: a step of 3 prompts gives shares of 2 and 1, so rank 1 samples and runs a
filler group (weight 0); the epoch's second step has 2 prompts, 1 each; 3 held-out prompts in batches of 2: shares of 2 and 1.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file
from tiny_models import save_tiny_chat_llama

from lorafit import distributed
from lorafit.adapters.io import WEIGHTS_NAME
from lorafit.run_config import load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train import grpo

HERE = Path(__file__).parent
QUESTIONS = ["Hello!", "Tell me a joke about cats.", "What is the capital of France?", "Write a short poem.",
             "Name a colour."]
REWARDS = '''
def vowel_share(prompts, completions, letters, **fields):
    return [sum(ch in l for ch in c) / max(len(c), 1) for c, l in zip(completions, letters)]

def brevity(prompts, completions, **fields):
    return [-len(c) / 20 for c in completions]
'''
STEPS, GROUP, WORLD = 3, 4, 2
STRATEGIES = ("ddp", "fsdp")
COLUMNS = ("loss", "kl", "clip_fraction", "grad_norm", "reward_mean", "reward_std", "reward/vowel_share",
           "reward/brevity", "completion_length", "frac_reward_zero_std")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-torchrun")
    save_tiny_chat_llama(root / "model", head_scale=30)
    for name, questions in (("train", QUESTIONS), ("eval", QUESTIONS[1:4])):
        rows = [{"messages": [{"role": "user", "content": q}], "letters": "aeiou"} for q in questions]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
method: grpo
rewards: [{root / 'rewards.py'}:vowel_share, {{function: {root / 'rewards.py'}:brevity, weight: 0.5}}]
adapter: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_seq_len: 64}}
training: {{max_steps: {STEPS}, batch_size: 3, micro_batch_size: 1, lr: 1.0e-2, save_every: 0, max_grad_norm: 1.0,
           seed: 3}}
evaluation: {{every: 2, max_new_tokens: 4, batch_size: 2}}
grpo: {{num_generations: {GROUP}, max_new_tokens: 5, num_iterations: 2, beta: 0.1, temperature: 1.0}}
distributed: {{timeout_minutes: 5}}
""")
    out, records = root / "out", root / "records"
    records.mkdir()
    argv = [["train", str(root / "run.yaml"), f"output_dir={out / f'two-{s}'}", f"distributed.strategy={s}"]
            for s in STRATEGIES]
    (root / "runs.json").write_text(json.dumps(argv))
    launched = torchrun(str(HERE / "run_grpo_recording.py"), str(root / "runs.json"), str(records))

    recorded = defaultdict(dict)  # (run, step) -> rank -> entry
    for rank in range(WORLD):
        for line in (records / f"samples-rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            recorded[(Path(entry["run"]).name, entry["step"])][rank] = entry
    for strategy in STRATEGIES:
        replay_two_process_samples(root, out / f"one-{strategy}", recorded, f"two-{strategy}")
    return out, launched.stdout


def replay_two_process_samples(root: Path, out: Path, recorded: dict, twin: str) -> None:
    """A 1-process run whose completions are its 2-process twin's, put back into the order one process samples:
    prompt i of a step was sampled by rank i % 2 as its (i // 2)-th prompt (distributed.share)."""
    def replay(model, state, prompts, functions):
        by_rank = recorded[(twin, state.trainer.step)]
        ids = []
        for i, prompt in enumerate(prompts):
            entry, j = by_rank[i % WORLD], i // WORLD
            assert entry["sources"][j] == prompt.source  # the twin's rank sampled this very prompt
            ids += entry["completion_ids"][j * GROUP:(j + 1) * GROUP]
        with state.timed("generation"):
            pass  # replayed, not generated: the phase the step row logs takes no time
        with state.timed("rewards"):
            return grpo.score_samples([p for p in prompts for _ in range(GROUP)], ids, state.tokenizer, functions)

    real, grpo.sample = grpo.sample, replay
    try:
        grpo.train(load_run_config(root / "run.yaml", [f"output_dir={out}"]))
    finally:
        grpo.sample = real


def column(folder: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(folder / "metrics.jsonl") if key in row}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_take_the_steps_of_one_given_the_same_completions(runs, strategy):
    out, _ = runs
    two, one = out / f"two-{strategy}", out / f"one-{strategy}"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == list(range(1, STEPS + 1))
    for key in (*COLUMNS, "eval_reward"):
        mine, reference = column(two, key), column(one, key)
        assert sorted(mine) == sorted(reference) == ([2, 3] if key == "eval_reward" else list(range(1, STEPS + 1)))
        got, want = [mine[s] for s in sorted(mine)], [reference[s] for s in sorted(reference)]
        print(f"grpo {strategy} {key}: 2 processes {got} vs 1 process {want}")
        # the loss is a mean of per-token terms of size |advantage| ~ 1 that cancel to ~1e-2: fp32 reordering errors
        # scale with the terms (~1e-7), not with the mean, hence an absolute floor of 1e-6 for it (and kl, clip)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 if key in ("loss", "kl", "clip_fraction") else 0)
    assert column(one, "reward_std")[1] > 0  # the groups' rewards differ: the advantages are not all 0
    assert max(column(one, "kl").values()) > 0  # the policy moved off the reference
    a, b = load_file(str(two / "adapter" / WEIGHTS_NAME)), load_file(str(one / "adapter" / WEIGHTS_NAME))
    assert sorted(a) == sorted(b) and len(a) == 7 * 2 * 2
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"grpo {strategy}: max |adapter 2 processes - 1 process| = {diff:.1e}")
    assert diff <= 1e-5
    summary_two = json.loads((two / "summary.json").read_text())
    summary_one = json.loads((one / "summary.json").read_text())
    for phase in ("eval_before", "eval_after"):  # greedy: each rank answers its share of the 3 prompts
        assert summary_two[phase]["total"] == 3
        for key in ("reward_mean", "reward_stderr", "reward/vowel_share_mean", "completion_length"):
            assert summary_two[phase][key] == pytest.approx(summary_one[phase][key], rel=1e-6, abs=1e-9), key


def test_ranks_sample_their_own_prompts_from_their_own_generators(runs):
    out, stdout = runs
    assert stdout.count("adapter saved to") == len(STRATEGIES)
    assert stdout.count("held-out reward before training") == len(STRATEGIES)  # rank 0 alone prints
    records = out.parent / "records"
    by_rank = [[json.loads(line) for line in (records / f"samples-rank{r}.jsonl").read_text().splitlines()]
               for r in range(WORLD)]
    sizes = []
    for zero, one in zip(*by_rank):
        assert zero["step"] == one["step"] and zero["run"] == one["run"]
        assert len(zero["sources"]) == len(one["sources"])  # the same number of groups (forward passes) per rank
        assert not set(zero["sources"]) & set(one["sources"])  # disjoint shares: no group split across ranks
        assert zero["completion_ids"] != one["completion_ids"]
        if len(one["sources"]) == 2:  # a step of 3 prompts: rank 1's second group is a filler of its own prompt
            assert one["sources"][1] == one["sources"][0]
        sizes.append(len(zero["sources"]))
    assert 2 in sizes and 1 in sizes  # steps of 3 prompts and of 2 (an epoch of 5 prompts ends with 2)
    assert distributed.share(["a", "b", "c"], 1, WORLD) == ["b"]  # the replay's rule: prompt i on rank i % 2
