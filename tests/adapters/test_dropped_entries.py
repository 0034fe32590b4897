"""The sparse products over dropout's dropped entries against their dense definitions, and where they are used."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters.branch import dropout_keep_mask
from lorafit.adapters.dropped_entries import dropped_input_grad, dropped_product, sparse_dropout_pays


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5])  # none dropped (an empty sparse matrix), few, half
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_equal_the_dense_ones(rate, dtype):
    torch.manual_seed(0)
    x, weight, grad = torch.randn(37, 24, dtype=dtype), torch.randn(40, 24, dtype=dtype), torch.randn(37, 40, dtype=dtype)
    keep = dropout_keep_mask(x, rate)[0] if rate else torch.ones_like(x, dtype=torch.bool)
    drop = (~keep).to(dtype)
    # same products, fewer terms: each entry sums at most 24 (40) terms of O(1); fp32 rounding stays near 1e-5
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(dropped_product(x, keep, weight), (x * drop) @ weight.t(), rtol=0, atol=tol)
    sampled = dropped_input_grad(grad, keep, weight)
    torch.testing.assert_close(sampled, (grad @ weight) * drop, rtol=0, atol=tol)
    assert not sampled[keep].any()  # exactly zero wherever the input was kept


def test_sparse_path_only_where_it_pays():
    cpu = torch.device("cpu")
    assert sparse_dropout_pays(cpu, torch.float32, 0.05) and sparse_dropout_pays(cpu, torch.float64, 0.1)
    assert not sparse_dropout_pays(cpu, torch.float32, 0.0)  # no dropout: no dropped entries
    assert not sparse_dropout_pays(cpu, torch.float32, 0.2)  # too many dropped entries: dense is faster
    assert not sparse_dropout_pays(cpu, torch.bfloat16, 0.05)  # no bf16 sparse kernels on CPU
    assert not sparse_dropout_pays(torch.device("cuda"), torch.float32, 0.05)  # dense GEMMs win on GPUs
