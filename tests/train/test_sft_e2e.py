"""End to end on a tiny model saved to disk: train, checkpoints, metrics, resume reproduces the losses."""

from __future__ import annotations

import json
import shutil

import pytest

import lorafit
from lorafit.run_config import load_run_config
from lorafit.train import sft
from lorafit.run_dir import RunDir
from lorafit.run_dir import read_metrics


def run(root, *overrides, resume=False):
    return sft.train(load_run_config(root / "run.yaml", list(overrides)), resume=resume)


def test_train_writes_adapter_metrics_checkpoints_and_summary(tiny_run):
    out = tiny_run / "out_full"
    result = run(tiny_run, f"output_dir={out}")
    assert result.steps == 6 and result.eval_before["total"] == 4 and result.eval_after["total"] == 4
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens_per_s", "model_flops_per_s", "mfu"} <= set(r) for r in rows)
    assert all(r["model_flops_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] < 1) for r in rows)
    assert all(r["peak_rss_mib"] > 50 for r in rows)  # torch alone holds more; each row is its step's peak
    assert 'alt="Peak memory: process RSS (MiB)"' in (out / "report.html").read_text()  # drawn as a curve
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert rows[0]["lr"] == pytest.approx(5e-3)  # warmup 1 step: peak at once
    assert [p.name for p in RunDir(out).list_checkpoints()] == ["step-00000002", "step-00000004"]  # keep 2; none at the end
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    base = lorafit.load_model(str(tiny_run / "model"))[0]
    adapted = lorafit.load_adapter(base, out / "adapter")
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lorafit.adapters.model.lora_layers(adapted).values())


TOKENS = ["data.added_tokens=['<tool_call>']",  # untied head: its new row must be trained too
          "adapter.trainable_token_indices={embed_tokens: ['<tool_call>', '{', '}'], lm_head: ['<tool_call>', '{']}"]


@pytest.mark.parametrize("variant", [[], ["adapter.use_dora=true", "adapter.init=pissa_niter_2"],
                                     ["training.optimizer=adamw_8bit", "adapter.r=128"],
                                     ["adapter.modules_to_save=[lm_head]"], TOKENS],
                         ids=["lora", "dora-pissa", "adamw_8bit", "modules_to_save", "added-tokens"])
# r 128: A and most B reach bnb's 4096-element 8-bit floor
def test_resume_reproduces_the_uninterrupted_losses(tiny_run, monkeypatch, variant, request):
    name = request.node.callspec.id  # one folder pair per variant: a used output_dir is refused
    full = tiny_run / f"out_a-{name}"
    run(tiny_run, f"output_dir={full}", *variant)
    expected = {r["step"]: r["loss"] for r in read_metrics(full / "metrics.jsonl")}

    broken = tiny_run / f"out_b-{name}"
    real_step = sft.train_step
    calls = {"n": 0}

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed mid-step 5: checkpoint step-4 exists, metrics logged up to 4
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, f"output_dir={broken}", *variant)
    monkeypatch.setattr(sft, "train_step", real_step)
    assert RunDir(broken).list_checkpoints()[-1].name == "step-00000004"
    result = run(tiny_run, f"output_dir={broken}", *variant, resume=True)
    assert result.steps == 6
    resumed = {r["step"]: r["loss"] for r in read_metrics(broken / "metrics.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # dropout 0.1 is on: equal losses need the RNG state restored too
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_unknown_model_is_a_clear_error(tiny_run):
    with pytest.raises(lorafit.ModelLoadError, match="could not load"):
        run(tiny_run, "model=/nonexistent/folder", f"output_dir={tiny_run / 'out_c'}")
    shutil.rmtree(tiny_run / "out_c", ignore_errors=True)
