"""LoraLinear against the formula y = W0 x + b + s·B A dropout(x), computed independently in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.adapters.lora import LoraLinear, lora_branch


def make_layer(in_f=6, out_f=5, r=3, alpha=6.0, dropout=0.0, dtype=torch.float64, conv1d=False, seed=0):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    base = base.to(dtype)
    with torch.no_grad():
        base.bias.normal_()
        base.weight.normal_()
    layer = LoraLinear(base, r=r, alpha=alpha, scaling=alpha / r, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The math of the issue, in fp64 with plain autograd: W0 x + b + s B A x."""
    w = layer.base_layer.weight.double()
    w = w.t() if layer.fan_in_fan_out else w  # Conv1D stores (in, out)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    return x @ w.t() + layer.base_layer.bias.double() + layer.scaling * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_and_gradients_match_fp64_formula(conv1d):
    layer = make_layer(conv1d=conv1d)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    got = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B.weight.detach().clone().requires_grad_(True)
    w = layer.base_layer.weight.detach()
    w = w.t() if conv1d else w
    ref = x_ref @ w.t() + layer.base_layer.bias + layer.scaling * (x_ref @ a_ref.t()) @ b_ref.t()
    ref.backward(torch.ones_like(ref))

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(got, (x_ref.grad, a_ref.grad, b_ref.grad)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert layer.base_layer.weight.grad is None, "the base weight must stay frozen"


def test_gradcheck_with_dropout_fixed_mask():
    """Backward with dropout agrees with finite differences (the mask is fixed by reseeding each call)."""
    torch.manual_seed(0)
    base = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b):
        torch.manual_seed(123)
        return lora_branch(base, x, a, b, 1.7, 0.4)

    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_dropout_only_on_adapter_input_with_inverted_scaling():
    """With A = B = I and s = 1 the adapter term is dropout(x) itself: entries are 0 or x/(1-p)."""
    p = 0.25
    base = nn.Linear(64, 64, bias=False).double()
    layer = LoraLinear(base, r=64, alpha=64.0, scaling=1.0, dropout=p).double()
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(64))
        layer.lora_B.weight.copy_(torch.eye(64))
    layer.train()
    x = torch.rand(200, 64, dtype=torch.float64) + 0.5  # no zeros, so a dropped entry is recognisable
    term = layer(x) - base(x)
    kept = term != 0
    torch.testing.assert_close(term[kept], x[kept] / (1 - p))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.02  # 12,800 Bernoulli draws: 4.5 sigma
    layer.eval()
    torch.testing.assert_close(layer(x) - base(x), x, rtol=0, atol=1e-12)  # no dropout in eval


def test_zero_b_gives_exactly_the_base_output():
    base = nn.Linear(8, 7)
    layer = LoraLinear(base, r=4, alpha=8.0, scaling=2.0, dropout=0.1)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))


def test_default_init_is_kaiming_uniform_and_gaussian_is_normal_one_over_r():
    torch.manual_seed(0)
    fan_in = 400
    layer = LoraLinear(nn.Linear(fan_in, 300), r=64, alpha=64.0, scaling=1.0, dropout=0.0)
    a = layer.lora_A.weight
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3/fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    layer.reset_parameters("gaussian")
    assert abs(layer.lora_A.weight.std().item() - 1 / 64) < 0.03 / 64
    assert abs(layer.lora_A.weight.mean().item()) < 0.01 / 64


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge_roundtrip(conv1d):
    layer = make_layer(conv1d=conv1d, dtype=torch.float32)
    x = torch.randn(4, 6)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    delta = (layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach()  # (out, in)
    expected = w0 + (delta.t() if conv1d else delta)  # Conv1D stores (in, out)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, rtol=0, atol=1e-6)
    # W0 comes back within an ulp or so (W0 + ΔW - ΔW in fp32, ΔW from a CPU-dependent matmul), and outputs of up
    # to ~10 have ulps of ~1e-6: as for the merged layer above, allow a few ulps
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    layer = make_layer(in_f=64, out_f=48, r=8, dtype=torch.float32)
    x = torch.randn(16, 64, requires_grad=True)
    ref = reference(layer, x.detach().double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: relative error ~2^-8 per operand, accumulated over 64 terms
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_dropout_mask_rate_per_lane(rate):
    """Each of the four 15-bit lanes of a random word drops with the same probability q ~= rate."""
    from lorafit.adapters.branch import dropout_keep_mask

    torch.manual_seed(0)
    keep, q = dropout_keep_mask(torch.empty(400_000), rate)
    assert abs(q - rate) <= 1 / 32768
    dropped = (~keep).double().view(-1, 4).mean(0)  # 100,000 draws per lane: sd = sqrt(q(1-q)/1e5) <= 0.0016
    assert torch.all((dropped - q).abs() < 5 * math.sqrt(q * (1 - q) / 100_000)), dropped
    # neighbouring elements are independent: P(both dropped) ~= q^2
    pairs = (~keep[:-1] & ~keep[1:]).double().mean().item()
    assert abs(pairs - q * q) < 5 * math.sqrt(q * q / 400_000)
