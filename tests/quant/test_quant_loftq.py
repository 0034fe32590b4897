"""LoftQ factors: the algorithm of FACTS §5 against an fp64 reference built on the fp64 NF4 reference quantiser
(which equals bitsandbytes', PEFT's quantiser, on these shapes: test_quant_nf4)."""

from __future__ import annotations

import pytest
import torch

from lorafit.quant import (
    QuantizationError,
    dequantize_nf4,
    loftq_error,
    loftq_factors,
    quantize_nf4,
)
from nf4_reference import reference_nf4


def random_weight(n_out: int = 256, n_in: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_out, n_in, generator=generator) * 0.02


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """PEFT's quantiser (bitsandbytes NF4, blocksize 64, no double quantisation), as the fp64 reference; fp32."""
    return reference_nf4(weight.float()).values


def reference_loftq(weight: torch.Tensor, r: int, iterations: int):
    """FACTS §5 with the reference NF4 quantiser and the SVD in fp64."""
    target = weight.double()
    residual = target
    for step in range(iterations):
        q = nf4_round_trip(residual.float()).double()
        u, s, vh = torch.linalg.svd(target - q, full_matrices=False)
        lora_b, lora_a = u[:, :r] * s[:r].sqrt(), s[:r].sqrt().unsqueeze(1) * vh[:r]
        if step + 1 < iterations:
            residual = target - lora_b @ lora_a
    return q, lora_a, lora_b


def test_one_iteration_is_nf4_plus_the_best_rank_r_fit_of_its_error():
    weight, r = random_weight(), 16
    q, lora_a, lora_b = loftq_factors(weight, r)
    assert lora_a.shape == (r, 512) and lora_b.shape == (256, r) and lora_a.dtype == lora_b.dtype == torch.float32
    assert torch.equal(q, dequantize_nf4(quantize_nf4(weight, double_quant=False)))  # BA = 0 at the start
    assert torch.equal(q, nf4_round_trip(weight))
    s = torch.linalg.svdvals((weight - q).double())
    # symmetric split: BᵀB = AAᵀ = diag(S_r); the fit is optimal (Eckart-Young): residual² = Σ_{i>r} S_i²
    # fp32 SVD of a 256x512 matrix: relative errors ~1e-6 of S_1
    tol = 1e-5 * s[0].item()
    torch.testing.assert_close((lora_b.t() @ lora_b).double(), torch.diag(s[:r]), rtol=0, atol=tol)
    torch.testing.assert_close((lora_a @ lora_a.t()).double(), torch.diag(s[:r]), rtol=0, atol=tol)
    residual = torch.linalg.matrix_norm((weight - q - lora_b @ lora_a).double()).item()
    assert residual == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-4)


@pytest.mark.parametrize("iterations", [2, 5])
def test_iterations_match_the_fp64_reference(iterations):
    weight, r = random_weight(seed=iterations), 8
    q, lora_a, lora_b = loftq_factors(weight, r, iterations=iterations)
    q_ref, a_ref, b_ref = reference_loftq(weight, r, iterations)
    # An fp32 vs fp64 SVD moves W - BA by ~1e-7 relative: each block absmax (so each Q value) moves by
    # an ulp or so, and a value sitting on a threshold may get the neighbouring code (a jump of >= 5%
    # of the absmax). Allow a handful of such flips out of 131072, and compare BA, not A and B
    # (singular vectors are defined up to sign).
    differing = (~torch.isclose(q.double(), q_ref, rtol=1e-5, atol=0)).float().mean().item()
    delta = torch.linalg.matrix_norm((lora_b @ lora_a).double() - b_ref @ a_ref) / torch.linalg.matrix_norm(b_ref @ a_ref)
    print(f"iterations={iterations}: differing Q values {differing:.1e}, relative BA difference {delta.item():.1e}")
    assert differing < 1e-4 and delta < 1e-3


def test_error_table_on_a_random_matrix():
    weight = random_weight()
    rows = {iterations: loftq_error(weight, r=16, iterations=iterations) for iterations in (1, 2, 5)}
    print("\niterations  ||W-NF4(W)||_F  ||W-(Q+BA)||_F  reduction")
    for iterations, error in rows.items():
        print(f"{iterations:10d}  {error.nf4:14.5f}  {error.loftq:14.5f}  {error.reduction:9.1%}")
        assert error.loftq < error.nf4
    assert rows[1].nf4 == rows[5].nf4


def test_dtype_and_bad_arguments():
    weight = random_weight(32, 64).to(torch.bfloat16)
    q, lora_a, lora_b = loftq_factors(weight, r=4)
    assert q.dtype == torch.bfloat16 and lora_a.dtype == lora_b.dtype == torch.float32
    with pytest.raises(QuantizationError, match="rank r=0"):
        loftq_factors(weight, r=0)
    with pytest.raises(QuantizationError, match="r=33 must be between 1 and min"):
        loftq_factors(weight, r=33)
    with pytest.raises(QuantizationError, match="iterations=0"):
        loftq_factors(weight, r=4, iterations=0)
    with pytest.raises(QuantizationError, match="2-D"):
        loftq_factors(torch.zeros(2, 3, 4), r=1)


@pytest.mark.slow
def test_error_table_on_a_real_smollm2_layer(smollm2):
    model, _ = smollm2
    table = {}
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        weight = model.model.layers[10].get_submodule(name).weight.detach()
        table[name] = {iterations: loftq_error(weight, r=16, iterations=iterations) for iterations in (1, 2, 5)}
    print("\nlayer 10           iterations  ||W-NF4(W)||_F  ||W-(Q+BA)||_F  reduction")
    for name, rows in table.items():
        for iterations, error in rows.items():
            print(f"{name:18s} {iterations:10d}  {error.nf4:14.5f}  {error.loftq:14.5f}  {error.reduction:9.1%}")
            assert error.loftq < error.nf4
