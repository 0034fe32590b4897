"""Bad adapter folders get errors naming the file and the fix; an existing adapter survives a failed save."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit.adapters import io


def saved_adapter(tmp_path, **kwargs):
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, **kwargs))
    randomize_adapters(model)
    return lorafit.save_adapter(model, tmp_path / "adapter")


def test_missing_folder(tmp_path):
    with pytest.raises(lorafit.AdapterFileError, match="does not exist"):
        lorafit.load_adapter(build_tiny("llama"), tmp_path / "nope")


def test_missing_weights_file(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(lorafit.AdapterFileError, match="adapter_model.safetensors is missing"):
        lorafit.load_adapter(build_tiny("llama"), path)


def test_truncated_safetensors(tmp_path):
    path = saved_adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(lorafit.AdapterFileError, match="truncated or corrupt"):
        lorafit.load_adapter(build_tiny("llama"), path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorafit.AdapterFileError, match=r"lora_A.weight. has shape \(4, \d+\) but this model needs \(8, \d+\)"):
        lorafit.load_adapter(build_tiny("llama"), path)


def test_adapter_for_another_architecture(tmp_path):
    path = saved_adapter(tmp_path)
    with pytest.raises(lorafit.TargetError, match="matches no layer"):
        lorafit.load_adapter(build_tiny("gpt2"), path)


def test_missing_tensor(tmp_path):
    path = saved_adapter(tmp_path)
    tensors = io.load_file(str(path / "adapter_model.safetensors"))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(lorafit.AdapterFileError, match="lacks 1 adapter tensors"):
        lorafit.load_adapter(build_tiny("llama"), path)


@pytest.mark.parametrize(("field", "value"), [("peft_type", "IA3"), ("layers_to_transform", [0]), ("ensure_weight_tying", True), ("r", 0)])
def test_unsupported_or_invalid_config(tmp_path, field, value):
    path = saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config[field] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorafit.AdapterFileError, match=field):
        lorafit.load_adapter(build_tiny("llama"), path)


def test_config_not_json(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorafit.AdapterFileError, match="not valid JSON"):
        lorafit.load_adapter(build_tiny("llama"), path)


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    path = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        lorafit.save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary folder may be left behind"


def test_save_without_adapter_is_an_error(tmp_path):
    with pytest.raises(lorafit.ConfigError, match="no lorafit adapter"):
        lorafit.save_adapter(build_tiny("llama"), tmp_path / "a")


def test_reload_gives_same_logits_and_frozen_by_default(tmp_path, input_ids):
    model = build_tiny("qwen2")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    expected = model(input_ids).logits
    lorafit.save_adapter(model, tmp_path / "a")
    frozen = lorafit.load_adapter(build_tiny("qwen2"), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(frozen(input_ids).logits, expected, rtol=0, atol=0)
    trainable = lorafit.load_adapter(build_tiny("qwen2"), tmp_path / "a", trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
