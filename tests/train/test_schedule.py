"""Warmup then cosine / linear / constant, against the closed-form formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.train.schedule import lr_factor, make_scheduler


def test_warmup_is_linear_to_the_peak():
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("step", [4, 30, 52, 99])
def test_cosine_and_linear_decay(step):
    progress = (step - 4) / 96
    assert lr_factor(step, 100, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_factor(step, 100, 4, "linear") == pytest.approx(1 - progress)
    assert lr_factor(step, 100, 4, "constant") == 1.0


def test_scheduler_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2, kind="cosine")
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert seen[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
