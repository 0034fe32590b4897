"""Gradient accumulation normalises by the target tokens of the whole step, not per micro-batch."""

from __future__ import annotations

import torch
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit import distributed
from lorafit.data import TokenizedExample
from lorafit.train.batches import fixed_batches
from lorafit.train.sft import train_step


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_four_micro_batches_of_one_equal_one_batch_of_four():
    torch.manual_seed(0)
    lengths = [3, 9, 5, 14]  # different lengths and target counts: a per-micro-batch mean would weight them wrongly
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 90, (n,)).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        rows.append(TokenizedExample(ids, labels, False, f"row{i}"))
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    model.train()
    device = torch.device("cpu")

    wrapped = distributed.wrap(model, "ddp")  # one process: a plain Runner, as the trainer runs it
    loss_one, tokens_one = train_step(wrapped, fixed_batches(rows, 4, pad_token_id=0), device, use_bf16=False)
    one_batch = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc, tokens_acc = train_step(wrapped, fixed_batches(rows, 1, pad_token_id=0), device, use_bf16=False)
    accumulated = _grads(model)

    assert tokens_one == tokens_acc == sum(lengths)
    assert abs(loss_one - loss_acc) < 1e-6
    for name, grad in one_batch.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7)
    # and the naive alternative (mean per micro-batch, then averaged) really differs: the test has teeth
    model.zero_grad(set_to_none=True)
    for batch in fixed_batches(rows, 1, pad_token_id=0):
        from lorafit.train.loss import target_loss_sum
        (target_loss_sum(model, batch.tensors) / batch.targets / 4).backward()
    naive = _grads(model)
    assert max((naive[n] - g).abs().max().item() for n, g in one_batch.items()) > 1e-4
