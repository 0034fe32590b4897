"""The fused RMSNorm (adapters/rmsnorm.py): forward bit for bit the stock norm's, gradients against fp64 autograd,
16-bit error against the stock norm's, the fallbacks, and what it keeps for the backward pass."""

from __future__ import annotations

import pytest
import torch
from saved_tensors import saved_storage_bytes
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorafit.adapters.fused import (
    FUSED_ATTR,
    install_fused_forwards,
    remove_fused_forwards,
)
from lorafit.adapters.lora import lora_branch
from lorafit.adapters.rmsnorm import (
    MIN_WEIGHT,
    RMS_NORM_CLASSES,
    fused_rms_norm_forward,
)

HIDDEN = 24


def make_norm(dtype=torch.float32, seed=0) -> LlamaRMSNorm:
    """A frozen norm with a trained-looking weight: entries spread around 1, some negative, none near zero."""
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_((torch.randn(HIDDEN) * 0.7 + 0.5).sign() * (torch.rand(HIDDEN) + 0.1))
    return norm.to(dtype).requires_grad_(False)


def fp64_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_stock_norm_bit_for_bit(dtype):
    norm = make_norm(dtype)
    x = (torch.randn(3, 7, HIDDEN) * 3).to(dtype)
    stock = norm(x)
    install_fused_forwards(norm)
    assert hasattr(norm, FUSED_ATTR)
    assert torch.equal(norm(x), stock) and norm(x).dtype == dtype


def test_gradient_matches_fp64_autograd_within_fp32():
    """The stock norm computes in fp32 whatever its input (an fp64 model too), and so does the fused one: gradients of
    an fp64 input against fp64 autograd of the formula within fp32 rounding, and against the stock norm's."""
    norm = make_norm(torch.float64)
    x = torch.randn(4, 5, HIDDEN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 5, HIDDEN, dtype=torch.float64)
    (stock,) = torch.autograd.grad((norm(x) * upstream).sum(), x)
    install_fused_forwards(norm)
    (grad,) = torch.autograd.grad((norm(x) * upstream).sum(), x)
    ref_x = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((fp64_reference(ref_x, norm.weight, 1e-5) * upstream).sum(), ref_x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_error_is_no_larger_than_the_stock_norms(dtype):
    """fp32: both within fp32 rounding of fp64. bf16 model: the recovered x̂ carries the output's bf16 rounding; the
    error against fp64 stays of the stock norm's size (which rounds dy ⊙ w to bf16)."""
    norm = make_norm(dtype)
    torch.manual_seed(1)
    x0 = (torch.randn(64, HIDDEN) * 2).to(dtype)
    upstream = torch.randn(64, HIDDEN).to(dtype)

    def grad_of(module):
        x = x0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((module(x) * upstream).float().sum(), x)
        return grad.double()

    stock = grad_of(norm)
    install_fused_forwards(norm)
    fused = grad_of(norm)
    ref_x = x0.double().requires_grad_(True)
    (ref,) = torch.autograd.grad((fp64_reference(ref_x, norm.weight, 1e-5) * upstream.double()).sum(), ref_x)
    stock_error, fused_error = (stock - ref).abs().max(), (fused - ref).abs().max()
    scale = ref.abs().max()
    if dtype == torch.float32:
        assert fused_error <= 1e-6 * scale and stock_error <= 1e-6 * scale
    else:
        assert fused_error <= 1.2 * stock_error, (fused_error, stock_error)  # measured 0.5-0.95x over 5 seeds


def test_a_near_zero_or_trained_weight_uses_the_stock_forward():
    x = torch.randn(2, HIDDEN, requires_grad=True)
    norm = make_norm()
    install_fused_forwards(norm)
    assert norm(x).grad_fn.name() == "_RMSNormBackward"
    with torch.no_grad():
        norm.weight[3] = MIN_WEIGHT / 2  # the weight changed: checked again
    assert norm(x).grad_fn.name() != "_RMSNormBackward"
    torch.testing.assert_close(norm(x), fused_rms_norm_forward(norm, x), rtol=0, atol=0)
    with torch.no_grad():
        norm.weight[3] = 1.0
    assert norm(x).grad_fn.name() == "_RMSNormBackward"
    norm.weight.requires_grad_(True)  # a trained norm needs its input for the weight's gradient
    assert norm(x).grad_fn.name() != "_RMSNormBackward"
    remove_fused_forwards(norm)
    assert not hasattr(norm, FUSED_ATTR) and "forward" not in vars(norm)


def test_norm_and_the_adapter_after_it_keep_one_tensor():
    """Stock: the norm keeps its input and the LoRA layer after it the norm's output; fused: the output once."""
    norm = make_norm()
    tokens, r = 32, 4
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    base = nn.Linear(HIDDEN, 8, bias=False).requires_grad_(False)
    a, b = torch.randn(r, HIDDEN, requires_grad=True), torch.randn(8, r, requires_grad=True)

    def block():
        y = norm(x)
        return lora_branch(base(y), y, a, b, 2.0)

    constant = sum(t.untyped_storage().nbytes() for t in (norm.weight, base.weight, a, b))  # parameters
    one_tensor, rms, h = tokens * HIDDEN * 4, tokens * 4, tokens * r * 4
    assert saved_storage_bytes(block) == 2 * one_tensor + rms + h + constant
    install_fused_forwards(norm)
    assert saved_storage_bytes(block) == one_tensor + rms + h + constant


def test_the_fused_classes_compute_llamas_norm():
    """The fused forward replaces a class's own: each listed class must compute LlamaRMSNorm's forward."""
    import inspect

    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    stock = inspect.getsource(LlamaRMSNorm.forward)
    classes = [getattr(module, name) for module in (modeling_mistral, modeling_qwen2, modeling_qwen3)
               for name in RMS_NORM_CLASSES if hasattr(module, name)]
    assert len(classes) == 3 and all(inspect.getsource(c.forward) == stock for c in classes)
