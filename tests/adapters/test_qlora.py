"""LoRA, rsLoRA and DoRA on a 4-bit NF4 base: training touches only the adapters, the 4-bit DoRA layer follows
the formula on the dequantised weight, and merge_and_unload gives a plain 16/32-bit model with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_tiny, randomize_adapters
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.adapters.model import lora_layers
from lorafit.config import ConfigError
from lorafit.models.load import quantize_block_linears
from lorafit.quant import Linear4bit


def tiny_4bit(arch: str = "llama"):
    model = build_tiny(arch)
    quantize_block_linears(model, compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_adapters_train_on_a_4bit_base(variant, input_ids):
    model = tiny_4bit()
    assert lorafit.parameter_report(model).total == lorafit.parameter_report(build_tiny("llama")).total
    base_logits = model(input_ids).logits
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.1, **variant), warn_scale=False)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    torch.testing.assert_close(model(input_ids).logits, base_logits, rtol=0, atol=1e-5)  # B = 0: the 4-bit base
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == expected and all(".lora_" in n for n in trained)
    assert any(".lora_A." in n for n in trained) and any(".lora_B." in n for n in trained)
    before = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "the 4-bit base must not change"


def test_dora_on_4bit_follows_the_formula_on_the_dequantised_weight():
    model = tiny_4bit()
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_dora=True), warn_scale=False)
    randomize_adapters(model)
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, layer.in_features)
    w0 = layer.base_layer.dequantize(torch.float64)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    full = w0 + layer.scaling * b @ a
    expected = (layer.lora_magnitude_vector.double() / full.norm(dim=1)) * (x.double() @ full.t())
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)  # fp32 compute on O(1) outputs


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_dequantises_and_keeps_the_logits(tmp_path, use_dora, input_ids):
    model = tiny_4bit()
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_dora=use_dora), warn_scale=False)
    randomize_adapters(model)
    unmerged = model(input_ids).logits
    with pytest.raises(TypeError, match="merge_and_unload"):
        lorafit.merge(model)  # in place into NF4 codes would re-quantise the update away
    merged = lorafit.merge_and_unload(model)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules()) and not lora_layers(merged)
    diff = (merged(input_ids).logits - unmerged).abs().max().item()
    print(f"4-bit + adapter (dora={use_dora}) vs merged fp32 model: max logit diff {diff:.2e}")
    # the merged weight is the fp32 sum of the dequantised W0 and s·B A: only fp32 summation order differs
    assert diff <= 1e-5
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids).logits, merged(input_ids).logits, rtol=0, atol=0)


def test_merge_to_bf16_is_within_bf16_rounding(input_ids):
    model = tiny_4bit()
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8), warn_scale=False)
    randomize_adapters(model)
    unmerged = model(input_ids).logits
    merged = lorafit.merge_and_unload(copy.deepcopy(model), dtype=torch.bfloat16)
    assert {p.dtype for n, p in merged.named_parameters() if "layers" in n and n.endswith("proj.weight")} == {torch.bfloat16}
    diff = (merged.float()(input_ids).logits - unmerged).abs().max().item()
    print(f"4-bit + adapter vs merged bf16 weights: max logit diff {diff:.2e}")
    assert diff <= 0.05  # bf16 keeps 8 mantissa bits: weights re-rounded by up to 2^-9 relative, logits O(1)


def test_pissa_on_a_4bit_base_is_a_clear_error():
    model = tiny_4bit()
    with pytest.raises(ConfigError, match="init='pissa' needs a 16/32-bit base weight"):
        lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, init="pissa"))


@pytest.mark.parametrize("alpha", [4, 16])  # s = 1 (PEFT's exact case) and s = 4 (lorafit compensates the scale)
def test_loftq_start_is_closer_to_the_float_model_than_plain_nf4(tmp_path, alpha, input_ids):
    float_model = build_tiny("llama")
    nf4_model = copy.deepcopy(float_model)
    quantize_block_linears(nf4_model)
    model = lorafit.attach(copy.deepcopy(float_model), lorafit.AdapterConfig(r=4, alpha=alpha, init="loftq",
                                                                             loftq_iter=2), warn_scale=False)
    layers = lora_layers(model)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
    assert all(layer.base_layer.quant_state.double_quant for layer in layers.values())
    for name, layer in layers.items():
        w = float_model.get_submodule(name).weight.detach()
        loftq_err = (w - layer.merged_weight()).norm()
        nf4_err = (w - nf4_model.get_submodule(name).dequantize(torch.float32)).norm()
        assert loftq_err < 0.9 * nf4_err, name
    reference = float_model(input_ids).logits
    loftq_diff = (model(input_ids).logits - reference).abs().max().item()
    nf4_diff = (nf4_model(input_ids).logits - reference).abs().max().item()
    print(f"alpha={alpha}: max logit diff to the float model: LoftQ start {loftq_diff:.3e}, plain NF4 {nf4_diff:.3e}")
    assert loftq_diff < nf4_diff

    lorafit.save_adapter(model, tmp_path / "a")  # config keeps init 'loftq': loading re-derives the same base
    reloaded = lorafit.load_adapter(copy.deepcopy(float_model), tmp_path / "a")
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="init='loftq' quantises float nn.Linear weights itself"):
        lorafit.attach(nf4_model, lorafit.AdapterConfig(r=4, alpha=alpha, init="loftq"))
