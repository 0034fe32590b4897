"""The rule for QLoRA's big frozen float tensors: kept in the checkpoint's 16-bit dtype, computed in the model's.

Under `load_model(..., quantize="nf4")` from a safetensors folder, the input embeddings and the output head
(when they are a plain nn.Embedding / nn.Linear, tied or not) stay in the dtype the checkpoint stores them in
when that is bf16 or fp16 and the model dtype is fp32 (`kept_dtype`). Everything else that is not quantised
(norms, biases: small) is in the model dtype. Why: at Llama-3-8B shape each of the two is 128256 x 4096 = 525M
values, 2.1 GB in fp32 and 1.05 GB in bf16: in fp32 the pair would outweigh the 4.4 GB of NF4 blocks by half.
PEFT + bitsandbytes users get the same storage by loading with torch_dtype=bfloat16 (though PEFT's
prepare_model_for_kbit_training then upcasts every non-quantised parameter to fp32).

The computation does not change: bf16 and fp16 convert to fp32 exactly, so
- the embedding looks up 16-bit rows and returns them in the model dtype (`Frozen16bitEmbedding`): the same
  numbers as an fp32 copy of the 16-bit table;
- the head computes x Wᵀ in x's dtype (autocast's when enabled) with W upcast SLICE_BYTES of rows at a time
  (`Frozen16bitLinear`, `matmul_weight_t`, and `matmul_weight` for the gradient w.r.t. x): the same products as
  an fp32 copy of W, summed in another order (fp32 rounding, ~1e-6 relative), never the whole fp32 W in memory.
What does change, against an fp32 checkpoint, is only the weight's own 16-bit rounding, which a bf16 checkpoint
already has. Both tensors are frozen here; the modules refuse to be trained: a trained embedding or head is a
copy in the compute dtype (`trainable_dtype`; adapter.modules_to_save), and trained rows are replacement rows in
that dtype (adapter.trainable_token_indices), while the 16-bit original stays frozen beside them.
"""

from __future__ import annotations

import torch
from torch import nn

KEEPABLE_DTYPES = (torch.bfloat16, torch.float16)
SLICE_BYTES = 32 * 2**20  # bytes of one upcast slice of weight rows in the compute dtype (4096 rows of 2048 fp32)


def kept_dtype(stored: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a big frozen tensor (embeddings, head) is held in under QLoRA: its checkpoint's 16-bit dtype when
    the model runs in fp32, else the model dtype (the rule above; diagnose.memory counts bytes with it too)."""
    return stored if stored in KEEPABLE_DTYPES and model_dtype == torch.float32 else model_dtype


def trainable_dtype(module: nn.Module) -> torch.dtype:
    """The dtype trained values of `module`'s weight are held in (a full copy, replacement rows): the compute dtype
    for a kept-16-bit embedding or head (fp32: the rule keeps 16 bits only under an fp32 model), else the weight's
    own dtype (as PEFT)."""
    if isinstance(module, Frozen16bitEmbedding):
        return module.output_dtype
    if isinstance(module, Frozen16bitLinear):
        return torch.float32
    return module.weight.dtype


def big_frozen_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Checkpoint key -> parameter of the tensors the rule covers: the weight of the input embeddings when they are a
    plain nn.Embedding and of the output head when it is a plain bias-free nn.Linear (a tied head is the same
    parameter, listed once under its embedding name). Subclasses (scaled embeddings, ...) are left alone."""
    wanted = []
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embeddings) is nn.Embedding:
        wanted.append(embeddings.weight)
    if type(head) is nn.Linear and head.bias is None:
        wanted.append(head.weight)
    ids = {id(p) for p in wanted}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def compute_in_model_dtype(model: nn.Module, model_dtype: torch.dtype) -> None:
    """Make the input embeddings and the output head compute in `model_dtype` when their weight is held in another
    dtype (kept 16-bit by the rule): they become Frozen16bitEmbedding / Frozen16bitLinear holding the same
    parameter (ties stay ties), frozen. Call after the weights are loaded and tied."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embeddings) is nn.Embedding and embeddings.weight.dtype != model_dtype:
        embeddings.weight.requires_grad_(False)
        model.set_input_embeddings(Frozen16bitEmbedding.wrapping(embeddings, model_dtype))
    if type(head) is nn.Linear and head.bias is None and head.weight.dtype != model_dtype:
        head.weight.requires_grad_(False)
        model.set_output_embeddings(Frozen16bitLinear.wrapping(head))


def plain_modules(model: nn.Module) -> None:
    """Undo compute_in_model_dtype: kept-16-bit embeddings and head become a plain nn.Embedding / nn.Linear holding
    the same parameter (ties stay ties), computing in their weight's dtype (merge_and_unload's 16-bit result)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embeddings, Frozen16bitEmbedding):
        with torch.device("meta"):
            plain = nn.Embedding(embeddings.num_embeddings, embeddings.embedding_dim, padding_idx=embeddings.padding_idx)
        plain.weight = embeddings.weight
        model.set_input_embeddings(plain)
    if isinstance(head, Frozen16bitLinear):
        with torch.device("meta"):
            plain_head = nn.Linear(head.in_features, head.out_features, bias=False)
        plain_head.weight = head.weight
        model.set_output_embeddings(plain_head)


class Frozen16bitEmbedding(nn.Embedding):
    """A frozen embedding whose table is 16-bit: looks up rows and returns them in `output_dtype` (exact upcast)."""

    output_dtype: torch.dtype

    @classmethod
    def wrapping(cls, embedding: nn.Embedding, output_dtype: torch.dtype) -> Frozen16bitEmbedding:
        """The same table (the same Parameter object, so a tied head stays tied) behind this forward."""
        with torch.device("meta"):
            module = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                         max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                         scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse)
        module.weight = embedding.weight
        module.output_dtype = output_dtype
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        _require_frozen(self.weight, "input embeddings")
        return super().forward(input_ids).to(self.output_dtype)  # (..., hidden)


class Frozen16bitLinear(nn.Linear):
    """A frozen bias-free linear (the output head) whose weight is 16-bit: x Wᵀ in x's dtype (autocast's when on),
    W upcast a slice of rows at a time (matmul_weight_t); the backward pass recomputes the slices."""

    @classmethod
    def wrapping(cls, linear: nn.Linear) -> Frozen16bitLinear:
        """The same weight (the same Parameter object) behind this forward."""
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, bias=False)
        module.weight = linear.weight
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_frozen(self.weight, "output head")
        return _SlicedLinear.apply(x, self.weight, compute_dtype(x))  # (..., out)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's when it is enabled on x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def matmul_weight_t(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ weight.T in `dtype`, (..., out); a weight held in another dtype is upcast SLICE_BYTES of rows at a time."""
    x = x.to(dtype)
    if weight.dtype == dtype:
        return x @ weight.t()
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    step = _rows_per_slice(weight, dtype)
    for start in range(0, weight.shape[0], step):
        out[..., start:start + step] = x @ weight[start:start + step].to(dtype).t()
    return out


def matmul_weight(g: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g @ weight in `dtype`, (..., in): the gradient of matmul_weight_t w.r.t. x, summed over the same slices."""
    g = g.to(dtype)
    if weight.dtype == dtype:
        return g @ weight
    out = g.new_zeros((*g.shape[:-1], weight.shape[1]))
    step = _rows_per_slice(weight, dtype)
    for start in range(0, weight.shape[0], step):
        out += g[..., start:start + step] @ weight[start:start + step].to(dtype)
    return out


def slice_bytes(rows: int, columns: int, dtype_bytes: int) -> int:
    """Bytes of the largest upcast slice of a (rows, columns) weight: what matmul_weight_t holds beside its output."""
    return min(rows, max(1, SLICE_BYTES // (columns * dtype_bytes))) * columns * dtype_bytes


def _rows_per_slice(weight: torch.Tensor, dtype: torch.dtype) -> int:
    return max(1, SLICE_BYTES // (weight.shape[1] * dtype.itemsize))


def _require_frozen(weight: torch.Tensor, what: str) -> None:
    if weight.requires_grad:
        raise RuntimeError(f"the {what} hold a 16-bit weight kept frozen under QLoRA; train a full-precision copy "
                           "through adapter.modules_to_save (or rows through adapter.trainable_token_indices) "
                           "instead of setting requires_grad on it.")


class _SlicedLinear(torch.autograd.Function):
    """x Wᵀ with a frozen W upcast a slice at a time (matmul_weight_t); grad for x only (matmul_weight)."""

    @staticmethod
    def forward(ctx, x, weight, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            return matmul_weight_t(x, weight, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_x = matmul_weight(grad_out, weight, ctx.dtype).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None

