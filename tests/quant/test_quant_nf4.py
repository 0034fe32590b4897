"""NF4 quantisation against the fp64 reference, bitsandbytes (CPU) and the formulas: codes, absmax, dequantised values."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.quant import nf4
from lorafit.quant.nf4 import (
    NF4_CODE,
    QuantDtypeError,
    QuantizationError,
    bits_per_parameter,
    block_absmax,
    check_scheme,
    dequantize_nf4,
    dynamic_map,
    nf4_code,
    quantize_nf4,
    state_bits,
)
from nf4_reference import BNB_SHAPES, bnb_dequantize, bnb_functional, bnb_quantize, check_bnb_shape, reference_nf4

# FACTS §6: the decision thresholds (midpoints) as printed there, 7 significant digits.
FACTS_THRESHOLDS = [-0.8480964, -0.6106329, -0.4599953, -0.3396794, -0.2346074, -0.1379117, -0.0455250, 0.0397901,
                    0.1202553, 0.2035213, 0.2920138, 0.3893125, 0.5016634, 0.6427869, 0.8614784]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU dequantisation in torch.compile; compiling for each shape takes seconds here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes from packed bytes, high nibble first (test-side reference of the layout)."""
    flat = packed.view(-1).long()
    return torch.stack((flat >> 4, flat & 0xF), dim=1).view(-1)[:n]


def sample(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    if kind == "heavy":  # Student-t-like tails: a few values 10-1000x the typical one
        x = x / torch.rand(shape, generator=generator).clamp(min=1e-3).sqrt() ** 2
    return x * 0.02


def test_code_book_is_bitsandbytes_nf4_and_the_facts_values():
    assert torch.equal(nf4_code(), bnb_functional().get_4bit_type("nf4", device="cpu"))
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert torch.allclose((code[:-1] + code[1:]) / 2, torch.tensor(FACTS_THRESHOLDS, dtype=torch.float64), atol=6e-8)


def test_code_book_is_the_normal_quantile_construction():
    """FACTS §6: create_normal_map(offset=0.9677083, use_extra_value=True), with ndtri = scipy's norm.ppf."""
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values = values / values.max()
    assert (values - torch.tensor(NF4_CODE, dtype=torch.float64)).abs().max() < 2e-7  # FACTS: "to about 1e-7"


def test_dynamic_map_is_bitsandbytes_create_dynamic_map_exactly():
    ours = dynamic_map()
    assert torch.equal(ours, bnb_functional().create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8))
    assert ours[127] == 0 and ours[255] == 1 and abs(ours[0].item() + 0.99296874) < 1e-7
    assert ours[ours != 0].abs().min().item() == pytest.approx(5.5e-7, rel=1e-6)
    assert bool((ours[1:] > ours[:-1]).all())


CASES = [((64, 64), "normal"), ((96, 100), "normal"), ((7, 9), "normal"), ((129, 33), "heavy"), ((1, 1), "normal"),
         ((300, 257), "heavy"), ((1536, 576), "normal"), ((2, 3, 65), "heavy"), ((32, 32), "normal"), ((48, 32), "heavy")]


@pytest.mark.parametrize("shape,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_absmax_and_values_match_the_fp64_reference(shape, kind, dtype):
    """Any shape, partial last blocks and odd sizes included (the padding nibble is the code of 0.0)."""
    x = sample(kind, shape, seed=sum(shape)).to(dtype)
    q = quantize_nf4(x, double_quant=False)
    reference = reference_nf4(x)
    n = x.numel()
    assert q.packed.shape == ((n + 1) // 2, 1) and q.packed.dtype == torch.uint8
    assert torch.equal(q.packed, reference.packed)
    assert torch.equal(q.absmax, reference.absmax) and q.absmax.shape == (math.ceil(n / 64),)
    ours = dequantize_nf4(q)
    assert ours.dtype == dtype and ours.shape == x.shape and torch.equal(ours, reference.values)


BNB_CASES = [((64, 64), "normal"), ((96, 128), "heavy"), ((3, 5, 192), "heavy"), ((1536, 576), "normal")]


@pytest.mark.parametrize("shape,kind", BNB_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_absmax_and_values_match_bitsandbytes(shape, kind, dtype):
    x = sample(kind, shape, seed=sum(shape)).to(dtype)
    q = quantize_nf4(x, double_quant=False)
    packed, state = bnb_quantize(x)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(packed, state))


@pytest.mark.parametrize("blocksize,bnb_shape", [(32, (70, 256)), (128, (70, 256)), (4096, (6, 4096))])
def test_other_blocksizes_match_the_reference_and_bitsandbytes(blocksize, bnb_shape):
    x = sample("heavy", (70, 130), seed=blocksize)  # partial last blocks
    q = quantize_nf4(x, blocksize=blocksize, double_quant=False)
    reference = reference_nf4(x, blocksize)
    assert torch.equal(q.packed, reference.packed) and torch.equal(q.absmax, reference.absmax)
    assert torch.equal(dequantize_nf4(q), reference.values)
    x = sample("heavy", bnb_shape, seed=blocksize)
    q = quantize_nf4(x, blocksize=blocksize, double_quant=False)
    packed, state = bnb_quantize(x, blocksize=blocksize)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(packed, state))


@pytest.mark.parametrize("shape,blocksize", BNB_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_equals_the_fp64_reference_on_every_shape_the_suite_compares(shape, blocksize, dtype):
    """The bitsandbytes behaviour every comparison relies on: on BNB_SHAPES (rows of whole blocks of >= 64
    values) its CPU quantiser and dequantiser give the fp64 reference's bytes, absmax and values exactly, on
    AVX2 and AVX-512 machines. (On AVX-512, bitsandbytes 0.50.2 dequantises 32-wide rows wrongly; see
    nf4_reference.) If a bitsandbytes release changes this, the shape that breaks is named here."""
    x = sample("heavy", shape, seed=sum(shape) + blocksize).to(dtype)
    assert shape[-1] % max(blocksize, 64) == 0, "BNB_SHAPES holds only rows of whole blocks of >= 64 values"
    packed, state = bnb_quantize(x, blocksize=blocksize)
    reference = reference_nf4(x, blocksize)
    assert torch.equal(packed, reference.packed) and torch.equal(state.absmax, reference.absmax)
    assert torch.equal(bnb_dequantize(packed, state), reference.values)


def test_bitsandbytes_is_only_called_on_checked_shapes():
    with pytest.raises(ValueError, match=r"shape \(32, 32\) with blocksize 64 is not in nf4_reference.BNB_SHAPES"):
        bnb_quantize(torch.zeros(32, 32))
    check_bnb_shape((96, 192), 64)  # a listed shape passes


def test_dequantize_is_code_times_absmax_in_exact_arithmetic():
    x = sample("heavy", (37, 61), seed=5)  # 2257 values: 35 full blocks and a partial one
    q = quantize_nf4(x, double_quant=False)
    codes = unpack(q.packed, x.numel())
    scale = q.absmax.double().repeat_interleave(64)[: x.numel()]
    exact = torch.tensor(NF4_CODE, dtype=torch.float64)[codes] * scale  # fp32 x fp32 is exact in fp64
    assert torch.equal(dequantize_nf4(q).view(-1), exact.float())  # so one rounding gives our value exactly


def on_and_beside_thresholds() -> torch.Tensor:
    """One block of 64 values: 1, the 15 fp32 thresholds, the fp32 values just above and below them, -1, 0, -0."""
    bounds = (nf4_code()[:-1] + nf4_code()[1:]) / 2  # fp32 thresholds, as the kernels compute them
    above = torch.nextafter(bounds, torch.tensor(2.0))
    below = torch.nextafter(bounds, torch.tensor(-2.0))
    block = torch.cat([torch.tensor([1.0]), bounds, above, below, torch.tensor([-1.0, 0.0, -0.0])])  # 51 values
    return torch.cat([block, torch.zeros(64 - block.numel())])  # absmax exactly 1: x * (1/1) is x itself


def test_values_exactly_on_thresholds_go_to_the_lower_code():
    x = on_and_beside_thresholds()
    q = quantize_nf4(x, double_quant=False)
    codes = unpack(q.packed, 64)
    lower = torch.arange(15)
    assert torch.equal(codes[1:16], lower)  # on the threshold between code i and i+1: code i
    assert torch.equal(codes[16:31], lower + 1) and torch.equal(codes[31:46], lower)
    assert codes[0] == 15 and codes[46] == 0 and codes[47] == 7 and codes[48] == 7
    assert torch.equal(q.packed, reference_nf4(x).packed)  # the reference's tie rule, written independently


def test_bitsandbytes_breaks_ties_the_same_way():
    x = on_and_beside_thresholds()
    assert torch.equal(bnb_quantize(x.view(1, 64))[0], quantize_nf4(x, double_quant=False).packed)


def test_chunked_quantisation_equals_one_pass(monkeypatch):
    x = sample("heavy", (101, 99), seed=11)  # 9999 values: 157 blocks, the last partial, odd n
    whole = quantize_nf4(x)
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 640)  # 10 blocks per chunk: 16 chunks
    chunked = quantize_nf4(x)
    for field in ("packed", "absmax", "nested_absmax"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
    assert chunked.nested_offset == whole.nested_offset


@pytest.mark.parametrize("shape,kind", [((1536, 576), "normal"), ((300, 320), "heavy"), ((129, 64), "normal")])
def test_double_quantisation_against_bitsandbytes(shape, kind):
    x = sample(kind, shape, seed=3)
    q = quantize_nf4(x, double_quant=True)
    packed, state = bnb_quantize(x, double_quant=True)
    exact_absmax = quantize_nf4(x, double_quant=False).absmax
    # The 4-bit codes use the fp32 absmax, before double quantisation: identical.
    assert torch.equal(q.packed, packed)
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == state.absmax.shape
    assert q.nested_offset == state.offset.item() and torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_quant_map, state.state2.code)
    # 8-bit absmax codes: ours are the nearest dynamic-map value (fp64 reference); bitsandbytes' CPU
    # kernel (a binary search with a coarse first step) picks a neighbour in a few blocks.
    scaled = ((exact_absmax - q.nested_offset).view(-1) * (1.0 / q.nested_absmax).repeat_interleave(256)[: q.absmax.numel()])
    distance = (scaled.double().unsqueeze(1) - dynamic_map().double()).abs()  # (n_blocks, 256)
    assert torch.equal(q.absmax.long(), distance.argmin(dim=1))
    differ = q.absmax != state.absmax
    ours_err = distance.gather(1, q.absmax.long().unsqueeze(1))
    theirs_err = distance.gather(1, state.absmax.long().unsqueeze(1))
    assert bool((ours_err <= theirs_err).all())
    ours, theirs = dequantize_nf4(q), bnb_dequantize(packed, state)
    same_block = ~differ.repeat_interleave(64)[: x.numel()].view(shape)
    print(f"{shape} {kind}: differing absmax codes {differ.float().mean().item():.2e} ({int(differ.sum())} of {differ.numel()}), "
          f"max |dequant diff| {(ours - theirs).abs().max().item():.2e} (0 outside those blocks)")
    assert differ.float().mean() < 0.01
    assert torch.equal(ours[same_block], theirs[same_block])
    # absmax recovery is the FACTS formula: dynmap[code] * nested_absmax[j // 256] + offset
    recovered = dynamic_map().double()[q.absmax.long()] * q.nested_absmax.double().repeat_interleave(256)[: q.absmax.numel()]
    assert torch.allclose(block_absmax(q).double(), recovered + q.nested_offset, rtol=0, atol=1e-7 * exact_absmax.max().item())


def test_double_quantised_absmax_error_is_small():
    x = sample("normal", (1536, 576), seed=9)
    q = quantize_nf4(x)
    exact = quantize_nf4(x, double_quant=False).absmax
    relative = ((block_absmax(q) - exact).abs() / exact).max().item()
    print(f"double quantisation: max relative absmax error {relative:.2e}")
    assert relative < 0.02  # 8-bit dynamic codes of (absmax - mean): steps of ~0.7% of the block range


def test_bits_per_parameter_of_a_realistic_layer():
    n_out, n_in = 576, 1536
    n = n_out * n_in
    x = sample("normal", (n_out, n_in), seed=1)
    with_dq, without = quantize_nf4(x), quantize_nf4(x, double_quant=False)
    maps = (16 + 256) * 32 + 32  # the NF4 and dynamic maps and the offset, stored once per layer
    assert state_bits(with_dq) == 4 * n + 8 * (n // 64) + 32 * math.ceil(n / 64 / 256) + maps
    assert state_bits(without) == 4 * n + 32 * (n // 64) + 16 * 32
    print(f"bits per parameter at 576x1536: {bits_per_parameter(with_dq):.4f} with double quantisation, "
          f"{bits_per_parameter(without):.4f} without")
    assert bits_per_parameter(with_dq) <= 4 + 8 / 64 + 32 / (64 * 256) + 0.01  # 4.127 + 0.0098 of per-layer maps
    assert bits_per_parameter(without) == pytest.approx(4.5 + 16 * 32 / n)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(QuantDtypeError, match="float32, bfloat16 or float16.*torch.int64") as info:
        quantize_nf4(torch.arange(64))
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(QuantDtypeError, match="torch.float64"):
        quantize_nf4(torch.zeros(64, dtype=torch.float64))
    with pytest.raises(QuantizationError, match="blocksize=48 is not supported; use one of 32, 64, 128"):
        quantize_nf4(torch.zeros(64), blocksize=48)
    with pytest.raises(QuantizationError, match="'nf3' is not supported; use one of: nf4"):
        check_scheme("nf3")
    with pytest.raises(QuantizationError, match="inf or NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 40))
    with pytest.raises(QuantizationError, match="empty"):
        quantize_nf4(torch.zeros(0, 5))


def test_zero_blocks_and_tiny_sizes():
    x = torch.cat([torch.zeros(64), sample("normal", (64,), seed=2), torch.zeros(3)])  # a zero full block and zero tail
    for double_quant in (False, True):
        q = quantize_nf4(x, double_quant=double_quant)
        assert torch.equal(dequantize_nf4(q)[:64], torch.zeros(64)) and torch.equal(dequantize_nf4(q)[128:], torch.zeros(3))
    single = quantize_nf4(torch.tensor([-0.5]))
    assert dequantize_nf4(single).item() == -0.5 and single.packed.item() == 0x07  # code 0 (-1.0), pad code 7 (0.0)
