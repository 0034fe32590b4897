"""training.compile: every decoder block compiled in place (same outputs, same parameter names), or a warning
naming the reason and an eager model when no compiler works."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny

import lorafit
from lorafit.train import compile as compile_module


@pytest.mark.parametrize(("arch", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_decoder_blocks_are_found_by_the_configs_layer_count(arch, path):
    model = build_tiny(arch)
    assert compile_module.decoder_blocks(model) is model.get_submodule(path)


def test_without_a_working_compiler_it_warns_with_the_reason_and_stays_eager(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = build_tiny("llama")
    with pytest.warns(UserWarning, match=r"running eager.*RuntimeError: Compiler: cc is not found\)"):
        assert compile_module.compile_blocks(model) is False
    assert all(block._compiled_call_impl is None for block in model.model.layers)


def test_a_model_without_a_block_list_warns():
    with pytest.warns(UserWarning, match="no list of decoder blocks"):
        assert compile_module.compile_blocks(torch.nn.Linear(2, 2)) is False


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on a CPU
def test_compiled_blocks_give_the_eager_loss_and_gradients_with_the_same_names(input_ids):
    eager = build_tiny("llama")
    lorafit.attach(eager, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))
    compiled = build_tiny("llama")
    lorafit.attach(compiled, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))
    compiled.load_state_dict(eager.state_dict())
    assert compile_module.compile_blocks(compiled) is True
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    losses = [model(input_ids=input_ids, labels=input_ids).loss for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)  # fp32; fusion reorders sums
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
