"""GRPO end to end on a tiny model saved to disk: learning, metrics, checkpoints, resume, CLI, reward errors."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_chat_llama

from lorafit.cli import main
from lorafit.run_config import load_run_config
from lorafit.train import grpo
from lorafit.run_dir import RunDir
from lorafit.run_dir import read_metrics

QUESTIONS = ["Hello!", "Tell me a joke about cats.", "What is the capital of France?", "Write a short poem about the sea."]
REWARDS = '''
def vowel_share(prompts, completions, letters, **fields):
    return [sum(ch in l for ch in c) / max(len(c), 1) for c, l in zip(completions, letters)]

def brevity(prompts, completions, **fields):
    return [-len(c) / 20 for c in completions]
'''
FLAKY = '''
calls = 0

def flaky(prompts, completions, **fields):
    global calls
    calls += 1
    if calls == 3:
        raise ZeroDivisionError("division by zero")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A tiny Llama whose output head is scaled up (so that a small adapter can reshape its next-token
    distribution, as in a trained model), prompt files with a field the rewards read, a run YAML."""
    root = tmp_path_factory.mktemp("grpo_run")
    save_tiny_chat_llama(root / "model", hidden_size=32, head_scale=30)
    for name, count in (("train", 8), ("eval", 4)):
        rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % 4]}], "letters": "aeiou"} for i in range(count)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    (root / "flaky.py").write_text(FLAKY)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
output_dir: {root / 'out'}
method: grpo
rewards: [rewards.py:vowel_share, {{function: rewards.py:brevity, weight: 0.5}}]
adapter: {{r: 4, alpha: 8}}
data: {{train: train.jsonl, eval: eval.jsonl, max_seq_len: 64}}
training: {{max_steps: 4, batch_size: 2, lr: 1.0e-2, save_every: 2, keep_checkpoints: 2, seed: 3}}
evaluation: {{every: 2}}
grpo: {{num_generations: 4, max_new_tokens: 3, num_iterations: 2}}
""")
    return root


def run(root, *overrides, resume=False):
    return grpo.train(load_run_config(root / "run.yaml", list(overrides)), resume=resume)


def test_cli_run_writes_metrics_checkpoints_summary(grpo_run, capsys):
    out = grpo_run / "out_cli"
    assert main(["train", str(grpo_run / "run.yaml"), f"output_dir={out}"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    needed = {"loss", "lr", "grad_norm", "reward/vowel_share", "reward/brevity", "reward_mean", "reward_std", "kl",
              "completion_length", "clip_fraction", "generation_s", "update_s", "step_s", "peak_rss_mib"}
    assert all(needed <= set(r) for r in rows)
    for r in rows:  # the total is the weighted sum of the per-function means
        assert r["reward_mean"] == pytest.approx(r["reward/vowel_share"] + 0.5 * r["reward/brevity"], abs=1e-6)
        assert 1 <= r["completion_length"] <= 3
    assert any(r["clip_fraction"] > 0 for r in rows)  # num_iterations 2: the second pass can clip
    assert [r["step"] for r in rows if "eval_reward" in r] == [2, 4]
    assert [p.name for p in RunDir(out).list_checkpoints()] == ["step-00000002"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_before", "eval_after"):
        e = summary[key]
        assert e["total"] == 4 and {"reward_mean", "reward_stderr", "reward/vowel_share_mean",
                                    "reward/brevity_stderr"} <= set(e)
    assert summary["eval_after"]["reward_mean"] == rows[-1]["eval_reward"]
    assert {"generation_s", "update_s", "reference_s", "rewards_s"} <= set(summary["phases_s"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_rewards_rise(grpo_run):
    """A policy-gradient sign error or a misaligned advantage would make the vowel share fall or stay flat."""
    result = run(grpo_run, f"output_dir={grpo_run / 'out_learn'}", "rewards=[rewards.py:vowel_share]",
                 "training.max_steps=16", "training.save_every=0", "evaluation.every=0", "grpo.num_iterations=1")
    before, after = result.eval_before["reward_mean"], result.eval_after["reward_mean"]
    sampled = [r["reward_mean"] for r in read_metrics(grpo_run / "out_learn" / "metrics.jsonl")]
    print(f"held-out greedy vowel share {before:.3f} -> {after:.3f}; sampled per step {sampled}")
    assert after > before + 0.2  # measured 0.333 -> 0.667
    assert sum(sampled[-3:]) / 3 > sampled[0] + 0.25  # measured 0.17 -> 0.60


def test_resume_reproduces_the_uninterrupted_run(grpo_run, monkeypatch):
    full = grpo_run / "out_full"
    run(grpo_run, f"output_dir={full}")
    expected = read_metrics(full / "metrics.jsonl")

    broken = grpo_run / "out_broken"
    real_update = grpo.update_step
    calls = {"n": 0}

    def crash_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # two updates per step (num_iterations 2): the first update of step 3
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(grpo, "update_step", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        run(grpo_run, f"output_dir={broken}")
    monkeypatch.setattr(grpo, "update_step", real_update)
    result = run(grpo_run, f"output_dir={broken}", resume=True)
    assert result.steps == 4 and result.eval_before is None
    resumed = read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(expected[2:], resumed[2:]):  # same prompts, same samples (sampler RNG restored), same loss
        for key in ("reward_mean", "loss", "kl", "grad_norm", "completion_length"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)


def test_a_raising_reward_is_named_and_keeps_checkpoints(grpo_run, capsys):
    out = grpo_run / "out_flaky"
    code = main(["train", str(grpo_run / "run.yaml"), f"output_dir={out}", "rewards=[flaky.py:flaky]",
                 "training.save_every=1", "evaluation.generation=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "reward function " in err and "flaky.py:flaky raised ZeroDivisionError: division by zero" in err
    assert [p.name for p in RunDir(out).list_checkpoints()] == ["step-00000001", "step-00000002"]  # written before step 3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_training_on_from_a_saved_adapter(grpo_run):
    """init_adapter: the base model is evaluated too, and the KL is measured against the saved adapter."""
    first = run(grpo_run, f"output_dir={grpo_run / 'out_first'}", "training.save_every=0", "evaluation.every=0")
    second = run(grpo_run, f"output_dir={grpo_run / 'out_second'}", "adapter={}", f"init_adapter={first.output_dir / 'adapter'}",
                 "training.save_every=0", "evaluation.every=0", "grpo.beta=0.5", "grpo.num_iterations=1")
    assert second.eval_before["reward_mean"] == pytest.approx(first.eval_after["reward_mean"])  # starts where it was
    assert second.eval_base["reward_mean"] == pytest.approx(first.eval_before["reward_mean"])  # adapter off
    rows = read_metrics(grpo_run / "out_second" / "metrics.jsonl")
    assert rows[0]["kl"] < 1e-6 < rows[-1]["kl"]  # the policy starts as its reference, then moves away


def test_prompt_rows_are_checked(grpo_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(grpo.DataError, match=r"bad.jsonl:1: GRPO needs chat rows"):
        run(grpo_run, f"output_dir={tmp_path / 'o1'}", f"data.train={bad}")
    with pytest.raises(grpo.DataError, match=r"train.jsonl:1: the prompt has \d+ tokens, more than"):
        run(grpo_run, f"output_dir={tmp_path / 'o2'}", "data.max_seq_len=8")


def test_a_loftq_adapter_is_its_own_reference(grpo_run, capsys):
    """LoftQ starts at Q + s·B0 A0, not at the bare 4-bit Q: the KL of step 1 is 0, and `lorafit report` on a GRPO run
    adds no loss-curve diagnosis."""
    out = grpo_run / "out_loftq"
    run(grpo_run, f"output_dir={out}", "quantize=nf4", "adapter.init=loftq", "training.max_steps=2",
        "training.save_every=0", "evaluation.every=0", "grpo.beta=0.5", "grpo.num_iterations=1")
    assert read_metrics(out / "metrics.jsonl")[0]["kl"] < 1e-6
    assert main(["report", str(out)]) == 0
    assert "no loss-curve diagnosis for this run" in (out / "report.html").read_text()
