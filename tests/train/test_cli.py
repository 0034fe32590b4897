"""The CLI: train / generate / merge on the tiny model; errors are one line, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("train", "generate", "merge", "check", "diagnose", "report", "recommend",
                                      "estimate-memory"))


def test_train_then_generate_then_merge(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny_run / "run.yaml"), f"output_dir={out}", "training.max_steps=2",
                 "training.save_every=0", "evaluation.generation=false"]) == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed and "config checks" in printed and "diagnosis of" in printed
    assert (out / "report.html").is_file() and (out / "diagnosis.json").is_file()
    adapter = out / "adapter"

    assert main(["diagnose", str(out), "--json"]) == 0
    assert [f["pattern"] for f in json.loads(capsys.readouterr().out)["findings"]] == ["healthy"]  # 2 rows: too short
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    assert main(["check", str(tiny_run / "run.yaml"), "adapter.r=64", "adapter.alpha=4"]) == 0
    printed = capsys.readouterr().out
    assert "scale_out_of_range" in printed and "dataset audit" in printed

    assert main(["generate", "--model", str(tiny_run / "model"), "--adapter", str(adapter), "--prompt", "Ship a mug",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    answers = tmp_path / "answers.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 7, "messages": [{"role": "user", "content": "Ship two mugs"}]}) + "\n")
    assert main(["generate", "--model", str(tiny_run / "model"), "--adapter", str(adapter), "--input", str(prompts),
                 "--output", str(answers), "--max-new-tokens", "4"]) == 0
    row = json.loads(answers.read_text())
    assert row["id"] == 7 and isinstance(row["response"], str) and row["messages"][0]["content"] == "Ship two mugs"

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_run / "model"), "--adapter", str(adapter), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    import lorafit

    base, _ = lorafit.load_model(str(tiny_run / "model"))
    adapted = lorafit.load_adapter(base, adapter)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert (merged(ids).logits - adapted(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "missing.yaml"], "does not exist"),
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], "could not load"),
        (["merge", "--model", "MODEL", "--adapter", "/no/adapter", "--out", "x"], "does not exist"),
    ],
)
def test_errors_are_one_clear_line(tiny_run, argv, needle, capsys):
    argv = [str(tiny_run / "model") if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_qlora_run_trains_on_a_4bit_base(tiny_run, tmp_path, capsys):
    out = tmp_path / "qlora"
    assert main(["train", str(tiny_run / "run.yaml"), f"output_dir={out}", "quantize=nf4", "adapter.init=loftq",
                 "training.max_steps=2", "training.save_every=0", "evaluation.generation=false"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    import lorafit
    from lorafit.quant import Linear4bit

    base, _ = lorafit.load_model(str(tiny_run / "model"))
    adapted = lorafit.load_adapter(base, out / "adapter")  # init loftq: the same NF4 base is derived again
    assert all(isinstance(m.base_layer, Linear4bit) for m in lorafit.adapters.model.lora_layers(adapted).values())


def test_planning_commands(tiny_run, capsys):
    assert main(["recommend", "--model", "smollm2-135m", "--examples", "400", "--shift", "narrow"]) == 0
    assert "r: 8" in capsys.readouterr().out
    assert main(["estimate-memory", "--model", str(tiny_run / "model"), "--method", "qlora", "--batch", "2"]) == 0
    assert "optimizer" in capsys.readouterr().out


def test_quantize_needs_a_known_scheme(tiny_run, capsys):
    assert main(["train", str(tiny_run / "run.yaml"), "quantize=nf3"]) == 2
    assert "quantize='nf3'" in capsys.readouterr().err
