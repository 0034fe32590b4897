"""The target-only chunked loss against fp64 cross-entropy and against transformers' own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit.data import Pack, TokenizedExample, collate
from lorafit.train import loss as loss_mod
from lorafit.train.loss import head_cross_entropy, target_loss_sum


def test_head_cross_entropy_value_and_gradient_match_fp64(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (20,))
    got = head_cross_entropy(hidden, weight, targets)
    got.backward(torch.tensor(0.5))

    h64 = hidden.detach().double().requires_grad_(True)
    ref = F.cross_entropy(h64 @ weight.double().t(), targets, reduction="sum")
    (ref * 0.5).backward()
    # fp32 logits of size ~5 summed over 20 rows: relative 1e-6 of the total is rounding
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


def test_head_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen"):
        head_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


def _hf_loss_sum(model, input_ids, labels, **kwargs):
    """transformers' stock path: full logits, shift by one, mean over labelled tokens; turned into a sum."""
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.double()
    shifted_logits, shifted = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_loss_equals_stock_loss_on_a_padded_batch(arch):
    model = build_tiny(arch)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    rows = [TokenizedExample([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9], False, "a"),
            TokenizedExample([10, 11, 12], [-100, 11, 12], False, "b")]
    batch = collate(rows, pad_token_id=0)
    got = target_loss_sum(model, batch)
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    ref = _hf_loss_sum(model, batch["input_ids"], labels, attention_mask=batch["attention_mask"])
    assert torch.isclose(got.double(), ref, rtol=1e-5)


def test_packed_loss_equals_the_sum_of_separate_losses():
    model = build_tiny("llama")
    a = TokenizedExample([5, 6, 7, 8], [-100, 6, 7, 8], False, "a")
    b = TokenizedExample([9, 10, 11], [-100, -100, 11], False, "b")
    pack = Pack(input_ids=a.input_ids + b.input_ids, labels=a.labels + b.labels,
                position_ids=[0, 1, 2, 3, 0, 1, 2], seq_lengths=[4, 3])
    packed = target_loss_sum(model, collate([pack], pad_token_id=0))
    separate = sum(target_loss_sum(model, collate([x], pad_token_id=0)) for x in (a, b))
    assert torch.isclose(packed, separate, rtol=1e-5)


def test_fallback_path_for_models_with_special_heads(monkeypatch):
    model = build_tiny("llama")
    batch = collate([TokenizedExample([5, 6, 7, 8], [-100, 6, 7, 8], False, "a")], pad_token_id=0)
    fast = target_loss_sum(model, batch)
    monkeypatch.setattr(loss_mod, "has_plain_head", lambda m: False)
    assert torch.isclose(target_loss_sum(model, batch), fast, rtol=1e-5)
