"""lorafit.flops against a hand count for the tiny two-block Llama (tests/tiny_models.py): hidden 32, MLP 48,
4 query heads of dim 8 (2 KV heads), vocab 96, an r=4 adapter on all seven block linears."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny

import lorafit
from lorafit import flops

SEQ = 10
# (in, out) of q, k, v, o, gate, up, down: k and v project to 2 KV heads x 8 = 16
BLOCK_LINEARS = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48), (32, 48), (48, 32)]
FROZEN = 2 * sum(i * o for i, o in BLOCK_LINEARS) + 32 * 96  # 2 x 7680 block weights + the head = 18432
ADAPTER = 2 * sum(4 * (i + o) for i, o in BLOCK_LINEARS)  # A (4 x in) + B (out x 4) per linear = 3712
ATTENTION = 12 * 2 * 4 * 8 * SEQ  # 6 products x 2 FLOPs x layers x heads x head dim x keys per query = 7680
HAND_COUNT = 6 * ADAPTER + 4 * FROZEN + ATTENTION  # 22272 + 73728 + 7680 = 103680


@pytest.fixture
def tiny_lora():
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))
    return model


def test_flops_per_position_matches_the_hand_count(tiny_lora):
    assert (FROZEN, ADAPTER, HAND_COUNT) == (18432, 3712, 103680)
    assert sum(p.numel() for p in tiny_lora.parameters() if p.requires_grad) == ADAPTER  # the hand count's premise
    assert flops.flops_per_position(tiny_lora, SEQ) == HAND_COUNT


def test_rank_argument_counts_an_adapter_on_every_block_linear_of_a_bare_model(tiny_lora):
    bare = build_tiny("llama")
    assert flops.flops_per_position(bare, SEQ, rank=4) == HAND_COUNT
    assert flops.flops_per_position(bare, SEQ) == 4 * FROZEN + ATTENTION  # no adapter: frozen matmuls only
    layers = flops.block_linears(tiny_lora)
    assert len(layers) == 14 and {layer.rank for layer in layers} == {4}  # lora_A/B are not counted as frozen


def test_step_matmuls_scale_with_batch_and_merge_equal_shapes(tiny_lora):
    one, three = flops.step_matmuls(tiny_lora, 1, SEQ), flops.step_matmuls(tiny_lora, 3, SEQ)
    assert sum(m.flops for m in three) == 3 * sum(m.flops for m in one)
    assert len({(m.what, m.m, m.k, m.n, m.batch) for m in one}) == len(one)
    head = [m for m in one if m.what == "head forward"]
    assert [(m.m, m.k, m.n, m.count) for m in head] == [(SEQ, 32, 96, 1)]


def test_step_throughput_reports_flops_per_second_and_mfu_only_against_a_known_gpu_peak(tiny_lora, monkeypatch):
    row = flops.step_throughput(tiny_lora, [(2, SEQ), (1, SEQ)], seconds=0.5, device=torch.device("cpu"))
    assert row == {"model_flops_per_s": round(3 * SEQ * HAND_COUNT / 0.5), "mfu": None}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    row = flops.step_throughput(tiny_lora, [(3, SEQ)], seconds=2e-8, device=torch.device("cuda"))
    assert row["mfu"] == pytest.approx(3 * SEQ * HAND_COUNT / 2e-8 / 312e12, abs=1e-4)  # 0.4985 of the A100 peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.step_throughput(tiny_lora, [(3, SEQ)], 0.5, torch.device("cuda"))["mfu"] is None
