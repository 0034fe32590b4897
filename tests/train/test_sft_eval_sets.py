"""The SFT trainer with evaluation.sets, the forgetting check and NEFTune, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lorafit
from lorafit import distributed
from lorafit.evaluation.eval_sets import evaluate_sets
from lorafit.run_config import ConfigError, EvaluationConfig, load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train import sft
from lorafit.train.batches import fixed_batches, prepare_rows


def config_file(root, name, **sections):
    """run.yaml of the tiny_run fixture with `sections` merged in (section -> {key: value})."""
    raw = yaml.safe_load((root / "run.yaml").read_text())
    raw["output_dir"] = str(root / name)
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def sets_run(tiny_run):
    """A run scoring two named sets, with the forgetting check forced on (CPU: auto would skip it)."""
    sets = {"in_distribution": str(tiny_run / "eval.jsonl"),
            "other": {"path": str(tiny_run / "train.jsonl"), "metric": "exact"}}
    path = config_file(tiny_run, "out_sets", evaluation={"sets": sets, "forgetting": True})
    return tiny_run, sft.train(load_run_config(path))


def test_eval_sets_are_scored_before_and_after_and_written(sets_run):
    root, result = sets_run
    out = root / "out_sets"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_sets_before", "eval_sets_after"):
        assert list(summary[key]) == ["in_distribution", "other"]
        assert summary[key] == getattr(result, key)
        assert summary[key]["in_distribution"]["total"] == 4 and summary[key]["other"]["total"] == 12
        assert summary[key]["other"]["metric"] == "exact" and summary[key]["in_distribution"]["metric"] == "json"
    # in_distribution is data.eval under the same metric: the generation eval's replies, not generated twice
    for key, generation in (("eval_sets_before", "eval_before"), ("eval_sets_after", "eval_after")):
        assert summary[key]["in_distribution"] == {"path": str(root / "eval.jsonl"), **summary[generation]}
    # the after figures are those of the saved adapter, scored again from disk
    base, tokenizer = lorafit.load_model(str(root / "model"))
    adapted = lorafit.load_adapter(base, out / "adapter")
    again = evaluate_sets(adapted, tokenizer, {"in_distribution": (root / "eval.jsonl", "json"),
                                               "other": (root / "train.jsonl", "exact")}, max_new_tokens=8)
    for name, scored in again.items():
        assert {k: scored[k] for k in ("correct", "total", "accuracy", "stderr")} == \
            {k: summary["eval_sets_after"][name][k] for k in ("correct", "total", "accuracy", "stderr")}
    page = (out / "report.html").read_text()
    assert "Evaluation sets: before / after ± SE" in page and "in_distribution" in page and "other" in page
    after = summary["eval_sets_after"]["in_distribution"]
    assert f"{after['accuracy']:.1%} ± {after['stderr']:.1%}" in page


def test_forgetting_figures_in_summary_and_report(sets_run):
    root, result = sets_run
    forgetting = json.loads((root / "out_sets" / "summary.json").read_text())["forgetting"]
    assert forgetting == result.forgetting
    assert forgetting["kl_per_token"] >= 0 and forgetting["kl_tokens"] > 0
    assert forgetting["ppl_ratio"] > 0 and forgetting["ppl_base"] > 0 and forgetting["ppl_tuned"] > 0
    assert forgetting["ppl_ratio"] == pytest.approx(forgetting["ppl_tuned"] / forgetting["ppl_base"], rel=1e-9)
    assert 0 <= forgetting["changed"] <= forgetting["prompts"] == 14
    page = (root / "out_sets" / "report.html").read_text()
    assert "Forgetting check: base vs adapter on general prompts" in page
    assert f"{forgetting['kl_per_token']:.4f}" in page and f"{forgetting['ppl_ratio']:.4f}" in page


def test_without_sets_or_forgetting_the_summary_has_neither(tiny_run):
    out = tiny_run / "out_plain"
    sft.train(load_run_config(tiny_run / "run.yaml", [f"output_dir={out}", "training.max_steps=2"]))
    summary = json.loads((out / "summary.json").read_text())
    assert not {"eval_sets_before", "eval_sets_after", "forgetting"} & set(summary)  # auto is off on CPU
    page = (out / "report.html").read_text()
    assert "Evaluation sets:" not in page and "Forgetting check" not in page


def test_forgetting_auto_follows_the_device():
    auto, on, off = (EvaluationConfig(forgetting=v) for v in ("auto", True, False))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # constructing a device needs no GPU
    assert [sft.forgetting_enabled(c, cpu) for c in (auto, on, off)] == [False, True, False]
    assert [sft.forgetting_enabled(c, cuda) for c in (auto, on, off)] == [True, True, False]


def test_bad_forgetting_value_is_a_config_error(tiny_run):
    with pytest.raises(ConfigError, match="evaluation.forgetting='sometimes'"):
        load_run_config(tiny_run / "run.yaml", ["evaluation.forgetting=sometimes"])


def test_neftune_changes_training_but_not_evaluation(tiny_run):
    """alpha > 0 changes the step-1 loss (noise in the training forward); the logged eval losses equal a clean
    recomputation with the saved adapter (evaluation runs in eval mode: no noise)."""
    common = ["training.max_steps=3", "evaluation.generation=false"]
    plain = tiny_run / "out_nef0"
    noisy = tiny_run / "out_nef5"
    sft.train(load_run_config(tiny_run / "run.yaml", [f"output_dir={plain}", *common]))
    sft.train(load_run_config(tiny_run / "run.yaml", [f"output_dir={noisy}", "training.neftune_noise_alpha=5",
                                                     *common]))
    rows_plain, rows_noisy = read_metrics(plain / "metrics.jsonl"), read_metrics(noisy / "metrics.jsonl")
    assert rows_plain[0]["loss"] != rows_noisy[0]["loss"]
    base, tokenizer = lorafit.load_model(str(tiny_run / "model"))
    adapted = lorafit.load_adapter(base, noisy / "adapter", trainable=True)  # wrap() wants trainable parameters
    eval_rows = prepare_rows(str(tiny_run / "eval.jsonl"), tokenizer, max_seq_len=128, packing=True,
                             assistant_only=True).rows
    wrapped = distributed.wrap(adapted, "ddp")  # one process: a plain Runner, as the trainer runs it
    clean = sft.eval_loss(wrapped, fixed_batches(eval_rows, 1, tokenizer.pad_token_id), adapted.device, False)
    assert rows_noisy[-1]["eval_loss"] == pytest.approx(clean, rel=1e-5)
