"""DPO end to end on a tiny model saved to disk: metrics, the step-0 loss with each kind of reference, learning,
resume, gradient accumulation, the saved adapter in PEFT, QLoRA, the report, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import save_tiny_chat_llama
from train.dpo_rows import LONG, QUESTIONS, SHORT

from lorafit.cli import main
from lorafit.config import ConfigError
from lorafit.run_config import load_run_config
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train import dpo
from lorafit.train.dpo_loss import METRICS

MEASURE = '''
def short(prompts, completions, **fields):
    return [float(len(c) <= 12) for c in completions]
'''
LN2 = math.log(2)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A tiny Llama whose output head is scaled up (so that a small adapter can move sequence log-probs, as in a
    trained model), preference files (chosen short, rejected long), a measure file and a run YAML."""
    root = tmp_path_factory.mktemp("dpo_run")
    save_tiny_chat_llama(root / "model", hidden_size=32, head_scale=30)
    rows = [{"prompt": q, "chosen": s, "rejected": long} for q, s, long in zip(QUESTIONS, SHORT, LONG)]
    rows[1] = {"prompt": [{"role": "user", "content": QUESTIONS[1]}],  # TRL's conversational format too
               "chosen": [{"role": "assistant", "content": SHORT[1]}],
               "rejected": [{"role": "assistant", "content": LONG[1]}]}
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "measure.py").write_text(MEASURE)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
output_dir: {root / 'out'}
method: dpo
adapter: {{r: 4, alpha: 8, dropout: 0.1}}
dpo: {{beta: 0.1}}
data: {{train: train.jsonl, eval: eval.jsonl, max_seq_len: 128}}
training: {{max_steps: 4, batch_size: 4, micro_batch_size: 2, lr: 1.0e-2, save_every: 2, keep_checkpoints: 2,
           seed: 3}}
evaluation: {{every: 2, measure: measure.py:short, max_new_tokens: 8}}
""")
    return root


def run(root, *overrides, resume=False):
    return dpo.train(load_run_config(root / "run.yaml", list(overrides)), resume=resume)


def test_cli_run_logs_dpo_metrics_evaluates_and_reports(dpo_run, capsys):
    out = dpo_run / "out_cli"
    assert main(["train", str(dpo_run / "run.yaml"), f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "done: 4 steps" in printed and "preference accuracy" in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", *METRICS} <= set(r) for r in rows)
    # B = 0 start: the policy is its reference, delta = 0, loss = ln 2 (dropout acts on the adapter branch only)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6) and rows[0]["rewards/accuracies"] == 0
    for r in rows:  # the margin is chosen - rejected, both logged as means over the step's pairs
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert [p.name for p in RunDir(out).list_checkpoints()] == ["step-00000002"]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["metric"] == "preference" and before["total"] == 4
    assert before["accuracy"] == 0 and before["loss"] == pytest.approx(LN2, abs=1e-6)  # every pair ties at step 0
    assert after["accuracy"] == rows[-1]["eval_rewards/accuracies"] and after["loss"] == rows[-1]["eval_loss"]
    for e in (before, after):
        assert e["measure"]["name"] == "short" and e["measure"]["total"] == 4 and 0 <= e["measure"]["mean"] <= 1
        assert len(e["samples"]) == 3 and e["samples"][0]["prompt"] == QUESTIONS[0]
    page = (out / "report.html").read_text()
    assert 'alt="DPO rewards' in page and 'alt="Preference accuracy' in page and 'alt="DPO log-probs' in page
    assert "no loss-curve diagnosis for this run" in page and not (out / "diagnosis.json").exists()
    assert "short (greedy, 4 replies)" in page  # the behaviour measure's row, before and after
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_preference_accuracy_rises(dpo_run):
    """A sign error in the loss or a chosen/rejected mix-up would leave held-out pairs ranked the wrong way."""
    result = run(dpo_run, f"output_dir={dpo_run / 'out_learn'}", "training.max_steps=12", "training.save_every=0",
                 "evaluation.every=0", "evaluation.generation=false")
    before, after = result.eval_before, result.eval_after
    print(f"held-out preference accuracy {before['accuracy']} -> {after['accuracy']}, "
          f"margin {before['rewards/margins']:.3f} -> {after['rewards/margins']:.3f}")
    assert before["accuracy"] == 0 and after["accuracy"] == 1  # measured: 0 -> 1 (every pair ties at step 0)
    assert after["rewards/margins"] > 0.5  # measured 2.2
    assert after["loss"] < 0.5 * LN2


@pytest.mark.parametrize("variant", [[], ["adapter.use_dora=true", "adapter.init=pissa_niter_2"],
                                     ["dpo.precompute_reference=true", "dpo.loss=ipo"]],
                         ids=["lora", "dora-pissa", "precomputed-ipo"])
def test_resume_reproduces_the_uninterrupted_run(dpo_run, monkeypatch, variant):
    """The reference after a resume is still the step-0 policy: the resumed steps equal the uninterrupted ones."""
    tag = len(variant) + 10 * ("dpo.loss=ipo" in variant)
    full = dpo_run / f"out_full{tag}"
    run(dpo_run, f"output_dir={full}", "evaluation.generation=false", *variant)
    expected = read_metrics(full / "metrics.jsonl")

    broken = dpo_run / f"out_broken{tag}"
    real_step = dpo.train_step
    calls = {"n": 0}

    def crash_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # checkpoint step-2 exists, metrics logged up to 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(dpo, "train_step", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        run(dpo_run, f"output_dir={broken}", "evaluation.generation=false", *variant)
    monkeypatch.setattr(dpo, "train_step", real_step)
    result = run(dpo_run, f"output_dir={broken}", "evaluation.generation=false", *variant, resume=True)
    assert result.steps == 4 and result.eval_before is None
    resumed = read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert expected[2]["loss"] != pytest.approx(expected[0]["loss"])  # the adapter has moved by step 3
    for want, got in zip(expected, resumed):
        for key in ("loss", "grad_norm", *METRICS, "eval_loss", "eval_rewards/accuracies"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_gradient_accumulation_gives_the_same_steps(dpo_run):
    """micro_batch_size 1 (4 backward passes per step) equals the whole step in one pass: the loss is normalised
    per pair of the step, not per micro-batch."""
    logs = {}
    for micro in (1, 4):
        out = dpo_run / f"out_micro{micro}"
        run(dpo_run, f"output_dir={out}", f"training.micro_batch_size={micro}", "training.save_every=0",
            "evaluation.every=0", "evaluation.generation=false", "adapter.dropout=0.0")
        logs[micro] = read_metrics(out / "metrics.jsonl")
    assert logs[1][-1]["loss"] < LN2 - 0.05  # it learned: the comparison covers moved weights
    for one, whole in zip(logs[1], logs[4]):
        for key in ("loss", "grad_norm", *METRICS):
            assert one[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), (one["step"], key)


def test_saved_adapter_loads_in_peft_with_equal_logits(dpo_run):
    import peft
    from transformers import AutoModelForCausalLM

    import lorafit

    out = dpo_run / "out_peft"
    run(dpo_run, f"output_dir={out}", "training.save_every=0", "evaluation.every=0", "evaluation.generation=false")
    ids = torch.tensor([[5, 17, 40, 99, 120, 7, 3]])
    ours = lorafit.load_adapter(lorafit.load_model(str(dpo_run / "model"))[0], out / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dpo_run / "model"),
                                            str(out / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(dpo_run / "model").eval()
    with torch.no_grad():
        mine, peft_logits, base_logits = ours(ids).logits, theirs(ids).logits, base(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(mine, peft_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [["quantize=nf4"], ["quantize=nf4", "adapter.init=loftq"]], ids=["qlora", "loftq"])
def test_qlora_and_loftq_start_at_ln2_and_learn(dpo_run, variant):
    """On a 4-bit base the step-0 loss is ln 2 too: LoftQ's reference is its starting Q + s B0 A0 (swapped in),
    not the bare 4-bit Q that switching its adapter off would give."""
    out = dpo_run / f"out_{variant[-1].replace('=', '_')}"
    run(dpo_run, f"output_dir={out}", *variant, "training.max_steps=6", "training.save_every=0",
        "evaluation.every=0", "evaluation.generation=false", "adapter.dropout=0.0")
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05 and all(math.isfinite(r["grad_norm"]) for r in rows)


def test_training_on_from_a_saved_adapter_starts_at_its_own_reference(dpo_run):
    """init_adapter: the reference is the saved adapter (copied before training), so step 1 is at ln 2 again.
    (Adapter dropout 0: with B != 0, dropout on the adapter's input would make the training forward differ from
    the dropout-free reference, as in TRL.)"""
    first = run(dpo_run, f"output_dir={dpo_run / 'out_first'}", "training.save_every=0", "evaluation.every=0",
                "evaluation.generation=false", "adapter.dropout=0.0")
    second = run(dpo_run, f"output_dir={dpo_run / 'out_second'}", "adapter={}",
                 f"init_adapter={first.output_dir / 'adapter'}", "training.save_every=0", "evaluation.every=0",
                 "evaluation.generation=false")
    assert first.eval_after["loss"] < LN2 - 0.05  # the saved adapter ranks pairs: the base would not be a tie
    assert second.eval_before["loss"] == pytest.approx(LN2, abs=1e-6)
    assert read_metrics(second.output_dir / "metrics.jsonl")[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_a_missing_measure_fails_before_loading(dpo_run, tmp_path):
    with pytest.raises(ConfigError, match="has no function 'nope'; it defines short"):
        run(dpo_run, f"output_dir={tmp_path / 'o'}", "evaluation.measure=measure.py:nope")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_measure_is_for_dpo_only(dpo_run):
    with pytest.raises(ConfigError, match="evaluation.measure applies to method: dpo only"):
        load_run_config(dpo_run / "run.yaml", ["method=sft", "dpo={}"])
