"""Linear4bit: same outputs and state-dict layout as bitsandbytes' Linear4bit, exact input gradients, clear load errors."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from torch import nn

from lorafit.adapters.lora import LoraLinear
from lorafit.quant import (
    Linear4bit,
    QuantizationError,
    dequantize_nf4,
    linear4bit,
    quantize_nf4,
)
from nf4_reference import bitsandbytes, check_bnb_shape


QS_KEY = "weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU dequantisation in torch.compile; compiling for each shape takes seconds here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def make_linear(n_in: int = 192, n_out: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def bnb_from_state_dict(state: dict, n_in: int, n_out: int) -> nn.Module:
    """bitsandbytes' Linear4bit holding the quantised weight of `state` (as transformers loads pre-quantised weights)."""
    check_bnb_shape((n_out, n_in), 64)  # its forward dequantises with bitsandbytes' CPU kernel
    bnb = bitsandbytes()
    layer = bnb.nn.Linear4bit(n_in, n_out, bias="bias" in state, compute_dtype=torch.float32, quant_type="nf4")
    stats = {key[len("weight."):]: value for key, value in state.items() if key.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=layer)
    if "bias" in state:
        layer.bias = nn.Parameter(state["bias"], requires_grad=False)
    return layer


def bnb_quantised(linear: nn.Linear, double_quant: bool) -> nn.Module:
    """bitsandbytes' own Linear4bit quantising `linear`'s weight (moving it to a device quantises it)."""
    check_bnb_shape(tuple(linear.weight.shape), 64)
    bnb = bitsandbytes()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_bitsandbytes_loaded_from_our_state_dict(double_quant, bias):
    linear = make_linear(bias=bias)
    ours = Linear4bit.from_linear(linear, double_quant=double_quant)
    theirs = bnb_from_state_dict(ours.state_dict(), 192, 96)
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"double_quant={double_quant} bias={bias}: max |ours - bitsandbytes| = {diff:.1e}")
    assert diff == 0.0  # same dequantised weight (bit-exact) and the same F.linear call in fp32


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_layout_is_bitsandbytes(double_quant):
    linear = make_linear()
    ours = Linear4bit.from_linear(linear, double_quant=double_quant).state_dict()
    theirs = bnb_quantised(linear, double_quant).state_dict()
    assert list(ours) == list(theirs)  # same keys in the same order
    assert bytes(ours[QS_KEY].tolist()) == bytes(theirs[QS_KEY].tolist())  # same JSON, byte for byte
    meta = json.loads(bytes(ours[QS_KEY].tolist()))
    assert list(meta)[:4] == ["quant_type", "blocksize", "dtype", "shape"] and meta["shape"] == [96, 192]
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
    same = [key for key in ours if key != "weight.absmax" or not double_quant]  # 8-bit absmax codes: see test_quant_nf4
    for key in same:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("double_quant", [True, False])
def test_loads_a_state_dict_saved_by_bitsandbytes(double_quant):
    linear = make_linear(seed=1)
    theirs = bnb_quantised(linear, double_quant)
    ours = Linear4bit.from_linear(make_linear(seed=2), double_quant=not double_quant)  # a different layer of that shape
    ours.load_state_dict(theirs.state_dict())
    assert ours.quant_state.double_quant == double_quant
    x = torch.randn(7, 192)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_own_state_dict_round_trip_and_device_moves():
    layer = Linear4bit.from_linear(make_linear(n_in=130, n_out=33))  # 4290 values: a partial last block
    clone = Linear4bit.from_linear(make_linear(n_in=130, n_out=33, seed=5))
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 130)
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
    clone.to(torch.float16)  # dtype casts leave the quantised state alone; the bias follows, as in nn.Linear
    assert clone.quant_state.nested_absmax.dtype == torch.float32 and clone.weight.dtype == torch.uint8
    assert clone.bias.dtype == torch.float16 and clone(x.half()).dtype == torch.float16
    assert torch.equal(copy.deepcopy(layer).dequantize(), layer.dequantize())
    assert layer.to("cpu") is layer and layer.weight.device.type == "cpu" and not layer.weight.is_floating_point()


def test_input_gradient_equals_fp64_reference():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    layer.bias.requires_grad_(True)  # bias="all" in an adapter config trains base biases
    x = torch.randn(4, 3, 192, requires_grad=True)
    grad_out = torch.randn(4, 3, 96)
    layer(x).backward(grad_out)
    x64 = x.detach().double().requires_grad_(True)
    bias64 = layer.bias.detach().double().requires_grad_(True)
    (x64 @ layer.dequantize(torch.float64).t() + bias64).backward(grad_out.double())
    # fp32 sums of 96 (grad_x) or 12 (grad_bias) products of O(1) terms: error well below 1e-5
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias64.grad.float(), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for name, p in layer.named_parameters() if name != "bias")


def test_the_dequantised_weight_is_not_kept_for_backward(monkeypatch):
    """Every dequantised weight is freed when forward returns (checked by weak references), and backward
    makes a new one; nothing of size (out, in) goes through autograd's saved tensors either."""
    layer = Linear4bit.from_linear(make_linear())
    made = []

    def recording_dequantize(q, dtype=None):
        weight = dequantize_nf4(q, dtype)
        made.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(linear4bit, "dequantize_nf4", recording_dequantize)
    saved = []
    x = torch.randn(5, 192, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    gc.collect()
    assert len(made) == 1 and made[0]() is None
    assert (96, 192) not in saved and (192, 96) not in saved
    out.sum().backward()
    assert len(made) == 2 and x.grad is not None


def test_compute_dtype_and_output_dtype():
    linear = make_linear().to(torch.bfloat16)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    assert layer.quant_state.dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(2, 192, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16  # computed in fp32, cast back to the input's dtype (as bitsandbytes)
    # the same fp32 call: a matmul then "+ bias" rounds differently from F.linear's fused bias on some CPUs
    reference = nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float()).to(torch.bfloat16)
    assert torch.equal(out, reference)
    exact = x.double() @ layer.dequantize(torch.float64).t() + layer.bias.double()
    # rounding to bf16 moves a value by at most 2^-8 of itself (its unit roundoff); the fp32 sums add ~1e-6
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5)


def test_lora_wraps_a_4bit_base():
    base = Linear4bit.from_linear(make_linear())
    lora = LoraLinear(base, r=4, alpha=8, scaling=2.0, dropout=0.0)
    assert lora.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(3, 192)
    expected = x @ base.dequantize().t() + base.bias + 2.0 * (x @ lora.lora_A.weight.t()) @ lora.lora_B.weight.t()
    out = lora(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None


def corrupt(state: dict, key: str, value) -> dict:
    state = dict(state)
    if value is None:
        del state[key]
    else:
        state[key] = value
    return state


def json_tensor(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_missing_or_corrupt_quant_state_is_an_error_naming_the_key():
    layer = Linear4bit.from_linear(make_linear())
    good = layer.state_dict()
    meta = json.loads(bytes(good[QS_KEY].tolist()))
    cases = [
        (corrupt(good, "weight.absmax", None), "weight.absmax is missing"),
        (corrupt(good, "weight.nested_absmax", None), "weight.nested_absmax is missing"),
        (corrupt(good, QS_KEY, None), "bitsandbytes__nf4 is missing"),
        (corrupt(good, QS_KEY, torch.tensor(list(b"{not json"), dtype=torch.uint8)), "bitsandbytes__nf4 does not hold"),
        (corrupt(good, QS_KEY, json_tensor({**meta, "quant_type": "fp4"})), "quant_type='fp4'; only 'nf4'"),
        (corrupt(good, QS_KEY, json_tensor({**meta, "blocksize": 48})), "blocksize=48"),
        (corrupt(good, QS_KEY, json_tensor({**meta, "shape": [96, 191]})), "weight is torch.uint8 with 9216 elements"),
        (corrupt(good, "weight.quant_map", good["weight.quant_map"] * 2), "weight.quant_map is not the NF4 code book"),
        (corrupt(good, "weight.absmax", good["weight.absmax"][:-1]), "weight.absmax is torch.uint8 with 287 elements"),
        (corrupt(good, QS_KEY, json_tensor({**meta, "nested_offset": "x"})), "nested_offset='x'"),
    ]
    for state, message in cases:
        with pytest.raises(QuantizationError, match=message):
            Linear4bit.from_linear(make_linear()).load_state_dict(state)
    wide = Linear4bit.from_linear(make_linear(n_in=256))
    with pytest.raises(QuantizationError, match=r"weight.quant_state.bitsandbytes__nf4 holds shape \[96, 192\], but this layer is \(96, 256\)"):
        wide.load_state_dict(good)


def test_absent_layer_and_extra_keys_follow_load_state_dict_rules():
    layer = Linear4bit.from_linear(make_linear())
    with pytest.raises(RuntimeError, match="Missing key.*\"weight\".*\"bias\""):
        layer.load_state_dict({})
    result = layer.load_state_dict({**layer.state_dict(), "weight.extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["weight.extra"] and result.missing_keys == []


def test_only_2d_weights():
    with pytest.raises(QuantizationError, match="2-D"):
        Linear4bit(quantize_nf4(torch.randn(4, 8, 8)))
    q = quantize_nf4(torch.randn(8, 64))
    assert torch.equal(Linear4bit(q).dequantize(), dequantize_nf4(q))
