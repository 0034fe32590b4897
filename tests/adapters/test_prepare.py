"""prepare_model: LoftQ's order (targets first, the other block linears quantised, then attach), checked layer by
layer against the plain constructions it is made of; and a merged PiSSA model switched off is the original."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit.adapters.init import loftq_init
from lorafit.adapters.model import lora_layers
from lorafit.adapters.prepare import prepare_model, quantize_at_load
from lorafit.models import ModelLoadError
from lorafit.models.load import block_linear_names, quantize_block_linears
from lorafit.quant import Linear4bit, dequantize_nf4, quantize_nf4

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_loftq_quantises_the_other_block_linears_then_fits_the_targets(input_ids):
    float_model = build_tiny("llama")
    config = lorafit.AdapterConfig(r=4, alpha=8, target_modules=ATTENTION, init="loftq")
    assert quantize_at_load("loftq", "nf4") is None and quantize_at_load("default", "nf4") == "nf4"
    model = prepare_model(copy.deepcopy(float_model), config, quantize="nf4")
    adapted = lora_layers(model)
    assert sorted(adapted) == sorted(n for n in block_linear_names(float_model) if n.rsplit(".", 1)[-1] in ATTENTION)
    for name in block_linear_names(float_model):
        module = model.get_submodule(name)
        linear = float_model.get_submodule(name)
        if name in adapted:  # LoftQ's own NF4 of the float weight, and its factors: as loftq_init gives them
            expected = lorafit.LoraLinear(copy.deepcopy(linear), 4, 8, 2.0, 0.0)
            loftq_init(expected, compute_dtype=torch.float32)
            assert isinstance(module.base_layer, Linear4bit)
            assert torch.equal(module.base_layer.dequantize(), expected.base_layer.dequantize()), name
            assert torch.equal(module.lora_A.weight, expected.lora_A.weight), name
            assert torch.equal(module.lora_B.weight, expected.lora_B.weight), name
        else:  # the MLP: plain NF4 with double quantisation, as load_model(quantize="nf4") makes it
            expected = dequantize_nf4(quantize_nf4(linear.weight.detach(), double_quant=True), torch.float32)
            assert type(module) is Linear4bit and torch.equal(module.dequantize(torch.float32), expected), name
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                   if n in block_linear_names(float_model))
    assert model(input_ids).logits.isfinite().all()


def test_quantising_after_attach_is_refused():
    model = lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(r=2, alpha=4))
    with pytest.raises(ModelLoadError, match="already carries adapters: quantise the base model before"):
        quantize_block_linears(model)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_merged_model_switched_off_is_the_original_base(tiny_pair, input_ids, init):
    model, original = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, init=init))
    randomize_adapters(model)
    adapted = model(input_ids).logits
    lorafit.merge(model)
    with lorafit.adapters_disabled(model):
        assert not any(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(input_ids).logits, original(input_ids).logits, rtol=0, atol=1e-5)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(input_ids).logits, adapted, rtol=0, atol=1e-5)
