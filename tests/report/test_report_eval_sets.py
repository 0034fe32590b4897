"""The report's panels for evaluation.sets and the forgetting check, from a synthetic summary.json."""

from __future__ import annotations

import json

from lorafit.evaluation.eval_sets import binomial_stderr
from lorafit.report import write_report

SETS_BEFORE = {"in_distribution": {"metric": "json", "correct": 0, "total": 60, "accuracy": 0.0, "stderr": 0.0},
               "out_of_distribution": {"metric": "json", "correct": 3, "total": 60, "accuracy": 0.05,
                                       "stderr": binomial_stderr(3, 60)}}
SETS_AFTER = {"in_distribution": {"metric": "json", "correct": 59, "total": 60, "accuracy": 59 / 60,
                                  "stderr": binomial_stderr(59, 60)},
              "out_of_distribution": {"metric": "json", "correct": 45, "total": 60, "accuracy": 0.75,
                                      "stderr": binomial_stderr(45, 60)}}
FORGETTING = {"kl_per_token": 0.1234, "kl_tokens": 300, "ppl_base": 10.0, "ppl_tuned": 12.0, "ppl_ratio": 1.2,
              "changed": 5, "prompts": 14, "thresholds": {"kl_per_token": 0.1, "ppl_ratio": 1.1},
              "warnings": ["forgetting: perplexity on general text rose 1.200x"],
              "changed_samples": [{"prompt": "What is 2+2?", "base": "4", "tuned": "{\"item\": 4}"}]}


def make_run(path, **summary):
    path.mkdir()
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (path / "summary.json").write_text(json.dumps({"steps": 1, "final_loss": 1.0, "phases_s": {}, **summary}))
    return path


def test_eval_sets_and_forgetting_panels(tmp_path):
    run = make_run(tmp_path / "run", eval_sets_before=SETS_BEFORE, eval_sets_after=SETS_AFTER, forgetting=FORGETTING)
    page = write_report(run).read_text()
    assert "Evaluation sets: before / after ± SE" in page
    assert "3/60 (5.0% ± 2.8%)" in page and "45/60 (75.0% ± 5.6%)" in page and "+70.0 pts" in page
    assert "59/60 (98.3% ± 1.7%)" in page and "+98.3 pts" in page
    assert "Forgetting check: base vs adapter on general prompts" in page
    assert "0.1234" in page and "1.2000 (10.00 → 12.00)" in page and "5/14" in page
    assert "rose 1.200x" in page and "What is 2+2?" in page


def test_no_panels_without_the_keys_and_bad_entries_leave_notes(tmp_path):
    page = write_report(make_run(tmp_path / "plain")).read_text()
    assert "Evaluation sets:" not in page and "Forgetting check" not in page
    broken = {"in_distribution": {"metric": "json", "correct": 1, "total": 2}}  # no accuracy / stderr
    page = write_report(make_run(tmp_path / "broken", eval_sets_after=broken,
                                 forgetting={"kl_per_token": "high"})).read_text()
    assert "eval_sets_after is not {name: accuracy +- stderr}; left out." in page
    assert "forgetting lacks one of kl_per_token" in page
