"""Linear4bit: a frozen linear layer whose weight is stored in NF4, with bitsandbytes' state-dict layout.

forward(x) = x Wᵀ + b with W = dequantize(weight) computed in `compute_dtype`, the output cast back
to x's dtype (as bitsandbytes does). The dequantised W is a temporary: the backward pass
dequantises again rather than keeping (out, in) floats alive between forward and backward.

State dict of a layer at prefix P (bitsandbytes' `Linear4bit` with `QuantState.as_dict(packed=True)`):
P.weight (uint8 codes), P.bias, P.weight.absmax, P.weight.quant_map, [P.weight.nested_absmax,
P.weight.nested_quant_map,] P.weight.quant_state.bitsandbytes__nf4 (UTF-8 JSON of the other fields).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch
from torch import nn

from lorafit.quant.nf4 import (
    BLOCKSIZES,
    INPUT_DTYPES,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    QuantizationError,
    dequantize_nf4,
    nf4_code,
    quantize_nf4,
)

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
STATE_PARAMETERS = ("weight", "absmax", "nested_absmax", "nested_quant_map")  # Linear4bit's frozen state
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in INPUT_DTYPES}


class _NF4Linear(torch.autograd.Function):
    """x Wᵀ + b with W dequantised from q on the fly, in compute_dtype; grads for x and b, none for W."""

    @staticmethod
    def forward(ctx, x, bias, q: NF4Tensor, compute_dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            weight = dequantize_nf4(q, compute_dtype)  # (out, in), freed on return
            out = nn.functional.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
        ctx.q, ctx.compute_dtype, ctx.x_dtype = q, compute_dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(x.dtype)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(ctx.compute_dtype)  # (..., out)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ dequantize_nf4(ctx.q, ctx.compute_dtype)).to(ctx.x_dtype)  # (..., in)
            if ctx.needs_input_grad[1]:
                grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, grad_bias, None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear replacement holding its weight in NF4.

    The quantised state is a set of frozen plain parameters, so that FSDP2 can shard it like any weight
    (it shards parameters only, and turns Parameter subclasses into plain ones, dropping their metadata):
    `weight` (packed uint8 codes, (n+1)//2 x 1), `absmax` (fp32, or uint8 codes when double-quantised),
    and with double quantisation `nested_absmax` and `nested_quant_map` (fp32). The metadata (shape, dtype,
    blocksize, nested offset) are plain attributes. `quant_state` assembles them into an NF4Tensor from
    whatever the parameters hold at that moment: under FSDP2 that is the all-gathered full tensors inside
    forward and backward. `model.to(device)` moves the state; dtype casts leave it untouched.
    """

    def __init__(self, quant_state: NF4Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(quant_state.shape) != 2:
            raise QuantizationError(f"Linear4bit needs a 2-D (out, in) weight, got shape {tuple(quant_state.shape)}.")
        self.out_features, self.in_features = quant_state.shape
        self.compute_dtype = compute_dtype
        self._set_quant_state(quant_state)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().to(quant_state.device), requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                    blocksize: int = 64) -> Linear4bit:
        """Quantise an nn.Linear's weight to NF4 (on the linear's device); the bias is kept as is."""
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> NF4Tensor:
        """The NF4 weight, built from the state parameters as they are now."""
        return NF4Tensor(packed=self.weight, absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                         dtype=self.quant_dtype, blocksize=self.blocksize, nested_absmax=self.nested_absmax,
                         nested_quant_map=self.nested_quant_map, nested_offset=self.nested_offset)

    def quant_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold the quantised weight (not the bias): storage, not model parameters."""
        return [p for name in STATE_PARAMETERS if (p := getattr(self, name)) is not None]

    def _set_quant_state(self, q: NF4Tensor) -> None:
        self.quant_dtype, self.blocksize, self.nested_offset = q.dtype, q.blocksize, q.nested_offset
        tensors = {"weight": q.packed, "absmax": q.absmax, "nested_absmax": q.nested_absmax,
                   "nested_quant_map": q.nested_quant_map}
        for name in STATE_PARAMETERS:
            tensor = tensors[name]
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight as a float tensor (dtype defaults to the dtype it was quantised from)."""
        return dequantize_nf4(self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Linear.apply(x, self.bias, self.quant_state, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """Move the quantised state with the module (fn is .to/.cuda/...); dtype casts leave it as it is."""
        state = {id(p): p.dtype for p in self.quant_parameters()}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if id(t) not in state or moved.dtype == state[id(t)]:
                return moved
            if state[id(t)] == torch.uint8:
                raise QuantizationError(f"Linear4bit holds uint8 NF4 codes; a conversion to {moved.dtype} is not "
                                        "possible (use dequantize() to get a float weight).")
            return t.to(moved.device)

        return super()._apply(move_only, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Write bitsandbytes' keys, in its order: weight, bias, then the quant state entries."""
        def plain(value: torch.Tensor) -> torch.Tensor:
            return value if keep_vars or not isinstance(value, nn.Parameter) else value.detach()

        entries = nf4_state_dict(self.quant_state)
        destination[prefix + "weight"] = plain(entries.pop("weight"))
        if self.bias is not None:
            destination[prefix + "bias"] = plain(self.bias)
        for key, value in entries.items():
            destination[prefix + "weight." + key] = plain(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Read bitsandbytes' keys; a missing or inconsistent quant-state entry raises QuantizationError naming it."""
        entries = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if "weight" not in entries:
            missing_keys.append(prefix + "weight")
        else:
            q = nf4_from_state_dict(entries, prefix)
            if tuple(q.shape) != (self.out_features, self.in_features):
                raise QuantizationError(f"{prefix}weight.{QUANT_STATE_KEY} holds shape {list(q.shape)}, but this layer is "
                                        f"({self.out_features}, {self.in_features}).")
            device = self.weight.device if self.weight.device.type != "meta" else q.device
            self._set_quant_state(q.to(device))
        if self.bias is not None:
            if "bias" not in entries:
                missing_keys.append(prefix + "bias")
            elif entries["bias"].shape != self.bias.shape:
                error_msgs.append(f"size mismatch for {prefix}bias: {tuple(entries['bias'].shape)} in the checkpoint, "
                                  f"{tuple(self.bias.shape)} in the layer.")
            else:
                with torch.no_grad():
                    self.bias.copy_(entries["bias"])
        known = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                 "weight." + QUANT_STATE_KEY} | ({"bias"} if self.bias is not None else set())
        unexpected_keys.extend(prefix + key for key in entries if key not in known)

    def extra_repr(self) -> str:
        q = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={q.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}")


def nf4_state_dict(q: NF4Tensor) -> dict[str, torch.Tensor]:
    """q as bitsandbytes stores a Params4bit: 'weight' plus the quant-state entries (keys relative to P.weight.)."""
    entries = {"weight": q.packed, "absmax": q.absmax, "quant_map": nf4_code(q.device)}
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": str(q.dtype).removeprefix("torch."), "shape": list(q.shape)}
    if q.double_quant:
        entries.update(nested_absmax=q.nested_absmax, nested_quant_map=q.nested_quant_map.clone())
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.nested_offset)
    entries[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return entries


def nf4_from_state_dict(entries: dict[str, torch.Tensor], prefix: str = "") -> NF4Tensor:
    """Rebuild an NF4Tensor from a layer's entries ('weight', 'weight.absmax', ...); errors name the full key."""

    def need(key: str) -> torch.Tensor:
        if key not in entries:
            raise QuantizationError(f"{prefix}{key} is missing from the state dict: a bitsandbytes NF4 layer needs "
                                    f"{prefix}weight.absmax, .quant_map and .{QUANT_STATE_KEY} (and .nested_* when double-quantised).")
        return entries[key]

    def fail(key: str, problem: str) -> QuantizationError:
        return QuantizationError(f"{prefix}{key} {problem}; the state dict is not a bitsandbytes NF4 layer this version can read.")

    meta_key = "weight." + QUANT_STATE_KEY
    if "weight.quant_state.bitsandbytes__fp4" in entries:
        raise fail("weight.quant_state.bitsandbytes__fp4", "is FP4 state; only NF4 is supported")
    try:
        meta = json.loads(bytes(need(meta_key).cpu().tolist()).decode("utf-8"))
        shape, blocksize, dtype = torch.Size(meta["shape"]), meta["blocksize"], DTYPE_NAMES[meta["dtype"]]
        quant_type = meta["quant_type"]
    except QuantizationError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise fail(meta_key, f"does not hold the expected JSON (quant_type, blocksize, dtype, shape): {err!r}") from err
    if quant_type != "nf4":
        raise fail(meta_key, f"has quant_type={quant_type!r}; only 'nf4' is supported")
    if blocksize not in BLOCKSIZES:
        raise fail(meta_key, f"has blocksize={blocksize!r}; supported: {', '.join(map(str, BLOCKSIZES))}")
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed, absmax, quant_map = need("weight"), need("weight.absmax"), need("weight.quant_map")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise fail("weight", f"is {packed.dtype} with {packed.numel()} elements; expected uint8 with {(n + 1) // 2} for shape {list(shape)}")
    if not torch.equal(quant_map.float().cpu(), torch.tensor(NF4_CODE, dtype=torch.float32)):
        raise fail("weight.quant_map", "is not the NF4 code book")
    nested = "nested_offset" in meta
    if absmax.dtype != (torch.uint8 if nested else torch.float32) or absmax.numel() != n_blocks:
        raise fail("weight.absmax", f"is {absmax.dtype} with {absmax.numel()} elements; expected {n_blocks} "
                   f"{'uint8 codes (double quantisation)' if nested else 'float32 values'}")
    q = NF4Tensor(packed=packed.reshape(-1, 1), absmax=absmax.to(packed.device), shape=shape, dtype=dtype, blocksize=blocksize)
    if not nested:
        return q
    nested_absmax, nested_map = need("weight.nested_absmax"), need("weight.nested_quant_map")
    if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32":
        raise fail(meta_key, f"has nested_blocksize={meta.get('nested_blocksize')!r}, nested_dtype={meta.get('nested_dtype')!r}; "
                   f"supported: {NESTED_BLOCKSIZE}, 'float32'")
    if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-n_blocks // NESTED_BLOCKSIZE):
        raise fail("weight.nested_absmax", f"has {nested_absmax.numel()} {nested_absmax.dtype} elements; "
                   f"expected {-(-n_blocks // NESTED_BLOCKSIZE)} float32")
    if nested_map.dtype != torch.float32 or nested_map.numel() != 256:
        raise fail("weight.nested_quant_map", f"has {nested_map.numel()} {nested_map.dtype} elements; expected 256 float32")
    offset = meta["nested_offset"]
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise fail(meta_key, f"has nested_offset={offset!r}; expected a finite number")
    return replace(q, nested_absmax=nested_absmax.to(packed.device), nested_quant_map=nested_map.to(packed.device),
                   nested_offset=float(offset))
