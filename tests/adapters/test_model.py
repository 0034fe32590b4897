"""attach / report / merge / unmerge / merge_and_unload / detach / disable on whole models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit.adapters.model import lora_layers


def test_attached_model_starts_equal_to_base_and_only_adapters_train(tiny_pair, input_ids):
    model, base = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.1))
    model.train()
    torch.testing.assert_close(model.eval()(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    model(input_ids).logits.sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_parameter_report_counts(input_ids):
    model = build_tiny("llama")
    total_base = sum(p.numel() for p in model.parameters())
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    report = lorafit.parameter_report(model)
    # per block: q (32->32), k,v (32->16 each: 2 kv heads x 8), o (32->32), gate/up (32->48), down (48->32)
    per_block = 4 * (32 + 32) + 2 * 4 * (32 + 16) + 4 * (32 + 32) + 2 * 4 * (32 + 48) + 4 * (48 + 32)
    assert report.trainable == 2 * per_block
    assert report.total == total_base + report.trainable
    assert report.per_kind["q_proj"] == (2, 2 * 4 * 64)
    assert abs(report.percent - 100 * report.trainable / report.total) < 1e-9
    assert "trainable params: " in str(report) and "down_proj" in str(report)


def test_merge_unmerge_and_merge_and_unload_keep_logits(tiny_pair, input_ids):
    model, _ = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    before = model(input_ids).logits
    lorafit.merge(model)
    torch.testing.assert_close(model(input_ids).logits, before, rtol=0, atol=1e-5)
    lorafit.unmerge(model)
    torch.testing.assert_close(model(input_ids).logits, before, rtol=0, atol=1e-5)
    plain = lorafit.merge_and_unload(model)
    assert not lora_layers(plain) and lorafit.adapters.model.adapter_config(plain) is None
    torch.testing.assert_close(plain(input_ids).logits, before, rtol=0, atol=1e-5)


def test_detach_restores_the_base(tiny_pair, input_ids):
    model, base = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    lorafit.merge(model)
    lorafit.detach(model)
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_adapters_disabled_gives_the_base_model(tiny_pair, input_ids, merged):
    model, base = tiny_pair
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    adapted = model(input_ids).logits
    if merged:
        lorafit.merge(model)
    with lorafit.adapters_disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(input_ids).logits, adapted, rtol=0, atol=1e-5)


def test_attach_twice_is_an_error():
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig())
    with pytest.raises(lorafit.ConfigError, match="already"):
        lorafit.attach(model, lorafit.AdapterConfig())


def test_training_moves_the_loss_down():
    """A few Adam steps on a fixed batch lower the loss: gradients reach the adapters with the right sign."""
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=8, alpha=16, dropout=0.05))
    model.train()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.3, losses  # observed: 4.59 -> ~4.1


def test_scale_warning_for_tiny_scale():
    model = build_tiny("llama")
    with pytest.warns(lorafit.LorafitWarning, match=r"alpha/r = 16/64 = 0.25.*raise alpha.*use_rslora"):
        lorafit.attach(model, lorafit.AdapterConfig(r=64, alpha=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(r=16, alpha=32))


def test_deepcopy_of_attached_model_works():
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=2, alpha=4))
    clone = copy.deepcopy(model)
    assert len(lora_layers(clone)) == len(lora_layers(model))


def test_attach_keeps_the_models_train_or_eval_mode(input_ids):
    model = build_tiny("llama").eval()
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.5))
    assert all(not layer.training for layer in lora_layers(model).values())
    randomize_adapters(model)
    torch.testing.assert_close(model(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
