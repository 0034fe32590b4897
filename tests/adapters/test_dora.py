"""DoRA: the layer against the formula in fp64, the factored row norms, merge / unmerge, PEFT in both directions."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import build_tiny, randomize_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafit
from lorafit.adapters.branch import dropout_keep_mask
from lorafit.adapters.dropped_entries import sparse_dropout_pays
from lorafit.adapters.dora import dora_branch, row_norms_direct, row_norms_factored
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.model import lora_layers

PEFT_TOL = 1e-5  # fp32 logits of O(1): same math, different summation order (PEFT forms W0 + s·BA, we factor it)


def make_dora_layer(in_f=6, out_f=5, r=3, alpha=6.0, dropout=0.0, conv1d=False, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    base = (Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)).double()
    with torch.no_grad():
        base.bias.normal_()
        base.weight.normal_()
    layer = LoraLinear(base, r=r, alpha=alpha, scaling=alpha / r, dropout=dropout, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(out_f, dtype=torch.float64))
    return layer


def dense(layer: LoraLinear) -> torch.Tensor:
    w = layer.base_layer.weight.detach()
    return w.t() if layer.fan_in_fan_out else w


def reference_dora(layer: LoraLinear, x, a, b, m, bias, keep=None, keep_rate=1.0):
    """PEFT's DoRA forward written out in fp64 autograd; the norm is detached (paper §4.3)."""
    w0 = dense(layer)
    s = layer.scaling
    norm = torch.linalg.vector_norm(w0 + s * (b @ a), dim=1).detach()
    factor = m / norm
    xd = x if keep is None else x * keep / keep_rate
    base = x @ w0.t() + bias
    return base + (factor - 1) * (xd @ w0.t()) + factor * (s * (xd @ a.t()) @ b.t())


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.08, 0.3])  # 0.08: the sparse products over dropped entries (fp64 on CPU)
def test_dora_layer_matches_fp64_formula_with_gradients(conv1d, dropout):
    assert sparse_dropout_pays(torch.device("cpu"), torch.float64, dropout) == (dropout == 0.08)
    layer = make_dora_layer(conv1d=conv1d, dropout=dropout)
    layer.train()
    layer.base_layer.bias.requires_grad_(True)  # bias="lora_only": the bias trains too
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    keep, rate = None, 1.0
    if dropout:
        torch.manual_seed(7)
        mask, q = dropout_keep_mask(x.detach().reshape(-1, 6), dropout)
        keep, rate = mask.view(x.shape).double(), 1 - q
        assert 0 < int((keep == 0).sum()) < keep.numel()  # some entries dropped, not all
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias)]
    ref = reference_dora(layer, *leaves, keep=keep, keep_rate=rate)
    ref.backward(upstream)

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    ours = (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias)
    for name, mine, leaf in zip(("x", "A", "B", "m", "bias"), ours, leaves):
        torch.testing.assert_close(mine.grad, leaf.grad, rtol=0, atol=1e-11, msg=f"grad of {name}")
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dropout", [0.08, 0.4])  # sparse products over the dropped entries, dense ones
def test_dora_gradcheck_with_dropout(dropout):
    """Finite differences for x and m (A and B are left out: the detached norm makes their true derivative
    differ from the DoRA gradient by design; the fp64 formula test above covers them)."""
    layer = make_dora_layer(dropout=dropout)
    layer.train()
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()

    def fn(x, m):
        torch.manual_seed(11)
        return dora_branch(layer.base_layer(x), x, a, b, m, layer.base_layer, layer.scaling, dropout)

    assert torch.autograd.gradcheck(fn, (x, layer.lora_magnitude_vector.detach().clone().requires_grad_(True)))


@pytest.mark.parametrize("shape", [(5, 6), (64, 96), (96, 64)])
def test_factored_row_norms_equal_direct(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    a = torch.randn(8, shape[1], dtype=torch.float64)
    b = torch.randn(shape[0], 8, dtype=torch.float64)
    expected = torch.linalg.vector_norm(w + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(row_norms_direct(w, a, b, 0.7), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(row_norms_factored(w, a, b, 0.7), expected, rtol=1e-10, atol=0)
    # fp32 (training precision): relative error stays near fp32 rounding even with a large update
    w32, a32, b32 = w.float(), a.float(), (b * 3).float()
    exact = torch.linalg.vector_norm(w + 0.7 * (b * 3) @ a, dim=1)
    assert ((row_norms_factored(w32, a32, b32, 0.7).double() - exact).abs() / exact).max() < 1e-5


def test_fresh_dora_model_equals_base(tiny_pair, input_ids):
    model, base = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_dora=True, dropout=0.1))
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=1e-5)
    report = lorafit.parameter_report(model)
    magnitudes = sum(layer.out_features for layer in lora_layers(model).values())
    lora = sum(layer.lora_A.weight.numel() + layer.lora_B.weight.numel() for layer in lora_layers(model).values())
    assert report.trainable == lora + magnitudes


def test_dora_merge_unmerge_and_unload_keep_logits(tiny_pair, input_ids):
    model, _ = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_dora=True), warn_scale=False)
    randomize_adapters(model)
    weights = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(model).items()}
    unmerged = model(input_ids).logits
    lorafit.merge(model)
    merged = model(input_ids).logits
    print(f"DoRA merged vs unmerged max logit diff: {(merged - unmerged).abs().max():.2e}")
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    with lorafit.adapters_disabled(model):  # the reference policy from merged weights
        disabled_merged = model(input_ids).logits
    lorafit.unmerge(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
    with lorafit.adapters_disabled(model):
        torch.testing.assert_close(disabled_merged, model(input_ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=0, atol=1e-5)
    plain = lorafit.merge_and_unload(model)
    assert not lora_layers(plain)
    torch.testing.assert_close(plain(input_ids).logits, unmerged, rtol=0, atol=1e-5)


def test_disabled_dora_is_the_base(tiny_pair, input_ids):
    model, base = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, use_dora=True), warn_scale=False)
    randomize_adapters(model)
    assert (model(input_ids).logits - base(input_ids).logits).abs().max() > 1e-3
    with lorafit.adapters_disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lorafit_dora_adapter_loads_in_peft(tmp_path, arch, use_rslora, input_ids):
    model = build_tiny(arch)
    base_for_peft = copy.deepcopy(model)
    reference = base_for_peft(input_ids).logits
    config = lorafit.AdapterConfig(r=4, alpha=8, use_dora=True, use_rslora=use_rslora, dropout=0.05)
    lorafit.attach(model, config, warn_scale=False)
    randomize_adapters(model)
    ours = model(input_ids).logits
    assert (ours - reference).abs().max() > 1e-3, "random B and m must change the output"
    lorafit.save_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    magnitude_keys = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitude_keys) == len(lora_layers(model)), "PEFT's key: <module>.lora_magnitude_vector, no .weight"

    peft_model = PeftModel.from_pretrained(base_for_peft, tmp_path / "adapter").eval()
    diff = (ours - peft_model(input_ids).logits).abs().max().item()
    print(f"DoRA lorafit->PEFT {arch} rslora={use_rslora}: max logit diff {diff:.2e}")
    assert diff <= PEFT_TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_peft_dora_adapter_loads_in_lorafit(tmp_path, arch, input_ids):
    base = build_tiny(arch)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                                use_dora=True))
    randomize_adapters(peft_model)
    theirs = peft_model.eval()(input_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours_model = lorafit.load_adapter(base, tmp_path / "peft")
    assert all(layer.use_dora for layer in lora_layers(ours_model).values())
    diff = (ours_model(input_ids).logits - theirs).abs().max().item()
    print(f"DoRA PEFT->lorafit {arch}: max logit diff {diff:.2e}")
    assert diff <= PEFT_TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_training_gradients_match_peft(tmp_path, arch, input_ids):
    """One backward pass (eval mode: GPT-2's own dropout off): the same gradients for A, B and m as PEFT's DoRA."""
    base = build_tiny(arch)
    base_for_peft = copy.deepcopy(base)
    ours = lorafit.attach(base, lorafit.AdapterConfig(r=4, alpha=8, use_dora=True), warn_scale=False)
    randomize_adapters(ours)
    lorafit.save_adapter(ours, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base_for_peft, tmp_path / "adapter", is_trainable=True)
    for model in (peft_model, ours):
        model.eval()
        model(input_ids, labels=input_ids).loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    worst = max(((mine[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp_min(1e-12)).item() for n in mine)
    print(f"DoRA grads vs PEFT ({arch}): worst relative max diff {worst:.2e}")
    assert worst < 1e-4  # fp32 gradients through a 2-layer model, relative to each tensor's largest entry


@pytest.mark.parametrize("conv1d", [False, True])
def test_lowrank_only_dropout_matches_its_fp64_formula_with_gradients(conv1d):
    """dora_dropout_lowrank_only: y = bias + m/||W0 + s·BA|| ⊙ (W0 x + s·B A dropout(x)), the norm detached."""
    layer = make_dora_layer(conv1d=conv1d, dropout=0.3)
    layer.dora_dropout_lowrank_only = True
    layer.train()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    torch.manual_seed(7)
    mask, q = dropout_keep_mask(x.detach().reshape(-1, 6), 0.3)
    keep = mask.view(x.shape).double()
    assert 0 < keep.sum() < keep.numel()  # some inputs dropped, some kept: the formula is exercised
    xr, a, b, m, bias = [t.detach().clone().requires_grad_(True) for t in
                         (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias)]
    w0, s = dense(layer), layer.scaling
    norm = torch.linalg.vector_norm(w0 + s * (b @ a), dim=1).detach()
    ref = bias + (m / norm) * (xr @ w0.t() + s * ((xr * keep / (1 - q)) @ a.t()) @ b.t())
    ref.backward(upstream)

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    ours = (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias)
    for name, mine, leaf in zip(("x", "A", "B", "m", "bias"), ours, (xr, a, b, m, bias)):
        torch.testing.assert_close(mine.grad, leaf.grad, rtol=0, atol=1e-11, msg=f"grad of {name}")
    layer.eval()  # without dropout both formulas are DoRA itself
    default = copy.deepcopy(layer)
    default.dora_dropout_lowrank_only = False
    torch.testing.assert_close(layer(x), default(x), rtol=0, atol=0)


def test_lowrank_only_option_reaches_the_layers_and_is_checked():
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.1, use_dora=True,
                                                dora_dropout_lowrank_only=True))
    assert {layer.dora_dropout_lowrank_only for layer in lora_layers(model).values()} == {True}
    with pytest.raises(lorafit.ConfigError, match="dora_dropout_lowrank_only='yes'"):
        lorafit.AdapterConfig(use_dora=True, dora_dropout_lowrank_only="yes")
