"""The matmuls of one LoRA training step and their FLOPs: the one owner of that count (roofline, metrics, MFU).

A LoRA step on a decoder of L blocks, for micro-batches of B sequences padded to S positions (T = B·S rows), runs
these matmuls, and only these need FLOPs that grow with the model (norms, activations, softmax and the optimizer
are elementwise, O(T·hidden)):

- every block linear W0 (k inputs, n outputs, frozen): forward x W0ᵀ and input gradient dy W0, 2·T·k·n FLOPs each.
  Counted for every block linear, also the first block's q/k/v whose input gradient autograd may skip.
- an adapter of rank r on it: h = x Aᵀ, y += h Bᵀ; backward dB = dyᵀ h, dh = dy B, dA = dhᵀ x, dx += dh A:
  six products of 2·T·r·(k or n) FLOPs, i.e. 6 FLOPs per trainable parameter per row.
- attention in every block, per sequence and query head (head dim d): scores Q Kᵀ and output P V forward, and
  dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q backward: 6 products of 2·S·S·d FLOPs, counted in full (not
  halved for the causal mask; a fused kernel that skips masked blocks does less).
- the output head (hidden h, vocab V, frozen): forward and input gradient, 2·T·h·V FLOPs each.

So the model FLOPs per position = 6·(adapter parameters) + 4·(frozen block-linear and head weights)
+ 12·L·(query heads)·d·S, as nanoGPT's 6N + 12·L·H·Q·T with the frozen weights' missing weight gradient taken
out. DoRA's row norms and the extra W0·dropout(x) of PEFT's DoRA formula are not counted: this is the work any
LoRA step must do, so model_flops_per_s is comparable across methods and libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafit.adapters.branch import layer_shape
from lorafit.adapters.targets import linear_layers, output_head

# Dense (not sparse) bf16 tensor-core peaks in FLOP/s from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
GPU_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class Matmul:
    """`count` products of `batch` independent (m x k) @ (k x n) matrices in one step; `what` names them."""

    what: str
    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of all `count` products."""
        return 2 * self.m * self.k * self.n * self.batch * self.count


@dataclass(frozen=True)
class LinearShape:
    """One block linear: its name, (in, out) features and the rank of the adapter on it (0: none)."""

    name: str
    in_features: int
    out_features: int
    rank: int


def block_linears(model: nn.Module, rank: int | None = None) -> list[LinearShape]:
    """The model's block linears (not the head) with the rank of the adapter attached to each (0 where none);
    with `rank`, as if every one carried an adapter of that rank ("all-linear"), whatever is attached."""
    adapted = {name: module for name, module in model.named_modules() if hasattr(module, "base_layer")
               and hasattr(module, "lora_A")}
    inside_adapters = tuple(f"{name}." for name in adapted)
    shapes = [LinearShape(name, *layer_shape(module.base_layer), module.r) for name, module in adapted.items()]
    shapes += [LinearShape(name, *layer_shape(module), 0) for name, module in linear_layers(model).items()
               if not name.startswith(inside_adapters)]
    return [LinearShape(s.name, s.in_features, s.out_features, s.rank if rank is None else rank) for s in shapes]


def step_matmuls(model: nn.Module, batch: int, seq_len: int, rank: int | None = None) -> list[Matmul]:
    """Every matmul of one training step on `batch` sequences of `seq_len` positions (see the module docstring),
    with identical shapes merged into one entry with its count. `rank` as in block_linears."""
    rows = batch * seq_len
    counts: dict[tuple[str, int, int, int, int], int] = {}

    def add(what: str, m: int, k: int, n: int, count: int = 1, bmm: int = 1) -> None:
        counts[(what, m, k, n, bmm)] = counts.get((what, m, k, n, bmm), 0) + count

    for layer in block_linears(model, rank):
        k, n, r = layer.in_features, layer.out_features, layer.rank
        add("frozen forward", rows, k, n)
        add("frozen input grad", rows, n, k)
        if r:
            add("lora h = x·Aᵀ", rows, k, r)
            add("lora h·Bᵀ", rows, r, n)
            add("lora dh = dy·B", rows, n, r)
            add("lora dx += dh·A", rows, r, k)
            add("lora dA = dhᵀ·x", r, rows, k)
            add("lora dB = dyᵀ·h", n, rows, r)
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    add("attention Q·Kᵀ, dO·Vᵀ", seq_len, head_dim, seq_len, 2 * layers, bmm=batch * heads)
    add("attention P·V, Pᵀ·dO, dS·K, dSᵀ·Q", seq_len, seq_len, head_dim, 4 * layers, bmm=batch * heads)
    head = output_head(model)
    if head is not None:
        hidden, vocab = layer_shape(head)
        add("head forward", rows, hidden, vocab)
        add("head input grad", rows, vocab, hidden)
    return [Matmul(what, m, k, n, bmm, count) for (what, m, k, n, bmm), count in counts.items()]


def flops_per_position(model: nn.Module, seq_len: int, rank: int | None = None) -> float:
    """Model FLOPs of one training step per sequence position, for sequences of `seq_len` (module docstring)."""
    return sum(matmul.flops for matmul in step_matmuls(model, 1, seq_len, rank)) / seq_len


def gpu_bf16_peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s from GPU_BF16_PEAK_FLOPS, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK_FLOPS if key in name), None)


def step_throughput(model: nn.Module, batch_shapes: list[tuple[int, int]], seconds: float,
                    device: torch.device) -> dict[str, float | None]:
    """The metrics row's achieved FLOP/s for one step of micro-batches of (sequences, padded length) shapes that
    took `seconds`: model_flops_per_s (padded positions count: the matmuls run on them) and mfu, that over the
    GPU's bf16 peak (None off CUDA or for a GPU without a known peak)."""
    flops = sum(rows * length * flops_per_position(model, length) for rows, length in batch_shapes)
    achieved = flops / seconds
    peak = gpu_bf16_peak_flops(device)
    return {"model_flops_per_s": round(achieved), "mfu": round(achieved / peak, 4) if peak else None}
