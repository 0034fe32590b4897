"""The fused MLP tail (adapters/swiglu.py): down(silu(gate) ⊙ up) against fp64 autograd, against the stock
module with the same dropout draws, inside whole tiny models, and what it keeps for the backward pass."""

from __future__ import annotations

import inspect

import pytest
import torch
from saved_tensors import saved_storage_bytes
from tiny_models import build_tiny, randomize_adapters
from torch import nn
from torch.nn import functional as F
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

import lorafit
from lorafit.adapters.fused import FUSED_ATTR, remove_fused_forwards
from lorafit.adapters.lora import LoraLinear, lora_branch
from lorafit.adapters.swiglu import (
    GATED_MLP_CLASSES,
    fused_down_arguments,
    is_gated_mlp,
    swiglu_down,
)
from lorafit.models import quantize_block_linears

INTER, OUT, R, SCALING = 12, 7, 3, 2.0


def down_layer(adapter: bool, dtype=torch.float64, bias: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(INTER, OUT, bias=bias).to(dtype).requires_grad_(False)
    if not adapter:
        return base
    layer = LoraLinear(base, r=R, alpha=R * SCALING, scaling=SCALING, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def reference(gate, up, weight, bias=None, lora_a=None, lora_b=None, scaling=SCALING) -> torch.Tensor:
    """The formula in fp64 with plain autograd: (silu(g) u) W0ᵀ + b + s ((silu(g) u) Aᵀ) Bᵀ."""
    p = F.silu(gate.double()) * up.double()
    out = p @ weight.double().t()
    if bias is not None:
        out = out + bias.double()
    if lora_a is not None:
        out = out + scaling * (p @ lora_a.double().t()) @ lora_b.double().t()
    return out


def adapter_params(layer: nn.Module) -> list[torch.Tensor]:
    return [layer.lora_A.weight, layer.lora_B.weight] if isinstance(layer, LoraLinear) else []


GRAD_CASES = [(True, (True, True)), (True, (True, False)), (True, (False, True)), (True, (False, False)),
              (False, (True, True)), (False, (True, False)), (False, (False, True))]  # frozen alone: no backward


@pytest.mark.parametrize("adapter, grads", GRAD_CASES)
def test_forward_and_gradients_match_fp64_autograd(adapter, grads):
    """Every combination of which inputs need gradients (each saves a different set of tensors)."""
    layer = down_layer(adapter, bias=True)
    base = layer.base_layer if adapter else layer
    torch.manual_seed(1)
    gate = torch.randn(2, 5, INTER, dtype=torch.float64, requires_grad=grads[0])
    up = torch.randn(2, 5, INTER, dtype=torch.float64, requires_grad=grads[1])
    weight = torch.randn(2, 5, OUT, dtype=torch.float64)
    leaves = [t for t in (gate, up, *adapter_params(layer)) if t.requires_grad]
    out = swiglu_down(gate, up, layer)
    got = torch.autograd.grad((out * weight).sum(), leaves)
    clones = {id(t): t.detach().clone().requires_grad_(True) for t in leaves}
    gate_ref, up_ref = clones.get(id(gate), gate), clones.get(id(up), up)
    lora = [clones[id(p)] for p in adapter_params(layer)] or [None, None]
    expected_out = reference(gate_ref, up_ref, base.weight, base.bias, *lora)
    expected = torch.autograd.grad((expected_out * weight).sum(), list(clones.values()))
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_dropout_draws_and_gradients_equal_the_stock_lora_branch():
    """With dropout the fused tail draws the same mask as lora_branch on p (same generator state): fp32 results equal
    to the stock silu -> mul -> LoRA layer within fp32 rounding."""
    layer = down_layer(True, dtype=torch.float32)
    layer.dropout = 0.3
    layer.train()
    torch.manual_seed(2)
    gate0, up0 = torch.randn(3, 64, INTER), torch.randn(3, 64, INTER)
    weight = torch.randn(3, 64, OUT)

    def run(fused: bool):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        params = adapter_params(layer)
        torch.manual_seed(5)
        if fused:
            out = swiglu_down(gate, up, layer)
        else:
            p = F.silu(gate) * up
            out = lora_branch(layer.base_layer(p), p, *params, layer.scaling, layer.dropout)
        return out, torch.autograd.grad((out * weight).sum(), [gate, up, *params])

    out, grads = run(True)
    stock_out, stock_grads = run(False)
    assert torch.equal(out, stock_out)  # the same ops in the same order
    for g, e in zip(grads, stock_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    layer.eval()
    assert not torch.allclose(run(True)[0], out)  # dropout really dropped something


def test_bf16_autocast_is_as_close_to_fp64_as_the_stock_tail():
    """Under bf16 autocast (gate and up arrive in bf16 from their linears) the fused output equals the stock one and
    its gradients are no further from fp64 than the stock tail's (its pointwise derivative runs in fp32)."""
    layer = down_layer(True, dtype=torch.float32)
    torch.manual_seed(3)
    gate0, up0 = torch.randn(64, INTER).bfloat16(), torch.randn(64, INTER).bfloat16()
    weight = torch.randn(64, OUT)

    def run(fused: bool):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        params = adapter_params(layer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = swiglu_down(gate, up, layer)
            else:
                p = F.silu(gate) * up
                out = lora_branch(layer.base_layer(p), p, *params, layer.scaling)
        assert out.dtype == torch.bfloat16
        return out, torch.autograd.grad((out.float() * weight).sum(), [gate, up, *params])

    gate64, up64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in adapter_params(layer)]
    ref_out = reference(gate64, up64, layer.base_layer.weight, None, *params64)
    ref_grads = torch.autograd.grad((ref_out * weight.double()).sum(), [gate64, up64, *params64])
    (fused_out, fused_grads), (stock_out, stock_grads) = run(True), run(False)
    assert torch.equal(fused_out, stock_out)
    for fused, stock, ref in zip(fused_grads, stock_grads, ref_grads, strict=True):
        stock_error = (stock.double() - ref).abs().max()
        fused_error = (fused.double() - ref).abs().max()
        assert fused_error <= 1.1 * stock_error, (fused_error, stock_error)


def test_the_fused_tail_keeps_gate_and_up_only():
    """Stock: silu's input, silu(g), up and p (4 x T x inter) plus h and A, B; fused: gate and up (2 x) plus the same."""
    layer = down_layer(True, dtype=torch.float32)
    params = adapter_params(layer)
    gate = torch.randn(64, INTER, requires_grad=True)
    up = torch.randn(64, INTER, requires_grad=True)

    def stock():
        p = F.silu(gate) * up
        return lora_branch(layer.base_layer(p), p, *params, layer.scaling)

    rest = 64 * R * 4 + sum(p.untyped_storage().nbytes() for p in params)  # h, A and B
    frozen_weight = OUT * INTER * 4  # the stock linear saves its weight (a parameter: no extra memory)
    assert saved_storage_bytes(stock) == 4 * 64 * INTER * 4 + rest + frozen_weight
    assert saved_storage_bytes(lambda: swiglu_down(gate, up, layer)) == 2 * 64 * INTER * 4 + rest


@pytest.mark.parametrize("arch, dropout, quantized", [("llama", 0.0, False), ("llama", 0.1, False),
                                                      ("qwen2", 0.0, False), ("mistral", 0.1, False),
                                                      ("llama", 0.0, True), ("qwen2", 0.1, True)])
def test_whole_model_loss_and_lora_gradients_equal_the_unfused_model(arch, dropout, quantized):
    """attach installs the fused MLP tail and RMSNorm (adapters/fused.py); removing them gives the stock model, whose
    loss and LoRA gradients (same dropout draws) the fused model matches within fp32 rounding."""
    model = build_tiny(arch)
    if quantized:  # QLoRA: lorafit's Linear4bit bases (the fused backward dequantises as Linear4bit's does)
        quantize_block_linears(model, double_quant=True, compute_dtype=torch.float32)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"),
                   warn_scale=False)
    randomize_adapters(model)
    model.train()
    mlps = [m for m in model.modules() if hasattr(m, FUSED_ATTR) and is_gated_mlp(m)]
    assert len(mlps) == model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = run()
    remove_fused_forwards(model)
    assert not any(hasattr(m, FUSED_ATTR) or "forward" in vars(m) for m in model.modules())
    stock_loss, stock_grads = run()
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-6, atol=0)
    assert fused_grads.keys() == stock_grads.keys() and any(".mlp.down_proj.lora_A" in n for n in fused_grads)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dora_and_trained_bias_fall_back_to_the_stock_forward():
    """A DoRA down_proj runs the stock MLP forward: gate and up once each, so the dropout draws are the stock ones."""
    dora = down_layer(True, dtype=torch.float32)
    dora.base_layer = nn.Linear(INTER, OUT, bias=True)  # its bias trains
    assert fused_down_arguments(dora) is None
    with pytest.raises(ValueError, match="does not cover"):
        swiglu_down(torch.randn(4, INTER), torch.randn(4, INTER), dora)
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.2, use_dora=True), warn_scale=False)
    randomize_adapters(model)
    model.train()
    assert fused_down_arguments(model.model.layers[0].mlp.down_proj) is None
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    fused_installed = model(input_ids=ids).logits
    remove_fused_forwards(model)
    torch.manual_seed(4)
    stock = model(input_ids=ids).logits
    torch.testing.assert_close(fused_installed, stock, rtol=1e-6, atol=1e-6)


def test_detach_restores_the_class_forward():
    model = build_tiny("qwen2")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8), warn_scale=False)
    assert all(hasattr(layer.mlp, FUSED_ATTR) for layer in model.model.layers)
    lorafit.detach(model)
    assert not any(hasattr(m, FUSED_ATTR) or "forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("module", [modeling_llama, modeling_mistral, modeling_qwen2, modeling_qwen3])
def test_every_fused_class_computes_the_gated_formula(module):
    """The fused forward replaces a class's own: its source must be exactly the formula the fusion computes."""
    classes = [getattr(module, name) for name in GATED_MLP_CLASSES if hasattr(module, name)]
    assert len(classes) == 1
    source = inspect.getsource(classes[0].forward)
    assert "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))" in source
    assert source.count("\n") <= 4  # def, the line above, return (nothing else happens)
