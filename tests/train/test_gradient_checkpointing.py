"""Gradient checkpointing recomputes blocks in backward: same loss and gradients, dropout masks included."""

from __future__ import annotations

import torch
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit import distributed
from lorafit.data import TokenizedExample
from lorafit.train.batches import fixed_batches
from lorafit.train.sft import train_step


def _step(checkpointing: bool):
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, dropout=0.2))
    randomize_adapters(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = [TokenizedExample(list(range(5, 17)), [-100] * 4 + list(range(9, 17)), False, "a")]
    torch.manual_seed(11)
    wrapped = distributed.wrap(model, "ddp")  # one process: a plain Runner, as the trainer runs it
    loss, _ = train_step(wrapped, fixed_batches(rows, 1, pad_token_id=0), torch.device("cpu"), use_bf16=False)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_gives_the_same_gradients():
    loss_plain, grads_plain = _step(False)
    loss_ckpt, grads_ckpt = _step(True)
    assert loss_plain == loss_ckpt
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)
