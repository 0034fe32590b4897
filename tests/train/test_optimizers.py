"""training.optimizer: torch AdamW or bitsandbytes' 8-bit AdamW; clear errors for a missing extra and paged on CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from lorafit.config import ConfigError
from lorafit.run_config import RunConfig, TrainingConfig, validate
from lorafit.train.optimizers import make_optimizer

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 128, generator=g)), torch.nn.Parameter(torch.randn(16, 16, generator=g))]


def step(optimizer: torch.optim.Optimizer, ps: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def test_each_name_builds_its_class_with_lr_and_weight_decay():
    adamw = make_optimizer("adamw", params(), 1e-3, 0.1, CPU)
    eight = make_optimizer("adamw_8bit", params(), 1e-3, 0.1, CPU)
    assert type(adamw) is torch.optim.AdamW and type(eight) is bnb.optim.AdamW8bit
    for optimizer in (adamw, eight):
        assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0.1


def test_8bit_state_is_8bit_and_tracks_adamw():
    """bnb keeps uint8 moments for the 8192-element tensor, fp32 for the 256-element one; the update stays near
    torch's AdamW (8-bit moments quantise the step, so 5 steps of lr 1e-3 differ by ~1e-4, not 1e-7)."""
    reference, ps = params(), params()
    adamw, eight = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.0), make_optimizer("adamw_8bit", ps, 1e-3, 0.0, CPU)
    for seed in range(5):
        step(adamw, reference, seed)
        step(eight, ps, seed)
    assert eight.state[ps[0]]["state1"].dtype == torch.uint8 and eight.state[ps[1]]["state1"].dtype == torch.float32
    assert (ps[0] - reference[0]).abs().max() < 1e-3  # vs a total movement of ~5e-3
    assert (ps[1] - reference[1]).abs().max() < 1e-6


def test_8bit_state_dict_resumes_exactly():
    """Saving after 3 steps and loading into a fresh optimizer gives the same next steps as not stopping."""
    ps, resumed_ps = params(), params()
    first = make_optimizer("adamw_8bit", ps, 1e-3, 0.0, CPU)
    for seed in range(3):
        step(first, ps, seed)
    with torch.no_grad():
        for mine, theirs in zip(resumed_ps, ps):
            mine.copy_(theirs)
    resumed = make_optimizer("adamw_8bit", resumed_ps, 1e-3, 0.0, CPU)
    resumed.load_state_dict(first.state_dict())
    for seed in (3, 4):
        step(first, ps, seed)
        step(resumed, resumed_ps, seed)
    assert all(torch.equal(a, b) for a, b in zip(ps, resumed_ps))


def test_paged_on_cpu_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="paged_adamw_8bit .* needs a CUDA GPU .* use adamw_8bit"):
        make_optimizer("paged_adamw_8bit", params(), 1e-3, 0.0, CPU)
    with pytest.raises(ConfigError, match="training.optimizer='lion': use one of adamw, adamw_8bit, paged_adamw_8bit"):
        make_optimizer("lion", params(), 1e-3, 0.0, CPU)
    config = RunConfig(model="m", data=RunConfig().data, training=TrainingConfig(optimizer="adam8"))
    config.data.train = "train.jsonl"
    with pytest.raises(ConfigError, match="training.optimizer='adam8'"):
        validate(config)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'lorafit\[bnb\]'"):
        make_optimizer("adamw_8bit", params(), 1e-3, 0.0, CPU)
