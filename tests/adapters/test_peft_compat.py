"""Adapters saved by lorafit load in PEFT with the same logits, and the other way round."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import randomize_adapters

import lorafit

TOL = 1e-5  # fp32, identical math up to summation order


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lorafit_adapter_loads_in_peft(tmp_path, tiny_pair, input_ids, use_rslora):
    model, base_for_peft = tiny_pair
    reference = base_for_peft(input_ids).logits
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_rslora=use_rslora), warn_scale=False)
    randomize_adapters(model)
    ours = model(input_ids).logits
    assert (ours - reference).abs().max() > 1e-3, "random B must change the output, or the test proves nothing"
    lorafit.save_adapter(model, tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(base_for_peft, tmp_path / "adapter").eval()
    theirs = peft_model(input_ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"lorafit->PEFT max logit diff: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_lorafit(tmp_path, tiny_pair, input_ids, use_rslora):
    model_for_peft, base = tiny_pair
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=use_rslora)
    peft_model = get_peft_model(model_for_peft, config)
    randomize_adapters(peft_model)
    theirs = peft_model.eval()(input_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    with peft_model.disable_adapter():
        assert (peft_model(input_ids).logits - theirs).abs().max() > 1e-3, "random B must matter"

    ours_model = lorafit.load_adapter(base, tmp_path / "peft")
    ours = ours_model(input_ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"PEFT->lorafit max logit diff: {diff:.2e}")
    assert diff <= TOL
    assert set(lorafit.adapters.model.lora_layers(ours_model)) == {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n
    }


def test_saved_files_use_peft_key_names_and_fields(tmp_path):
    from tiny_models import build_tiny

    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lorafit.save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"
    )
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["init_lora_weights"] is True
    assert LoraConfig.from_pretrained(tmp_path / "a").r == 4  # PEFT parses it


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_modes_roundtrip_through_peft(tmp_path, bias, input_ids):
    """GPT-2 (Conv1D, biases everywhere): trained biases are saved where PEFT expects and reloaded."""
    from tiny_models import build_tiny

    model, peft_base = build_tiny("gpt2"), build_tiny("gpt2")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, bias=bias))
    randomize_adapters(model)
    trained_bias = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained_bias and all(n.endswith("base_layer.bias") for n in trained_bias) == (bias == "lora_only")
    ours = model(input_ids).logits
    lorafit.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(peft_base, tmp_path / "a").eval()
    assert (peft_model(input_ids).logits - ours).abs().max() <= TOL
    reloaded = lorafit.load_adapter(build_tiny("gpt2"), tmp_path / "a")
    assert (reloaded(input_ids).logits - ours).abs().max() <= TOL


def test_rank_and_alpha_patterns_roundtrip(tmp_path, input_ids):
    from tiny_models import build_tiny

    model_for_peft, base = build_tiny("llama"), build_tiny("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    peft_model = get_peft_model(model_for_peft, config)
    randomize_adapters(peft_model)
    theirs = peft_model.eval()(input_ids).logits
    peft_model.save_pretrained(tmp_path / "p")
    ours = lorafit.load_adapter(base, tmp_path / "p")
    layer = ours.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.r == 2 and layer.scaling == 4.0
    assert ours.get_submodule("model.layers.1.self_attn.q_proj").scaling == 0.75
    assert (ours(input_ids).logits - theirs).abs().max() <= TOL
