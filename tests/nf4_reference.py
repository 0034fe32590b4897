"""The tests' NF4 references: an independent fp64 quantiser, and the one door to bitsandbytes' NF4 kernels.

`reference_nf4` is written from the format's definition alone (FACTS §6, lorafit.quant.nf4's docstring):
blocks of `blocksize` values of the row-major flattened tensor, each scaled by the fp32 reciprocal of its
absmax (as bitsandbytes' kernels do), then the nearest code-book value chosen in fp64. A value exactly on a
decision threshold goes to the lower code; the thresholds are the fp32 midpoints of neighbouring codes, as
the kernels compute them (some differ from the exact midpoint by half an ulp, which decides such a value).

bitsandbytes 0.50.2's native CPU `dequantize_4bit` is wrong on AVX-512 machines (an Intel Xeon with AMX, an
AMD EPYC) when a row (the last dimension) is even and not a whole number of blocks: a 32x32 weight comes back
with relative error 0.37 instead of 0.09 (its codes and absmax are right), while AVX2 machines agree. Which
kernel runs depends on the CPU, not on torch's settings. So every comparison with
bitsandbytes goes through `bnb_quantize`/`bnb_dequantize`, which accept only the shapes in `BNB_SHAPES`
(rows of whole blocks of >= 64 values); test_quant_nf4 checks that bitsandbytes equals `reference_nf4` on
each of them, so a bitsandbytes change that breaks one fails there, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lorafit.quant.nf4 import NF4_CODE

CODE_BOOK = torch.tensor(NF4_CODE, dtype=torch.float64)
_CODE_BOOK_FP32 = torch.tensor(NF4_CODE, dtype=torch.float32)
THRESHOLDS = ((_CODE_BOOK_FP32[:-1] + _CODE_BOOK_FP32[1:]) / 2).double()  # fp32 midpoints, as the kernels compute them
ZERO_CODE = int(CODE_BOOK.abs().argmin())  # the code of 0.0: the padding nibble of an odd number of values
CHUNK = 1 << 16  # values per (values x 16) fp64 distance matrix

# (shape, blocksize) of every tensor the suite hands to bitsandbytes' NF4 kernels: each row (last dimension)
# is a whole number of blocks of at least 64 values, where its CPU kernels are right on AVX2 and AVX-512.
BNB_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((1, 64), 64),  # test_quant_nf4: threshold ties
    ((64, 64), 64), ((96, 128), 64), ((3, 5, 192), 64), ((129, 64), 64), ((300, 320), 64),  # test_quant_nf4
    ((70, 256), 32), ((70, 256), 128), ((6, 4096), 4096),  # test_quant_nf4: other block sizes
    ((96, 192), 64),  # test_quant_linear4bit: bitsandbytes' Linear4bit
    ((576, 576), 64), ((192, 576), 64), ((1536, 576), 64), ((576, 1536), 64),  # SmolLM2-135M's block linears
)


@dataclass(frozen=True)
class ReferenceNF4:
    codes: torch.Tensor  # int64 [n]: code-book index of each value
    packed: torch.Tensor  # uint8 [(n + 1) // 2, 1]: two codes per byte, even index in the high nibble
    absmax: torch.Tensor  # fp32 [ceil(n / blocksize)]
    values: torch.Tensor  # dequantised: code * absmax in fp64, rounded once to fp32, then to the input's dtype


def reference_nf4(x: torch.Tensor, blocksize: int = 64) -> ReferenceNF4:
    """NF4 of `x` without double quantisation, computed in fp64 from the code book (see the module docstring)."""
    flat = x.detach().reshape(-1).float()  # bf16 and fp16 convert to fp32 exactly
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # zeros change no absmax
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)[:n].double()
    codes = torch.cat([_nearest_codes(part) for part in scaled.split(CHUNK)])
    pairs = torch.nn.functional.pad(codes, (0, n % 2), value=ZERO_CODE).view(-1, 2)
    packed = (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8).unsqueeze(1)
    values = CODE_BOOK[codes] * absmax.double().repeat_interleave(blocksize)[:n]  # fp32 x fp32: exact in fp64
    return ReferenceNF4(codes, packed, absmax, values.float().to(x.dtype).view(x.shape))


def _nearest_codes(scaled: torch.Tensor) -> torch.Tensor:
    distance = (scaled.unsqueeze(1) - CODE_BOOK).abs()  # (values, 16)
    nearest = distance.argmin(dim=1)  # the first of equal distances: the lower code
    on_threshold = scaled.unsqueeze(1) == THRESHOLDS  # (values, 15): at most one per value
    return torch.where(on_threshold.any(dim=1), on_threshold.int().argmax(dim=1), nearest)


def bitsandbytes():
    """bitsandbytes, a test extra: a test calling this is skipped, with the reason printed, where it is not installed."""
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes (a test extra: pip install -e '.[test]') is not installed")


def bnb_functional():
    """bitsandbytes.functional, skipping the calling test as `bitsandbytes` does."""
    return bitsandbytes().functional


def check_bnb_shape(shape: tuple[int, ...] | torch.Size, blocksize: int) -> None:
    """Raise unless (shape, blocksize) is one of BNB_SHAPES, the shapes checked against `reference_nf4`."""
    if (tuple(shape), blocksize) not in BNB_SHAPES:
        raise ValueError(f"shape {tuple(shape)} with blocksize {blocksize} is not in nf4_reference.BNB_SHAPES: use one "
                         "of them, or add one whose rows hold whole blocks of >= 64 values.")


def bnb_quantize(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """bitsandbytes' NF4 of `x`: (packed, quant_state), for a shape in BNB_SHAPES."""
    check_bnb_shape(x.shape, blocksize)
    return bnb_functional().quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantisation of `bnb_quantize`'s result."""
    check_bnb_shape(state.shape, state.blocksize)
    return bnb_functional().dequantize_4bit(packed, state)


def bnb_round_trip(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """`x` quantised and dequantised by bitsandbytes (PEFT's and transformers' quantiser)."""
    return bnb_dequantize(*bnb_quantize(x, blocksize, double_quant))
