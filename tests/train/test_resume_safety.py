"""Resume through the trainer and the CLI: a damaged newest checkpoint falls back to the previous one and still
ends where an uninterrupted run does; a pickle bomb is refused without running; damaged adapters are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.cli import main
from lorafit.run_config import load_run_config
from lorafit.train import sft
from lorafit.run_dir import LEGACY_CHECKPOINT_STATE, RunDir, read_metrics

FAST = ["evaluation.generation=false", "evaluation.every=0"]


def run(root, *overrides, resume=False):
    return sft.train(load_run_config(root / "run.yaml", [*FAST, *overrides]), resume=resume)


def test_a_corrupt_newest_checkpoint_falls_back_and_the_run_ends_as_uninterrupted(tiny_run):
    full = tiny_run / "fallback_full"
    run(tiny_run, f"output_dir={full}")
    broken = tiny_run / "fallback_broken"
    run(tiny_run, f"output_dir={broken}")  # checkpoints at steps 2 and 4; then pretend it died after step 4
    (broken / "summary.json").unlink()  # a run that died has not written its summary (else resume refuses)
    newest = RunDir(broken).list_checkpoints()[-1]
    assert newest.name == "step-00000004"
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated, as by a dying disk
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000004: .*adapter_model.safetensors has"):
        result = run(tiny_run, f"output_dir={broken}", resume=True)
    assert result.steps == 6
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    want = load_file(full / "adapter" / "adapter_model.safetensors")
    got = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)  # dropout on: RNG restored too


class Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_refuses_a_pickle_bomb_without_running_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "bombed"
    folder = out / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save({"trainer": Bomb(marker)}, folder / LEGACY_CHECKPOINT_STATE)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n')
    code = main(["train", str(tiny_run / "run.yaml"), f"output_dir={out}", *FAST, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not marker.exists()
    assert err.strip().splitlines()[-1].startswith("lorafit train: error: ")
    assert "trainer_state.pt is a pickled checkpoint" in err and "--trust-checkpoint" in err
    assert len(read_metrics(out / "metrics.jsonl")) == 2  # the history is untouched


def _saved_adapter(tiny_run, tmp_path) -> Path:
    out = tmp_path / "adapter_run"
    run(tiny_run, f"output_dir={out}", "training.max_steps=1", "training.save_every=0")
    return out / "adapter"


def test_damaged_adapters_are_one_line_errors_naming_the_file(tiny_run, tmp_path, capsys):
    adapter = _saved_adapter(tiny_run, tmp_path)
    capsys.readouterr()
    generate = ["generate", "--model", str(tiny_run / "model"), "--adapter", str(adapter), "--prompt", "hi",
                "--max-new-tokens", "2"]

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    assert main(generate) == 2
    err = capsys.readouterr().err
    assert f"{weights}: tensor '{key}' holds NaN values" in err and "Traceback" not in err

    config = adapter / "adapter_config.json"
    config.write_text(json.dumps([{"peft_type": "LORA"}]))
    assert main(generate) == 2
    err = capsys.readouterr().err
    assert f"{config} holds a JSON list, not an object" in err and "Traceback" not in err
