"""NF4 block quantisation (QLoRA) in plain torch, bit-compatible with bitsandbytes' NF4 format.

A tensor is flattened row-major and cut into blocks of `blocksize` values. Each block keeps its
absmax (fp32) and one 4-bit code per value: the index of the nearest NF4 code-book value to
x / absmax (ties go to the lower code). Two codes share a byte, the even-index value in the high
nibble. Double quantisation stores the absmax values as 8-bit codes of the signed dynamic map,
blockwise (256) after subtracting their mean: 4 + 8/64 + 32/(64·256) = 4.127 bits per value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import torch

from lorafit.errors import UserError

# The NF4 code book: bitsandbytes' get_4bit_type("nf4"), sorted ascending (FACTS §6).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
QUANT_SCHEMES = ("nf4",)  # the values `quantize` may take (RunConfig, load_model); each means a 4-bit base
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256  # double quantisation: one fp32 scale per 256 absmax codes
CHUNK_ELEMENTS = 1 << 20  # quantise at most this many values at a time (about 20 MB of temporaries)
LUT_CELLS = 4096  # NF4 code lookup: cells of width 1/4096 over [-1, 1]
MIN_ABSMAX = 1e-38  # an all-zero block is scaled by 1/1e-38 instead of 1/0 (as bitsandbytes does)


class QuantizationError(UserError):
    """Bad quantisation settings or a bad quantised state; the message says what is supported."""


class QuantDtypeError(QuantizationError, TypeError):
    """The tensor to quantise is not a 16/32-bit float tensor."""


def check_scheme(name: str) -> str:
    """Return `name` if it is a supported quantisation scheme, else raise naming the supported ones."""
    if name not in QUANT_SCHEMES:
        raise QuantizationError(f"quantisation scheme {name!r} is not supported; use one of: {', '.join(QUANT_SCHEMES)}.")
    return name


def check_blocksize(blocksize: int) -> int:
    """Return `blocksize` if bitsandbytes allows it for 4-bit quantisation, else raise listing the allowed ones."""
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize={blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))}.")
    return blocksize


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map, as bitsandbytes' create_dynamic_map(True, 7, 8): fp32 [256], ascending.

    Exponent i = 0..6 contributes the 2^i midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6),
    with both signs; then 0 and 1 are added (code[127] = 0, code[255] = 1).
    """
    return _dynamic_map_cpu().clone()


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Code books, their decision thresholds (fp32 midpoints), the NF4 cell lookup and the byte -> values table."""
    nf4 = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    dynamic = _dynamic_map_cpu().to(device)
    nf4_bounds = (nf4[:-1] + nf4[1:]) / 2
    cells = _nf4_cell(nf4_bounds).tolist()
    assert len(set(cells)) == len(cells), "two NF4 thresholds share a lookup cell"
    base = torch.zeros(2 * LUT_CELLS + 1, dtype=torch.uint8, device=device)
    threshold = torch.full((2 * LUT_CELLS + 1,), float("inf"), device=device)
    for cell, bound in zip(cells, nf4_bounds):
        base[cell + 1:] += 1
        threshold[cell] = bound
    byte = torch.arange(256, device=device)
    pairs = torch.stack((nf4[byte >> 4], nf4[byte & 0xF]), dim=1)  # (256, 2): values of the high, low nibble
    return {"nf4": nf4, "nf4_bounds": nf4_bounds, "nf4_cell_base": base, "nf4_cell_threshold": threshold,
            "nf4_pairs": pairs.view(torch.int64).view(-1),  # each row's 8 bytes as one element: a 1-D gather is ~4x faster
            "dynamic": dynamic, "dynamic_bounds": (dynamic[:-1] + dynamic[1:]) / 2}


def _nf4_cell(scaled: torch.Tensor) -> torch.Tensor:
    """Lookup cell of values in [-1, 1]: floor((x + 1) · 4096), int32 in [0, 8192]. Monotone in x."""
    return (scaled + 1).mul_(LUT_CELLS).floor_().to(torch.int32)


def _nf4_codes(scaled: torch.Tensor, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """NF4 code of each value in [-1, 1] (uint8): the number of thresholds below it, i.e. the nearest
    code with ties to the lower one, exactly torch.bucketize(scaled, nf4_bounds) but ~6x faster on CPU.

    _nf4_cell is monotone, so each cell is an interval of x, and no cell holds two thresholds (they
    are >= 0.08 apart, cells 1/4096 wide): count = thresholds in lower cells + (x > this cell's own).
    """
    flat = scaled.reshape(-1)
    cell = _nf4_cell(flat)
    codes = tables["nf4_cell_base"].index_select(0, cell).add_(flat > tables["nf4_cell_threshold"].index_select(0, cell))
    return codes.view(scaled.shape)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor (the `quant_map` bitsandbytes stores with every layer)."""
    return _tables(torch.device(device or "cpu"))["nf4"].clone()


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor in bitsandbytes' NF4 layout; `dequantize_nf4` turns it back into a float tensor."""

    packed: torch.Tensor  # uint8 [(n+1)//2, 1]: two codes per byte, even index in the high nibble
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] dynamic-map codes when double-quantised
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (what dequantize_nf4 returns by default)
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)] scales of the absmax codes
    nested_quant_map: torch.Tensor | None = None  # fp32 [256], the dynamic map the absmax codes index
    nested_offset: float | None = None  # mean of the fp32 absmax, subtracted before quantising them

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> NF4Tensor:
        """The same quantised tensor with every state tensor on `device`."""
        nested = {}
        if self.double_quant:
            nested = {"nested_absmax": self.nested_absmax.to(device), "nested_quant_map": self.nested_quant_map.to(device)}
        return replace(self, packed=self.packed.to(device), absmax=self.absmax.to(device), **nested)


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block of `flat` divided by its absmax, clamped to [-1, 1] (blocks, blocksize), and the fp32 absmax.

    `flat` is fp32 with a length that is a multiple of `blocksize` (callers pad with zeros, which
    change no absmax). Values are multiplied by the reciprocal of the absmax, as bitsandbytes' kernels do.
    """
    blocks = flat.view(-1, blocksize)  # (B, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    if not bool(torch.isfinite(absmax).all()):
        raise QuantizationError("the tensor to quantise holds inf or NaN values; NF4 needs finite values.")
    return (blocks * (1.0 / absmax.clamp(min=MIN_ABSMAX)).unsqueeze(1)).clamp_(-1, 1), absmax


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """`flat` as fp32, zero-padded to a multiple of `multiple`."""
    flat = flat.float()
    pad = -flat.numel() % multiple
    return torch.nn.functional.pad(flat, (0, pad)) if pad else flat


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise a float tensor to NF4 (blockwise absmax, optional double quantisation of the absmax).

    Works on any device; large tensors are processed CHUNK_ELEMENTS at a time so the temporaries
    stay small. A size that is not a multiple of `blocksize` gets a last, shorter block.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in INPUT_DTYPES:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise QuantDtypeError(f"NF4 quantisation needs a float32, bfloat16 or float16 tensor, got {got}; convert it with .float().")
    check_blocksize(blocksize)
    if tensor.numel() == 0:
        raise QuantizationError(f"cannot quantise an empty tensor (shape {tuple(tensor.shape)}).")
    tables = _tables(tensor.device)
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    step = max(CHUNK_ELEMENTS // blocksize, 1) * blocksize  # whole blocks, an even count of values
    packed, absmax = [], []
    for start in range(0, n, step):
        scaled, block_absmax = _scaled_blocks(_padded(flat[start:start + step], blocksize), blocksize)
        pairs = _nf4_codes(scaled, tables).view(-1, 2)  # (values/2, 2)
        packed.append(pairs[:, 0].bitwise_left_shift(4).bitwise_or_(pairs[:, 1]))
        absmax.append(block_absmax)
    packed_t = torch.cat(packed)[: (n + 1) // 2].unsqueeze(1)  # an odd n ends with the code of 0.0 as padding
    absmax_t = torch.cat(absmax)
    q = NF4Tensor(packed=packed_t, absmax=absmax_t, shape=tensor.shape, dtype=tensor.dtype, blocksize=blocksize)
    return _double_quantize(q) if double_quant else q


def _double_quantize(q: NF4Tensor) -> NF4Tensor:
    """Replace the fp32 absmax by 8-bit dynamic-map codes of (absmax - mean), in blocks of 256."""
    tables = _tables(q.device)
    offset = q.absmax.mean()
    n_blocks = q.absmax.numel()
    scaled, nested_absmax = _scaled_blocks(_padded(q.absmax - offset, NESTED_BLOCKSIZE), NESTED_BLOCKSIZE)
    codes = torch.bucketize(scaled.view(-1)[:n_blocks], tables["dynamic_bounds"], out_int32=True)  # nearest, ties lower
    return replace(q, absmax=codes.to(torch.uint8), nested_absmax=nested_absmax,
                   nested_quant_map=tables["dynamic"].clone(), nested_offset=offset.item())


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 absmax of every block; recovered from the 8-bit codes when double-quantised."""
    if not q.double_quant:
        return q.absmax
    scales = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: q.absmax.numel()]  # (n_blocks,)
    return q.nested_quant_map[q.absmax.long()] * scales + q.nested_offset


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float tensor q stands for: code[q] * absmax computed in fp32, then cast to `dtype` (default q.dtype)."""
    n, blocksize = q.numel, q.blocksize
    pairs = _tables(q.device)["nf4_pairs"]
    values = pairs.index_select(0, q.packed.view(-1).int()).view(torch.float32)  # (2 * n_bytes,): hi, lo, hi, ...
    absmax = block_absmax(q)
    n_blocks = absmax.numel()
    if values.numel() != n_blocks * blocksize:
        values = torch.nn.functional.pad(values[:n], (0, n_blocks * blocksize - n))
    values = values.view(n_blocks, blocksize).mul_(absmax.unsqueeze(1)).view(-1)
    return values[:n].to(dtype or q.dtype).view(q.shape)


def state_bits(q: NF4Tensor) -> int:
    """Bits of everything that must be stored to restore q: codes, absmax, the NF4 map, nested state."""
    tensors = [q.packed, q.absmax]
    bits = len(NF4_CODE) * 32  # the fp32 quant_map saved with every layer
    if q.double_quant:
        tensors += [q.nested_absmax, q.nested_quant_map]
        bits += 32  # nested_offset
    return bits + sum(t.numel() * t.element_size() * 8 for t in tensors)


def bits_per_parameter(q: NF4Tensor) -> float:
    """state_bits(q) / number of values: 4.5 without double quantisation at blocksize 64, ~4.127 with it."""
    return state_bits(q) / q.numel
