"""Linear4bit keeps its NF4 state in frozen plain parameters, which FSDP2 shards and swaps like any weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafit.quant import Linear4bit, QuantizationError, dequantize_nf4, quantize_nf4


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_is_frozen_plain_parameters_with_metadata_as_attributes(double_quant):
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    layer = Linear4bit(quantize_nf4(weight, double_quant=double_quant), bias=torch.zeros(48))
    names = ["weight", "absmax", "nested_absmax", "nested_quant_map"] if double_quant else ["weight", "absmax"]
    assert [n for n, _ in layer.named_parameters()] == names + ["bias"]
    for param in layer.quant_parameters():
        assert type(param) is nn.Parameter and not param.requires_grad  # no subclass: FSDP2 keeps nothing else
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (48 * 64 // 2, 1)
    assert layer.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert (layer.quant_dtype, layer.blocksize) == (torch.float32, 64)
    assert torch.equal(layer.dequantize(), dequantize_nf4(quantize_nf4(weight, double_quant=double_quant)))


def test_forward_reads_whatever_tensors_the_parameters_hold_now():
    """FSDP2 swaps each parameter for its all-gathered copy before forward: the layer must use the swapped ones."""
    torch.manual_seed(0)
    first, second = Linear4bit(quantize_nf4(torch.randn(32, 64))), Linear4bit(quantize_nf4(torch.randn(32, 64)))
    x = torch.randn(3, 64)
    for name in ("weight", "absmax", "nested_absmax", "nested_quant_map"):
        first.register_parameter(name, nn.Parameter(getattr(second, name).detach().clone(), requires_grad=False))
    first.nested_offset = second.nested_offset  # the one float of metadata that differs between layers
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_dtype_casts_keep_the_codes_and_scales():
    layer = Linear4bit(quantize_nf4(torch.randn(16, 64), double_quant=False))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.float32 and torch.equal(layer.dequantize(), before)
    with pytest.raises(QuantizationError, match="uint8 NF4 codes"):
        layer._apply(lambda t: t.float())
