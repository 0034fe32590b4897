"""Training-memory estimate for LoRA, QLoRA and full fine-tuning from a model's shape alone.

Each bucket is counted the way PyTorch holds it during one training step of a Llama-family model:
- weights: the base model (QLoRA: bitsandbytes NF4 with double quantisation for the block linears, the
  norms in the compute dtype, the embeddings and head in the checkpoint's 16-bit dtype under an fp32 model
  (lorafit.models.frozen_16bit.kept_dtype: the loader's rule), else in the compute dtype);
- adapters, their gradients and optimizer state: fp32 (PEFT and lorafit keep adapters in fp32);
- activations: what autograd keeps after the forward pass, tensor by tensor (see `activation_bytes`);
- logits: lorafit's chunked head loss (train/loss.py), with the upcast slice of a 16-bit head; `logits_hf` is the
  stock transformers loss;
- temporaries: QLoRA's dequantised weight of the largest block linear, 6 bytes per weight at its peak inside
  quant.nf4.dequantize_nf4 (the int32 code index, 2 B/weight, beside the fp32 values, 4 B/weight), alive
  in the forward and again in the backward pass of that layer.
The total is the sum of the buckets, an upper bound: the gradients (freed by zero_grad before each forward)
and, with checkpointing, the one rebuilt block are never alive with the head's logits. On SmolLM2 it exceeds
the allocator's measured peak by 1-6% (benchmarks/memory_estimate.py). Not modelled: the optimizer step's temporaries.
Numbers are bytes; the text table prints GB (1e9 bytes).

Against a CPU run's RSS (issue 15): the estimate is the step's bytes, so compare it with the training peak minus
what the process holds before any model (`import lorafit`: ~0.35 GB of torch + transformers). At Llama-3.2-1B
shape a `lorafit train` process once peaked 4.06 GB above that vs 2.09 GB estimated, for two reasons outside this model,
both fixed where they arose rather than here: the NF4 load read the checkpoint through safetensors' memory map, whose
pages (2.47 GB of bf16) stayed in RSS for the whole load (models/tensor_stream.py now reads each tensor into a
buffer of its own), and glibc kept freed activation buffers in its heap, ~0.25 GB above the allocator's peak
(device.return_freed_host_memory). With both fixed and the embeddings kept bf16, the same run peaks 1.54 GB above
that baseline vs 1.63 GB estimated (x1.06, adamw_8bit); at Llama-3.1-8B shape 6.82 GB vs 7.02 GB (x1.03).
Measured numbers: benchmarks/results/scale_*.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.targets import name_matches
from lorafit.config import ConfigError
from lorafit.device import head_chunk_rows
from lorafit.diagnose.model_shape import (
    ATTENTION_LINEARS,
    BLOCK_LINEARS,
    MLP_LINEARS,
    ModelShape,
    model_shape,
)
from lorafit.distributed import STRATEGIES
from lorafit.models.frozen_16bit import kept_dtype, slice_bytes

GB = 1e9
METHODS = ("lora", "qlora", "full")
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEQUANT_BYTES_PER_WEIGHT = 6  # dequantize_nf4's peak: int32 code index (2 B/weight) + fp32 values (4 B/weight)
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")  # training.optimizer's names, and sgd
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")  # paged: the same bytes, in CUDA unified memory
FP32 = 4
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # bitsandbytes defaults: 64 weights per absmax, 256 absmax per fp32 scale
NF4_CONSTANTS = 16 * FP32 + 256 * FP32 + FP32  # per layer: NF4 code book, 8-bit code of the absmax, their offset
BNB_8BIT_BLOCK, BNB_MIN_8BIT_SIZE = 256, 4096  # bitsandbytes 8-bit optimizers: blockwise absmax; small tensors stay fp32
TARGET_SETS = {"all-linear": BLOCK_LINEARS, "attention": ATTENTION_LINEARS, "mlp": MLP_LINEARS}
BUCKETS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "temporaries")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per bucket of one training step and the settings they assume; `total` is their sum."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    logits_hf: int
    temporaries: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Peak estimate with lorafit's chunked head loss."""
        return sum(getattr(self, name) for name in BUCKETS)

    @property
    def total_hf(self) -> int:
        """Peak estimate with the stock transformers loss, which materialises (tokens x vocab) logits."""
        return self.total - self.logits + self.logits_hf

    def to_dict(self) -> dict[str, Any]:
        """Plain data: every bucket in bytes, both totals, and the settings."""
        return {**asdict(self), "total": self.total, "total_hf": self.total_hf}

    def to_text(self) -> str:
        """A table in GB, one line per bucket, headed by the settings it assumes."""
        s = self.settings
        checkpointing = "on" if s["grad_checkpointing"] else "off"
        rank = f" r={s['r']} ({s['targets']})" if s["method"] != "full" else ""
        lines = [
            f"memory estimate for {s['model']} ({s['parameters'] / 1e9:.3g}B parameters)",
            (f"  {s['method']}{rank}, {s['precision']}, {s['optimizer']}, batch {s['batch']} x seq {s['seq']}, "
             f"gradient checkpointing {checkpointing}, {'masked (packed)' if s['attention_mask'] else 'unmasked'} "
             "attention"),
        ]
        gpus, strategy = s.get("gpus", 1), s.get("strategy", "ddp")
        sharded = strategy == "fsdp" and gpus > 1
        if gpus > 1:
            lines.append(f"  per process of {gpus} ({strategy}: "
                         + ("weights, adapters, gradients and optimizer state sharded)" if sharded else "everything replicated)"))
        notes = {
            "weights": "base model" + (f", NF4 + double quant, embeddings and head {8 * s['embedding_bytes']}-bit"
                                       if s["method"] == "qlora" else f", {s['precision']}"),
            "adapters": ("fp32 LoRA A and B" + "".join(
                [f", trained copy of {m}" for m in s.get("modules_to_save", [])]
                + [f", {s[k]} trained token rows" for k in ("trainable_tokens", "trainable_head_tokens") if s.get(k)]))
            if s["method"] != "full" else "none",
            **({"weights": f"a 1/{gpus} shard + the gathered root group and 2 blocks"
                + (" (NF4)" if s["method"] == "qlora" else "")} if sharded else {}),
            "gradients": "of the trained parameters",
            "optimizer": f"{s['optimizer']} state",
            "activations": "kept by autograd for the backward pass",
            "logits": "stock loss, full logits" if s.get("head_trained", s["method"] == "full")
            else "lorafit's chunked head loss",
            "temporaries": "largest block linear dequantised" if s["method"] == "qlora" else "none",
        }
        for name in BUCKETS:
            lines.append(f"  {name:<12}{getattr(self, name) / GB:>10.3f} GB   {notes[name]}")
        lines.append(f"  {'total':<12}{self.total / GB:>10.3f} GB")
        if s["method"] != "full":
            lines.append(f"  with the stock transformers loss (full {s['batch'] * s['seq']} x {s['vocab_size']} logits): "
                         f"{self.total_hf / GB:.3f} GB")
        return "\n".join(lines)


def estimate_memory(
    shape: ModelShape | str | Path,
    method: str = "lora",
    r: int = 16,
    batch: int = 1,
    seq: int = 512,
    grad_checkpointing: bool = False,
    precision: str = "fp32",
    optimizer: str = "adamw",
    targets: str | list[str] = "all-linear",
    *,
    dropout: float = 0.0,
    attention_mask: bool = True,
    gpus: int = 1,
    strategy: str = "ddp",
    modules_to_save: list[str] | None = None,
    trainable_tokens: int = 0,
    trainable_head_tokens: int = 0,
) -> MemoryEstimate:
    """Estimate the memory of one training step; `shape` is a ModelShape or anything `model_shape` reads.

    precision: dtype of the base weights and activations (QLoRA: the compute dtype). batch: rows per forward
    pass (the micro-batch); every token is counted as a loss target. attention_mask: lorafit's packed rows
    (positions restart per example) and padded rows make transformers pass a mask, so SDPA repeats K/V to all
    heads and keeps a float (batch, seq, seq) mask per layer; False for unpacked rows of equal length.
    gpus, strategy: memory of one of `gpus` processes (lorafit.distributed). ddp replicates everything, so a rank
    holds what one process does; fsdp shards weights, adapters, their gradients and optimizer state N ways, plus
    the unsharded working set of weights while computing: the root group (embeddings, final norm, head), which
    stays gathered for the whole step, and two blocks (the one computing and the next, prefetched). Activations
    and logits are per micro-batch on every rank either way.
    modules_to_save (the input embeddings and/or the output head, by name): each is a trained copy in the compute
    dtype, its gradient and optimizer state beside the frozen original (a tied pair gets two copies, as lorafit and
    PEFT train it). trainable_tokens: rows of the input embeddings trained (adapter.trainable_token_indices; a tied
    head shares them); trainable_head_tokens: rows of an untied head trained on their own. A trained head leaves
    the chunked head loss for the stock loss (train/loss.has_plain_head), so `logits` is the stock loss's then.
    """
    shape = shape if isinstance(shape, ModelShape) else model_shape(shape)
    _check_settings(method, r, batch, seq, precision, optimizer, dropout)
    _check_parallel(gpus, strategy)
    a = PRECISION_BYTES[precision]
    full = method == "full"
    adapted = [set(BLOCK_LINEARS)] * shape.num_layers if full else adapted_linears(shape, targets)
    trainable = _trainable_tensors(shape, adapted, r, full)
    copies = [] if full else _trained_tables(shape, modules_to_save or [], trainable_tokens, trainable_head_tokens)
    head_trained = full or "head" in modules_to_save_kinds(modules_to_save or []) or trainable_head_tokens > 0 or (
        trainable_tokens > 0 and shape.tie_word_embeddings)
    tokens = batch * seq
    frozen = big_frozen_bytes(shape, method, precision)
    weights = sum(_weight_bytes(kind, numel, method, a, frozen) for kind, numel in shape.parameter_tensors())
    shards = gpus if strategy == "fsdp" else 1
    if shards > 1:
        weights = fsdp_weight_bytes(shape, method, a, shards, frozen)
    activations = activation_bytes(shape, adapted, r=0 if full else r, batch=batch, seq=seq, act_bytes=a,
                                   full=full, grad_checkpointing=grad_checkpointing, dropout=dropout,
                                   attention_mask=attention_mask)
    hf_logits = hf_logits_bytes(shape, tokens, a)
    settings = {
        "model": shape.name, "parameters": shape.parameter_count(), "vocab_size": shape.vocab_size, "method": method,
        "r": r, "batch": batch, "seq": seq, "grad_checkpointing": grad_checkpointing, "precision": precision,
        "optimizer": optimizer, "targets": targets, "dropout": dropout, "attention_mask": attention_mask,
        "embedding_bytes": frozen,
        "trainable_parameters": sum(trainable) + sum(copies), "gpus": gpus, "strategy": strategy,
        "modules_to_save": list(modules_to_save or []), "trainable_tokens": trainable_tokens,
        "trainable_head_tokens": trainable_head_tokens, "head_trained": head_trained,
    }
    return MemoryEstimate(
        weights=weights,
        adapters=0 if full else math.ceil((FP32 * sum(trainable) + a * sum(copies)) / shards),
        gradients=math.ceil(((a if full else FP32) * sum(trainable) + a * sum(copies)) / shards),
        optimizer=math.ceil(sum(optimizer_state_bytes(optimizer, numel) for numel in trainable + copies) / shards),
        activations=activations,
        # the chunked loss needs a frozen head; one held in another dtype than the compute dtype is upcast by slices
        logits=hf_logits if head_trained else lorafit_head_bytes(shape, tokens, a, upcast=frozen != a),
        logits_hf=hf_logits,
        temporaries=DEQUANT_BYTES_PER_WEIGHT * max(i * o for i, o, _ in shape.linear_shapes().values()) if method == "qlora" else 0,
        settings=settings,
    )


def adapted_linears(shape: ModelShape, targets: str | list[str]) -> list[set[str]]:
    """Per block, the linear layers that get an adapter, matched on the transformers module names as lorafit does."""
    if isinstance(targets, str) and targets in TARGET_SETS:
        return [set(TARGET_SETS[targets]) for _ in range(shape.num_layers)]
    chosen = [{n for n in BLOCK_LINEARS if name_matches(_module_name(layer, n), targets)} for layer in range(shape.num_layers)]
    if not any(chosen):
        raise ConfigError(
            f"targets={targets!r} matches no block linear layer (names look like {_module_name(0, 'q_proj')!r}); "
            f"use 'all-linear', 'attention', 'mlp' or names among {', '.join(BLOCK_LINEARS)}."
        )
    return chosen


def fsdp_weight_bytes(shape: ModelShape, method: str, act_bytes: int, gpus: int, frozen_bytes: int | None = None) -> int:
    """Peak weight bytes of one FSDP2 rank (lorafit.distributed.wrap): a 1/gpus shard of every weight, plus the rest
    of the root group (embeddings, final norm, head: gathered for the whole step) and of two blocks (computing,
    prefetched) while they are gathered. frozen_bytes: bytes per value of the embeddings and head (big_frozen_bytes)."""
    frozen_bytes = act_bytes if frozen_bytes is None else frozen_bytes
    tensors = [(kind, _weight_bytes(kind, numel, method, act_bytes, frozen_bytes)) for kind, numel in shape.parameter_tensors()]
    total = sum(size for _, size in tensors)
    root = sum(size for kind, size in tensors if kind in ("embedding", "head")) + shape.hidden_size * act_bytes
    block = (total - root) / shape.num_layers
    unsharded = (root + min(2, shape.num_layers) * block) * (1 - 1 / gpus)
    return math.ceil(total / gpus + unsharded)


def nf4_bytes(numel: int) -> int:
    """Storage of one weight in bitsandbytes NF4 with double quantisation (~4.127 bits per weight)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + FP32 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CONSTANTS


def optimizer_state_bytes(optimizer: str, numel: int) -> int:
    """State of one trained tensor: AdamW two fp32 moments; 8-bit AdamW (paged or not) two uint8 moments plus one
    fp32 absmax per 256 values each (tensors under 4096 elements keep fp32 moments, as bitsandbytes does)."""
    if optimizer == "sgd":
        return 0
    if optimizer in EIGHT_BIT_OPTIMIZERS and numel >= BNB_MIN_8BIT_SIZE:
        return 2 * (numel + FP32 * math.ceil(numel / BNB_8BIT_BLOCK))
    return 2 * FP32 * numel


def activation_bytes(
    shape: ModelShape,
    adapted: list[set[str]],
    *,
    r: int,
    batch: int,
    seq: int,
    act_bytes: int,
    full: bool = False,
    grad_checkpointing: bool = False,
    dropout: float = 0.0,
    attention_mask: bool = True,
) -> int:
    """Bytes autograd keeps for the backward pass of the decoder stack (blocks, final norm, rotary cos/sin); with
    adapters, the final norm's output (which it keeps) is the head's input, counted in `lorafit_head_bytes`.

    With checkpointing each block keeps only its input, and one block's activations are rebuilt at a time in
    the backward pass; without it, every block keeps what `block_activation_bytes` lists.
    """
    tokens, a = batch * seq, act_bytes
    blocks, grad_flows, rope = block_activation_bytes(shape, adapted, r=r, batch=batch, seq=seq, act_bytes=a, full=full,
                                                      dropout=dropout, attention_mask=attention_mask)
    final = _norm_bytes(shape, tokens, a, full, grad_flows, False, output_in_head=True)
    final += tokens * 8 if full else 0  # a trained embedding keeps the int64 token ids
    rope_bytes = 2 * tokens * shape.head_dim * a if rope else 0  # cos and sin, shared by every block
    if grad_checkpointing:
        return shape.num_layers * tokens * a * shape.hidden_size + max(blocks) + final + rope_bytes
    return sum(blocks) + final + rope_bytes


def block_activation_bytes(
    shape: ModelShape,
    adapted: list[set[str]],
    *,
    r: int,
    batch: int,
    seq: int,
    act_bytes: int,
    full: bool = False,
    dropout: float = 0.0,
    attention_mask: bool = True,
) -> tuple[list[int], bool, bool]:
    """Per block, the bytes autograd keeps; also whether gradients reach the final norm and the rotary cos/sin.

    Follows transformers' Llama code with SDPA attention and lorafit's LoRA branch: a frozen linear keeps nothing,
    an adapted one keeps its input x and x·Aᵀ (and a 1-byte dropout mask); RMSNorm keeps 1/rms and either its output
    (lorafit's fused norm, with adapters) or its input in fp32 (stock, full fine-tuning); SDPA keeps q, k, v, its output and a per-head fp32 log-sum-exp; with adapters the MLP's
    down(silu(gate) ⊙ up) is lorafit's fused function, which keeps gate and up only. Blocks before the first adapter
    keep nothing that needs gradients.
    """
    tokens, a = batch * seq, act_bytes
    i = shape.intermediate_size
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    fan_in = {name: dims[0] for name, dims in shape.linear_shapes().items()}
    grad_flows = full  # does the residual stream need gradients yet (full: the embedding is trained)
    rope = False
    blocks = []
    for names in adapted:
        qkv = names & {"q_proj", "k_proj", "v_proj"}
        block = _norm_bytes(shape, tokens, a, full, grad_flows, bool(qkv))  # and the normed input q/k/v keep
        rope = rope or grad_flows or bool(names & {"q_proj", "k_proj"})
        if grad_flows or qkv:  # q, k, v (K/V repeated to all heads when a mask rules out grouped-query SDPA), output
            block += tokens * (a * (2 * q_width + 2 * (q_width if attention_mask else kv_width)) + FP32 * shape.num_heads)
            block += a * batch * seq * seq if attention_mask else 0  # the boolean mask made additive, per call
        elif "o_proj" in names:
            block += tokens * a * q_width  # o_proj's input, which attention did not keep
        grad_flows = grad_flows or bool(qkv) or "o_proj" in names
        block += _norm_bytes(shape, tokens, a, full, grad_flows, bool(names & {"gate_proj", "up_proj"}))
        gate = grad_flows or "gate_proj" in names
        up = grad_flows or "up_proj" in names
        down = "down_proj" in names
        if full:  # stock autograd: silu keeps gate's output; the product keeps silu(gate) and up; down its input
            block += tokens * a * i * (2 * gate + up + down)
        else:  # lorafit's fused tail (adapters/swiglu.py): gate and up, or p alone when only the down adapter trains
            block += tokens * a * i * (2 if gate or (up and down) else 1 if up or down else 0)
        grad_flows = grad_flows or bool(names & {"gate_proj", "up_proj", "down_proj"})
        if not full:  # the LoRA branch: x·Aᵀ per adapted linear, and a 1-byte keep mask of x under dropout
            block += tokens * sum(a * r + (fan_in[n] if dropout > 0 else 0) for n in names)
        blocks.append(block)
    return blocks, grad_flows, rope


def _norm_bytes(shape: ModelShape, tokens: int, act_bytes: int, full: bool, grad_flows: bool,
                adapted_after: bool, output_in_head: bool = False) -> int:
    """An RMSNorm's bytes with the normed output that adapted layers after it keep (adapted_after).

    Stock autograd (full fine-tuning) keeps the input in fp32 (a copy when 16-bit), fp32 1/rms and, for the trained
    weight, x/rms; the adapters keep the output besides. With adapters lorafit's fused norm (adapters/rmsnorm.py)
    keeps its output, the very tensor the adapters keep, and 1/rms. grad_flows: the norm's input needs a gradient.
    output_in_head: the output is the head's input, which `lorafit_head_bytes` counts (the final norm).
    """
    h = shape.hidden_size
    kept_output = adapted_after or (grad_flows and not full and not output_in_head)
    output = tokens * act_bytes * h if kept_output else 0
    if not grad_flows:
        return output
    if full:
        return tokens * (FP32 * h + FP32 + act_bytes * h) + output
    return tokens * FP32 + output


def lorafit_head_bytes(shape: ModelShape, tokens: int, act_bytes: int, upcast: bool = False) -> int:
    """Peak of lorafit's head loss (every token a target): hidden states, their gathered rows and the gradient
    w.r.t. them, and one chunk of fp32 logits, worked on in place (train/loss.py), with its (rows, hidden) gradient;
    at 16 bits the chunk also exists in the matmul dtype while it is converted to fp32 and back. upcast: the head is
    held in another dtype (a 16-bit checkpoint's, under an fp32 model), so one slice of it is upcast at a time
    (models/frozen_16bit.py), with its (rows, slice) product before it is copied into the logits."""
    rows = min(tokens, head_chunk_rows(shape.vocab_size))
    chunk = rows * shape.vocab_size * (FP32 + (act_bytes if act_bytes < FP32 else 0)) + rows * shape.hidden_size * act_bytes
    head = 3 * tokens * shape.hidden_size * act_bytes + chunk
    if upcast:
        piece = slice_bytes(shape.vocab_size, shape.hidden_size, act_bytes)
        head += piece + rows * max(piece // (shape.hidden_size * act_bytes), shape.hidden_size) * act_bytes
    return head


def hf_logits_bytes(shape: ModelShape, tokens: int, act_bytes: int) -> int:
    """Peak of the stock transformers loss: in its backward, three fp32 (tokens x vocab) tensors, the log-softmax
    kept from the forward and the gradients w.r.t. it and w.r.t. the logits (the forward's logits, and their fp32
    copy when 16-bit, are freed by then unless the caller keeps the output)."""
    return tokens * shape.vocab_size * 3 * FP32


def _trainable_tensors(shape: ModelShape, adapted: list[set[str]], r: int, full: bool) -> list[int]:
    """numel of every trained tensor: all parameters (full), else each adapter's A (r x in) and B (out x r)."""
    if full:
        return [numel for _, numel in shape.parameter_tensors()]
    dims = shape.linear_shapes()
    return [n for names in adapted for name in sorted(names) for n in (r * dims[name][0], dims[name][1] * r)]


EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")  # last name part of input embeddings
HEAD_NAMES = ("lm_head", "output", "embed_out")  # ... of the output head


def modules_to_save_kinds(entries: list[str]) -> list[str]:
    """'embedding' or 'head' for each modules_to_save entry; another module is a ConfigError (the estimate knows a
    model's shape, not every module's)."""
    kinds = []
    for entry in entries:
        leaf = entry.rsplit(".", 1)[-1]
        if leaf not in EMBEDDING_NAMES + HEAD_NAMES:
            raise ConfigError(f"modules_to_save entry {entry!r}: the memory estimate counts the input embeddings "
                              f"({', '.join(EMBEDDING_NAMES)}) and the output head ({', '.join(HEAD_NAMES)}) only.")
        kinds.append("embedding" if leaf in EMBEDDING_NAMES else "head")
    return kinds


def token_rows(indices: list | dict | None) -> tuple[int, int]:
    """(rows of the input embeddings, rows of an output head) that adapter.trainable_token_indices trains, in
    either of its forms; estimate_memory's trainable_tokens and trainable_head_tokens."""
    if not indices:
        return 0, 0
    if not isinstance(indices, dict):
        return len(indices), 0
    head = sum(len(rows) for key, rows in indices.items() if key.rsplit(".", 1)[-1] in HEAD_NAMES)
    return sum(len(rows) for rows in indices.values()) - head, head


def _trained_tables(shape: ModelShape, modules_to_save: list[str], token_rows: int, head_token_rows: int) -> list[int]:
    """numel of the trained copies of modules_to_save and of the trained token rows (module docstring)."""
    for name, rows in (("trainable_tokens", token_rows), ("trainable_head_tokens", head_token_rows)):
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= shape.vocab_size:
            raise ConfigError(f"{name}={rows!r} is invalid: use the number of trained rows, 0..{shape.vocab_size}.")
    table = shape.vocab_size * shape.hidden_size
    return ([table for _ in modules_to_save_kinds(modules_to_save)]
            + [rows * shape.hidden_size for rows in (token_rows, head_token_rows) if rows])


def big_frozen_bytes(shape: ModelShape, method: str, precision: str) -> int:
    """Bytes per value of the embeddings and head: under QLoRA the loader's rule (models/frozen_16bit.kept_dtype)
    applied to the checkpoint's dtype (unknown: the compute dtype), else the compute dtype."""
    model_dtype = PRECISION_DTYPES[precision]
    if method != "qlora":
        return model_dtype.itemsize
    stored = CHECKPOINT_DTYPES.get(shape.checkpoint_dtype or "", model_dtype)
    return kept_dtype(stored, model_dtype).itemsize


def _weight_bytes(kind: str, numel: int, method: str, act_bytes: int, frozen_bytes: int) -> int:
    if method == "qlora" and kind == "linear":
        return nf4_bytes(numel)
    return numel * (frozen_bytes if kind in ("embedding", "head") else act_bytes)


def _module_name(layer: int, linear: str) -> str:
    block = "self_attn" if linear in ATTENTION_LINEARS else "mlp"
    return f"model.layers.{layer}.{block}.{linear}"


def _check_parallel(gpus: int, strategy: str) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus <= 0:
        raise ConfigError(f"gpus={gpus!r} is invalid: use the number of processes (GPUs), a positive integer.")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is unknown: use one of {', '.join(STRATEGIES)}.")


def _check_settings(method: str, r: int, batch: int, seq: int, precision: str, optimizer: str, dropout: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}.")
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision={precision!r} is unknown: use one of {', '.join(PRECISION_BYTES)}.")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}.")
    for name, value in (("r", r), ("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} is invalid: use a positive integer.")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout={dropout!r} is invalid: use a number in [0, 1).")
