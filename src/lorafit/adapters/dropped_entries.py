"""Products over the few input entries that adapter dropout removes, as sparse matrices.

DoRA with dropout (PEFT's formula) needs z = W0·(x ⊙ keep), the base weight applied to the dropped input, beside the
base layer's own W0·x. At a small dropout rate q almost every entry is kept, so
    W0·(x ⊙ keep) = W0·x - W0·(x ⊙ drop)
needs only the base output the layer computed anyway and a sparse product over the q·T·in dropped entries; in the
backward pass the gradient that z sends to x, keep ⊙ (G W0), becomes (G W0) - drop ⊙ (G W0): the first term joins
the base layer's own input-gradient matmul and the second is a sampled product (SDDMM) at the dropped entries only.
Two of DoRA's four dense (tokens x in x out) matmuls per layer become sparse ones over a q-share of the entries.

Where it pays (`sparse_dropout_pays`): fp32/fp64 on CPU at q <= 0.1. Measured on a 2-core AVX-512 CPU, one thread,
SmolLM2's three layer shapes, 1024 rows (benchmarks/dropped_entries_speed.py; forward + backward, sparse over dense):
0.44-0.73x at q = 0.05, 0.60-0.98x at q = 0.1, 1.04-1.38x at q = 0.2. CPU sparse kernels have no bf16, and on CUDA
dense matmuls beat 5%-dense sparse ones, so bf16 autocast and CUDA keep the dense path.
"""

from __future__ import annotations

import warnings

import torch

SPARSE_DROPOUT_MAX_RATE = 0.1  # above it the dropped entries are too many for sparse products to beat dense ones
_SPARSE_DTYPES = (torch.float32, torch.float64)


def sparse_dropout_pays(device: torch.device, dtype: torch.dtype, rate: float) -> bool:
    """Whether W0·(x ⊙ drop) and drop ⊙ (G W0) are cheaper as sparse products than W0·(x ⊙ keep) and its gradient
    as dense ones (see the module docstring for the measurement)."""
    return device.type == "cpu" and dtype in _SPARSE_DTYPES and 0 < rate <= SPARSE_DROPOUT_MAX_RATE


def _csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": the two ops used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return dense.to_sparse_csr()


def dropped_product(x2: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W0·(x ⊙ drop) for x2 (T, in), the keep mask (T, in) and the base weight (out, in): (T, out)."""
    dropped = _csr(x2.masked_fill(keep, 0))  # the q·T·in entries dropout removed
    return torch.sparse.mm(dropped, weight.to(x2.dtype).t())


def dropped_input_grad(grad: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """drop ⊙ (G W0) for G (T, out): (T, in), zero wherever the input was kept, computed at the dropped entries only."""
    pattern = _csr((~keep).to(grad.dtype))
    sampled = torch.sparse.sampled_addmm(pattern, grad, weight.to(grad.dtype), beta=0.0)
    return sampled.to_dense()


__all__ = ["SPARSE_DROPOUT_MAX_RATE", "dropped_input_grad", "dropped_product", "sparse_dropout_pays"]
