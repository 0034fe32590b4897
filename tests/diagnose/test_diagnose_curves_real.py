"""A real short SmolLM2 run through the trainer with a tiny adapter scale: the diagnosis flags sluggish_descent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafit.diagnose.curves import (
    CurveMonitor,
    diagnose_report,
    diagnose_run,
    find_checkpoints,
)
from lorafit.run_config import load_run_config
from lorafit.run_dir import read_metrics
from lorafit.train.sft import train

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_real_run_with_alpha_4_over_r_64_is_flagged_sluggish(tmp_path):
    run = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    eval_rows = (EXAMPLES / "data" / "orders_eval.jsonl").read_text().splitlines()[:4]
    (tmp_path / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")  # a small held-out set keeps evaluation quick
    run["output_dir"] = str(tmp_path / "out")
    run["adapter"].update(r=64, alpha=4)  # scale alpha/r = 0.0625, eight times below the healthy 0.5
    run["data"].update(train=str(EXAMPLES / "data" / "orders_train.jsonl"), eval=str(tmp_path / "eval.jsonl"),
                       max_seq_len=128)
    run["training"].update(max_steps=8, batch_size=1, warmup_steps=1, save_every=4)  # ~1 packed row of 128 per step
    run["evaluation"].update(every=4, generation=False)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    out = train(load_run_config(tmp_path / "run.yaml")).output_dir

    diagnosis = diagnose_run(out)
    assert diagnosis.patterns == ["sluggish_descent"], diagnosis.to_text()
    evidence = diagnosis.findings[0].evidence
    assert (evidence["r"], evidence["alpha"], evidence["use_rslora"]) == (64, 4.0, False)
    assert evidence["scale"] == 4 / 64
    first = read_metrics(out / "metrics.jsonl")[0]["loss"]
    assert evidence["first_loss"] == pytest.approx(first, rel=1e-4)  # rounded to 5 significant digits
    assert "raise adapter.alpha to at least 32" in diagnosis.findings[0].advice
    assert "use_rslora: true (scale 0.5)" in diagnosis.findings[0].advice  # 4 / sqrt(64)
    assert find_checkpoints(out) == {4: "checkpoints/step-00000004"}

    text, as_json = diagnose_report(out)
    assert json.loads(as_json) == diagnosis.to_json() and "sluggish_descent" in text
    print("\n" + text)

    monitor = CurveMonitor(yaml.safe_load((out / "config.yaml").read_text()))
    reported = [[f.pattern for f in monitor.observe(row)] for row in read_metrics(out / "metrics.jsonl")]
    assert reported[0] == ["sluggish_descent"] and not any(reported[1:])
