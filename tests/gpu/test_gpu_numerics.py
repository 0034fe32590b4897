"""On CUDA: bf16 LoRA and DoRA layers against the fp64 formula, lorafit's NF4 against bitsandbytes' CUDA kernels.

Marked `gpu`: skipped (reason listed) where torch.cuda.is_available() is False (tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapters.test_dora import reference_dora
from adapters.test_lora_layer import reference
from nf4_reference import bnb_dequantize, bnb_quantize
from torch import nn

from lorafit.adapters.lora import LoraLinear
from lorafit.quant import Linear4bit, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16_REL = 2e-2  # bf16 keeps 8 mantissa bits: ~2^-8 relative per operand, accumulated over 192 terms


def cuda_layer(use_dora: bool, n_in: int = 192, n_out: int = 96, r: int = 16) -> LoraLinear:
    """An fp32 layer on CUDA with random B (and DoRA magnitudes away from the norms), so the branch matters."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(n_in, n_out), r=r, alpha=2.0 * r, scaling=2.0, dropout=0.0, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        if use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(n_out))
    return layer.to(CUDA).train()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_autocast_layer_matches_the_fp64_formula(use_dora):
    layer = cuda_layer(use_dora)
    ref_layer = copy.deepcopy(layer).cpu().double()  # its A, B, m are the fp64 reference's leaves
    x = torch.randn(4, 32, 192, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape, device=CUDA)
    out.float().backward(upstream)

    x_ref = x.detach().cpu().double().requires_grad_(True)
    if use_dora:
        ref = reference_dora(ref_layer, x_ref, ref_layer.lora_A.weight, ref_layer.lora_B.weight,
                             ref_layer.lora_magnitude_vector, ref_layer.base_layer.bias.detach())
    else:
        ref = reference(ref_layer, x_ref)
    ref.backward(upstream.cpu().double())
    assert relative_error(out, ref.detach()) < BF16_REL
    pairs = {"x": (x, x_ref), "A": (layer.lora_A.weight, ref_layer.lora_A.weight),
             "B": (layer.lora_B.weight, ref_layer.lora_B.weight)}
    if use_dora:
        pairs["m"] = (layer.lora_magnitude_vector, ref_layer.lora_magnitude_vector)
    for name, (got, want) in pairs.items():
        assert got.grad.dtype == torch.float32, name  # fp32 parameters and input keep fp32 gradients
        assert relative_error(got.grad, want.grad) < BF16_REL, name


@pytest.mark.parametrize("shape", [(64, 64), (96, 192), (576, 1536)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_on_cuda_matches_bitsandbytes_cuda_kernels(shape, double_quant):
    torch.manual_seed(0)
    weight = torch.randn(shape, device=CUDA)
    ours = quantize_nf4(weight, blocksize=64, double_quant=double_quant)
    packed, state = bnb_quantize(weight, 64, double_quant)
    assert torch.equal(ours.packed.view(-1), packed.view(-1))
    torch.testing.assert_close(dequantize_nf4(ours), bnb_dequantize(packed, state), rtol=0, atol=0)


def test_linear4bit_forward_on_cuda_uses_the_bitsandbytes_weight():
    torch.manual_seed(0)
    linear = nn.Linear(192, 96).to(CUDA)
    layer = Linear4bit.from_linear(linear, double_quant=False, compute_dtype=torch.bfloat16)
    packed, state = bnb_quantize(linear.weight.detach(), 64, False)
    x = torch.randn(8, 192, device=CUDA)
    want = x.double() @ bnb_dequantize(packed, state).double().t() + linear.bias.double()
    got = layer(x)
    assert relative_error(got, want.cpu()) < BF16_REL  # bf16 compute of the same dequantised weight
