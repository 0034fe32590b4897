"""`lorafit export`: the two outputs end to end, and one clear line for each kind of bad input."""

from __future__ import annotations

import pytest
from export_helpers import TOKENIZER, adapted, gguf_fields, tiny_model
from tiny_models import build_tiny

from lorafit import cli
from lorafit.adapters.io import save_adapter
from lorafit.config import AdapterConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama folder (with tokenizer), a LoRA adapter and a DoRA adapter for it, and a GPT-2 folder."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "base")
    TOKENIZER.save_pretrained(root / "base")
    save_adapter(adapted(tiny_model("llama")), root / "lora")
    save_adapter(adapted(tiny_model("llama"), AdapterConfig(r=4, alpha=8, use_dora=True)), root / "dora")
    build_tiny("gpt2").save_pretrained(root / "gpt2")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merged_export_writes_the_gguf_and_a_modelfile(saved, tmp_path, capsys):
    code, out, _ = run(capsys, "--model", str(saved / "base"), "--adapter", str(saved / "lora"),
                       "--gguf", str(tmp_path / "model.gguf"), "--type", "q4_0")
    assert code == 0, out
    assert gguf_fields(tmp_path / "model.gguf")["general.file_type"] == 2
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    assert "Q4_0" in out and "Modelfile" in out


def test_adapter_export(saved, tmp_path, capsys):
    code, out, _ = run(capsys, "--model", str(saved / "base"), "--adapter", str(saved / "lora"),
                       "--gguf-adapter", str(tmp_path / "adapter.gguf"))
    assert code == 0 and "28 F32" in out
    assert gguf_fields(tmp_path / "adapter.gguf")["adapter.lora.alpha"] == 8.0


@pytest.mark.parametrize(("args", "message"), [
    (["--type", "q4_k_m"], "unknown GGUF type 'q4_k_m': use one of f32, f16, bf16, q8_0, q4_0"),
    (["--gguf", "{tmp}/missing/model.gguf"], "the folder '{tmp}/missing' does not exist; create it first"),
    (["--gguf", "{tmp}/model.bin"], "the file name must end in .gguf"),
    (["--model", "{saved}/gpt2", "--adapter", None], "does not support model_type 'gpt2'; supported: llama, mistral, qwen2"),
    (["--gguf-adapter", "{tmp}/a.gguf", "--adapter", "{saved}/dora", "--gguf", None], "DoRA adapter cannot be"),
    (["--gguf-adapter", "{tmp}/a.gguf", "--gguf", None, "--type", "f16"], "--type applies to --gguf only"),
    (["--gguf-adapter", "{tmp}/a.gguf", "--gguf", None, "--adapter", None], "--gguf-adapter needs --adapter DIR"),
])
def test_bad_input_is_one_line(saved, tmp_path, capsys, args, message):
    options = {"--model": str(saved / "base"), "--adapter": str(saved / "lora"), "--gguf": str(tmp_path / "m.gguf")}
    pairs = dict(zip(args[::2], args[1::2]))
    options.update(pairs)
    argv = [item for key, value in options.items() if value is not None
            for item in (key, value.format(tmp=tmp_path, saved=saved))]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message.format(tmp=tmp_path, saved=saved) in err
    error = err[err.index("lorafit export: error:"):]  # before it: the progress bars of loading the model
    assert len(error.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.gguf"))
