"""evaluation.early_stopping end to end on a tiny model: SFT stops when the held-out loss worsens and saves the best
step's adapter (tensor for tensor), a checkpoint + kill + resume ends with the same adapter and stop step, an
evaluation set's loss can decide, and DPO stops on its held-out loss the same way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import TINY_RUN_ROWS, save_tiny_chat_llama, write_tiny_run
from train.dpo_rows import LONG, QUESTIONS, SHORT

import lorafit
from lorafit import distributed
from lorafit.errors import CheckpointError
from lorafit.run_config import load_run_config
from lorafit.run_dir import RunDir, read_metrics
from lorafit.train import dpo, sft
from lorafit.train.batches import fixed_batches, prepare_rows
from lorafit.train.checkpoint import read_checkpoint
from lorafit.train.checkpoint_format import write_manifest
from lorafit.train.early_stopping import EarlyStoppingState

PATIENCE = 2
MAX_STEPS = 12
# every step evaluated and checkpointed (so each step's adapter can be compared); lr high enough to overfit in steps
SFT = ["training.max_steps=12", "training.lr=0.05", "training.save_every=1", "training.keep_checkpoints=20",
       "evaluation.every=1", "evaluation.generation=false", f"evaluation.early_stopping={{patience: {PATIENCE}}}"]


def write_chats(path, rows):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for user, reply in rows))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny run with a sharp output head (logits like a trained model's, so a few steps move the loss a lot)
    and contra.jsonl: the train prompts with each other's replies. Training on train.jsonl first lowers its loss
    (the shared JSON format) and then raises it (the replies it learns are not these)."""
    folder = write_tiny_run(tmp_path_factory.mktemp("early_stopping"))
    save_tiny_chat_llama(folder / "model", head_scale=30)
    rows = TINY_RUN_ROWS[:4]
    write_chats(folder / "contra.jsonl", [(user, rows[(i + 1) % 4][1]) for i, (user, _) in enumerate(rows)])
    return folder


def adapter_file(folder):
    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(want, got):
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), key


def best_and_stop(rows, key):
    """(best step, best value, step where patience ran out) from the logged losses, by the rule's definition."""
    evaluated = [(r["step"], r[key]) for r in rows if key in r]
    best_step, best = min(evaluated, key=lambda item: item[1])
    return best_step, best, best_step + PATIENCE


@pytest.fixture(scope="module")
def stopped(root):
    """An SFT run on train.jsonl whose data.eval is contra.jsonl, with early stopping (patience 2), and its output."""
    out = root / "stopped"
    capture = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "print_main", lambda *args, **kw: capture.append(" ".join(map(str, args))))
        result = sft.train(load_run_config(root / "run.yaml", [f"output_dir={out}", f"data.eval={root / 'contra.jsonl'}",
                                                               *SFT]))
    return out, result, capture


def test_sft_stops_when_the_eval_loss_worsens_and_keeps_the_best_adapter(stopped):
    out, result, printed = stopped
    rows = read_metrics(out / "metrics.jsonl")
    best_step, best, stop = best_and_stop(rows, "eval_loss")
    assert 1 < best_step and stop < MAX_STEPS  # the loss fell, then rose for `patience` evaluations: stopped early
    assert [r["step"] for r in rows] == list(range(1, stop + 1)) and all("eval_loss" in r for r in rows)
    assert all(r["eval_loss"] >= best for r in rows[best_step:])
    summary = json.loads((out / "summary.json").read_text())
    expected = {"monitor": "eval_loss", "best": best, "best_step": best_step, "stopped_at": stop, "stopped_early": True}
    assert summary["early_stopping"] == expected == result.early_stopping and summary["steps"] == result.steps == stop
    line = (f"early stopping at step {stop}: eval_loss has not improved for {PATIENCE} evaluations; best {best:.6g} "
            f"at step {best_step}, adapter from step {best_step}")
    assert line in printed
    # the saved adapter is the best step's (its checkpoint's adapter), not the last step's
    checkpoints = {p.name: p for p in RunDir(out).list_checkpoints()}
    saved = adapter_file(out / "adapter")
    assert_same_tensors(adapter_file(checkpoints[f"step-{best_step:08d}"] / "adapter"), saved)
    last = adapter_file(checkpoints[f"step-{stop:08d}"] / "adapter")
    assert any(not torch.equal(last[k], saved[k]) for k in saved)
    # the stop step's checkpoint holds the rule's state and the best adapter (parameter names; files: PEFT's keys)
    held = read_checkpoint(checkpoints[f"step-{stop:08d}"]).trainer
    assert held.early_stopping == EarlyStoppingState("eval_loss", best, best_step, PATIENCE)
    assert_same_tensors(saved, {f"base_model.model.{name}": t for name, t in held.best_adapter.items()})
    page = (out / "report.html").read_text()
    assert f"stopped at step {stop}" in page and f"adapter from step {best_step}" in page


def resume_copy(root, stopped_out, name, keep_until):
    """A copy of the stopped run as if killed right after the checkpoint of step `keep_until` (its later metrics rows
    are still there: resume drops them)."""
    copy = root / name
    shutil.copytree(stopped_out, copy)
    shutil.rmtree(copy / "adapter")
    (copy / "summary.json").unlink()
    for checkpoint in RunDir(copy).list_checkpoints():
        if int(checkpoint.name.removeprefix("step-")) > keep_until:
            shutil.rmtree(checkpoint)
    return copy


def test_resume_ends_with_the_same_adapter_and_stop_step(root, stopped):
    """Killed one step before the stop (best step kept, one evaluation without improvement counted): the resumed run
    trains the last step again, stops at the same step and saves exactly the same adapter."""
    out, result, _ = stopped
    stop = result.early_stopping["stopped_at"]
    copy = resume_copy(root, out, "resumed", stop - 1)
    held = read_checkpoint(RunDir(copy).list_checkpoints()[-1]).trainer.early_stopping
    assert held.evaluations_without_improvement == PATIENCE - 1 and held.best_step < stop - 1
    again = sft.train(load_run_config(root / "run.yaml", [f"output_dir={copy}", f"data.eval={root / 'contra.jsonl'}",
                                                          *SFT]), resume=True)
    assert again.early_stopping == result.early_stopping
    assert [r["step"] for r in read_metrics(copy / "metrics.jsonl")] == list(range(1, stop + 1))
    assert_same_tensors(adapter_file(out / "adapter"), adapter_file(copy / "adapter"))


def test_resume_from_the_stop_step_trains_no_further(root, stopped):
    out, result, _ = stopped
    stop = result.early_stopping["stopped_at"]
    copy = resume_copy(root, out, "resumed_at_stop", stop)
    again = sft.train(load_run_config(root / "run.yaml", [f"output_dir={copy}", f"data.eval={root / 'contra.jsonl'}",
                                                          *SFT]), resume=True)
    assert again.steps == stop and again.early_stopping == result.early_stopping
    assert_same_tensors(adapter_file(out / "adapter"), adapter_file(copy / "adapter"))


def test_resume_with_another_monitor_is_refused(root, stopped):
    out, result, _ = stopped
    copy = resume_copy(root, out, "resumed_other_monitor", result.early_stopping["stopped_at"] - 1)
    other = [f"output_dir={copy}", f"data.eval={root / 'contra.jsonl'}", *SFT,
             f"evaluation.sets={{contra: {root / 'contra.jsonl'}}}", "evaluation.early_stopping.monitor=contra"]
    with pytest.raises(CheckpointError, match="tracked evaluation.early_stopping.monitor='eval_loss', this run "
                                              "monitors 'contra'"):
        sft.train(load_run_config(root / "run.yaml", other), resume=True)


def test_an_edited_early_stopping_state_is_refused(root, stopped, tmp_path):
    out, _, _ = stopped
    checkpoint = tmp_path / "step"
    shutil.copytree(RunDir(out).list_checkpoints()[-1], checkpoint)
    state_file = checkpoint / "early_stopping.json"
    tree = json.loads(state_file.read_text())
    fields = dict(tree["dict"])
    assert fields["evaluations_without_improvement"] == PATIENCE
    tree["dict"] = [[key, -1 if key == "evaluations_without_improvement" else value] for key, value in tree["dict"]]
    state_file.write_text(json.dumps(tree))
    write_manifest(checkpoint)  # consistent hashes: the content check itself must refuse it
    with pytest.raises(CheckpointError, match="holds no valid early-stopping state"):
        read_checkpoint(checkpoint)


def test_an_evaluation_set_can_be_the_monitor(root):
    """data.eval is in-distribution (its loss keeps falling); the contra set's loss decides, is logged as contra_loss
    and equals a clean recomputation with the saved adapter at the best step."""
    out = root / "by_set"
    sets = f"evaluation.sets={{contra: {root / 'contra.jsonl'}}}"
    sft.train(load_run_config(root / "run.yaml", [f"output_dir={out}", *SFT, sets,
                                                  "evaluation.early_stopping.monitor=contra"]))
    rows = read_metrics(out / "metrics.jsonl")
    assert all("eval_loss" in r and "contra_loss" in r for r in rows)
    best_step, best, stop = best_and_stop(rows, "contra_loss")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopping"] == {"monitor": "contra", "best": best, "best_step": best_step,
                                         "stopped_at": stop, "stopped_early": True}
    assert set(summary["eval_sets_after"]) == {"contra"}  # the set is still scored after training
    base, tokenizer = lorafit.load_model(str(root / "model"))
    adapted = lorafit.load_adapter(base, out / "adapter", trainable=True)
    contra = prepare_rows(str(root / "contra.jsonl"), tokenizer, max_seq_len=128, packing=True,
                          assistant_only=True).rows
    clean = sft.eval_loss(distributed.wrap(adapted, "ddp"), fixed_batches(contra, 1, tokenizer.pad_token_id),
                          adapted.device, False)
    assert clean == pytest.approx(best, rel=1e-5)


def test_dpo_stops_on_its_held_out_loss_and_keeps_the_best_adapter(tmp_path):
    """Held-out pairs that prefer the opposite of the training pairs: their DPO loss rises from the first step, so
    the first evaluation is the best; the saved adapter is step 1's and the after-training evaluation is its loss."""
    save_tiny_chat_llama(tmp_path / "model", hidden_size=32, head_scale=30)
    pairs = [{"prompt": q, "chosen": s, "rejected": long} for q, s, long in zip(QUESTIONS, SHORT, LONG)]
    flipped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs * 2))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in flipped))
    run = {"model": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"), "method": "dpo",
           "adapter": {"r": 4, "alpha": 8}, "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_seq_len": 128},
           "training": {"max_steps": 8, "batch_size": 4, "micro_batch_size": 2, "lr": 1.0e-2, "save_every": 1,
                        "keep_checkpoints": 20, "seed": 3},
           "evaluation": {"every": 1, "early_stopping": {"patience": PATIENCE}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = dpo.train(load_run_config(tmp_path / "run.yaml"))
    out = tmp_path / "out"
    rows = read_metrics(out / "metrics.jsonl")
    best_step, best, stop = best_and_stop(rows, "eval_loss")
    assert result.early_stopping == {"monitor": "eval_loss", "best": best, "best_step": best_step,
                                     "stopped_at": stop, "stopped_early": True}
    assert [r["step"] for r in rows] == list(range(1, stop + 1))
    assert_same_tensors(adapter_file(RunDir(out).checkpoint_path(best_step) / "adapter"), adapter_file(out / "adapter"))
    assert result.eval_after["loss"] == pytest.approx(best, rel=1e-6)  # evaluated again: the restored adapter's
