"""The target-only chunked head (loss and log-probs) against fp64 references and against transformers' own loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny, randomize_adapters, tiny_config
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.data import Pack, TokenizedExample, collate
from lorafit.device import head_chunk_rows
from lorafit.train import loss as loss_mod
from lorafit.train.loss import completion_logprobs, head_token_logprobs, target_loss_sum

ROWS = [TokenizedExample([5, 6, 7, 8, 9, 10, 11], [-100, -100, 7, 8, -100, 10, 11], False, "a"),
        TokenizedExample([12, 13, 14], [-100, 13, 14], False, "b")]
# the same targets as transformers labels (unshifted: labels[t] is predicted at t - 1), -100 where none
LABELS = torch.tensor([[-100, -100, 7, 8, -100, 10, 11], [-100, 13, 14, -100, -100, -100, -100]])


@pytest.fixture
def small_chunks(monkeypatch):
    """Three rows per chunk: every test batch spans several chunks, the last one partial."""
    monkeypatch.setattr(loss_mod, "head_chunk_rows", lambda vocab: 3)


def test_chunk_rows_hold_64_mib_of_fp32_logits():
    assert head_chunk_rows(49152) == 341 and head_chunk_rows(128256) == 130 and head_chunk_rows(2**40) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_token_logprobs_value_and_gradient_match_fp64(small_chunks, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (20,))
    upstream = torch.randn(20)  # any loss of the log-probs, e.g. GRPO's per-token weights
    got = head_token_logprobs(hidden, weight, targets, temperature)
    got.backward(upstream)

    h64 = hidden.detach().double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ weight.double().t() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)
    ref.backward(upstream.double())
    # fp32 logits of size ~6-9 (16 products of N(0,1) pairs, / 0.7): fp32 rounding 6e-8 relative per op,
    # a few ops deep, is < 1e-5 absolute on each log-prob and on each gradient entry of size ~5
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)


def test_no_gradient_is_formed_under_no_grad(monkeypatch):
    """Evaluation and reference log-probs (no_grad) hold one chunk of logits, not the (N, H) gradient as well."""
    from peak_memory import measure_peak_bytes

    monkeypatch.setattr(loss_mod, "head_chunk_rows", lambda vocab: 64)  # one chunk
    hidden, weight, targets = torch.randn(64, 256, requires_grad=True), torch.randn(50, 256), torch.arange(64) % 50
    chunk, direction = 64 * 50 * 4, 64 * 256 * 4  # 12.8 KB of logits, 65.5 KB of gradient
    with torch.no_grad():
        got, peak_no_grad = measure_peak_bytes(lambda: head_token_logprobs(hidden, weight, targets))
    _, peak_grad = measure_peak_bytes(lambda: head_token_logprobs(hidden, weight, targets))
    assert got.grad_fn is None
    assert peak_grad >= chunk + direction and peak_no_grad < chunk + direction // 2  # (rows,) vectors: ~1 KB
    ref = torch.log_softmax(hidden.detach().double() @ weight.double().t(), dim=-1).gather(1, targets[:, None])
    torch.testing.assert_close(got.double(), ref.squeeze(1), rtol=0, atol=1e-4)  # logits ~16: fp32 rounding 1e-6


def test_head_token_logprobs_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen"):
        head_token_logprobs(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


def _hf_loss_sum(model, input_ids, labels, **kwargs):
    """transformers' stock path: full logits, shift by one, ignore_index -100; the summed cross-entropy."""
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.double()
    shifted_logits, shifted = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _adapted(arch: str, tied: bool | None = None):
    """A tiny model with random adapters; tied=True/False sets whether the head shares the embedding weight."""
    if tied is None:
        model = build_tiny(arch)
    else:
        config = tiny_config(arch)
        config.tie_word_embeddings = tied
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8), warn_scale=False)
    randomize_adapters(model)
    return model


def _trained_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_target_loss_and_gradients_equal_the_fp64_stock_loss(small_chunks, arch, tied):
    """A padded batch with -100 inside and after the rows, several head chunks, tied or separate head weights."""
    torch.manual_seed(0)
    model = _adapted(arch) if arch == "gpt2" else _adapted(arch, tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    batch = collate(ROWS, pad_token_id=0)
    reference = copy.deepcopy(model).double()
    got = target_loss_sum(model, batch)
    got.backward()
    ref = _hf_loss_sum(reference, batch["input_ids"], LABELS, attention_mask=batch["attention_mask"])
    ref.backward()
    # fp32 through two tiny blocks against fp64: ~1e-7 relative per op, ~1e-6 after the network
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    ours, theirs = _trained_grads(model), _trained_grads(reference)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_trained_head_takes_the_stock_loss_with_its_gradient():
    model = _adapted("llama")
    model.get_output_embeddings().weight.requires_grad_(True)
    assert not loss_mod.has_plain_head(model)
    reference = copy.deepcopy(model).double()
    batch = collate(ROWS, pad_token_id=0)
    target_loss_sum(model, batch).backward()
    _hf_loss_sum(reference, batch["input_ids"], LABELS, attention_mask=batch["attention_mask"]).backward()
    head = "lm_head.weight"
    torch.testing.assert_close(_trained_grads(model)[head], _trained_grads(reference)[head], rtol=1e-4, atol=1e-6)


def _stock_path(monkeypatch):
    monkeypatch.setattr(loss_mod, "has_plain_head", lambda model: False)


def _fp64_logprobs(model, batch, temperature):
    """log softmax of the full fp64 logits / temperature at each target, (K,)."""
    where = batch["targets"] != -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logprobs = torch.log_softmax(logits[where].double() / temperature, dim=-1)
    return logprobs.gather(1, batch["targets"][where][:, None]).squeeze(1)


# loss: SFT's summed cross-entropy; logprobs: DPO/GRPO's per-token log-probs at temperature 0.8 under a random
# upstream gradient. Each takes (model, batch, bf16) and gives the values; the fp64 reference ignores bf16.
def _autocast_loss(model, batch, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return target_loss_sum(model, batch)


OBJECTIVES = {
    "loss": (_autocast_loss, lambda m, b, bf16: -_fp64_logprobs(m, b, 1.0).sum()),
    "logprobs": (lambda m, b, bf16: completion_logprobs(m, b, 0.8, bf16), lambda m, b, bf16: _fp64_logprobs(m, b, 0.8)),
}


def _value_and_grads(model, objective, batch, bf16: bool = False):
    model.zero_grad()
    values = objective(model, batch, bf16)
    weights = torch.randn(values.shape, generator=torch.Generator().manual_seed(1), dtype=values.dtype)
    (values * weights).sum().backward()
    return values.detach().double(), _trained_grads(model)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_chunked_head_is_as_close_to_fp64_as_the_stock_head(small_chunks, monkeypatch, objective):
    """fp32 and bf16 autocast: the chunked head against the fp64 stock computation, and no further from it than
    the stock head computed in the same precision."""
    ours_fn, reference_fn = OBJECTIVES[objective]
    model = _adapted("llama")
    batch = collate(ROWS, pad_token_id=0)
    ref, ref_grads = _value_and_grads(copy.deepcopy(model).double(), reference_fn, batch)

    def errors(bf16: bool) -> tuple[float, float]:
        values, grads = _value_and_grads(model, ours_fn, batch, bf16)
        grad_error = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in ref_grads)
        return (values - ref).abs().max().item(), grad_error

    chunked = {bf16: errors(bf16) for bf16 in (False, True)}
    _stock_path(monkeypatch)
    stock = {bf16: errors(bf16) for bf16 in (False, True)}
    # fp32 through two tiny blocks: ~1e-7 relative per op, < 1e-5 on values of size ~5-30 and on each gradient
    assert chunked[False][0] < 1e-5 * max(1.0, ref.abs().max().item()) and chunked[False][1] < 1e-5
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 = 2e-3 per op): a few 1e-3 from fp64 ...
    assert stock[True][0] < 0.02 * max(1.0, ref.abs().max().item()) and stock[True][1] < 0.05
    # ... and the chunked head rounds the same products: no further than the stock head (+ the fp32 floor). The
    # gradients' error comes mostly from the blocks' bf16 backward, whose rounding the head's changes: within 2x
    assert chunked[True][0] <= 1.5 * stock[True][0] + 1e-5 * ref.abs().max().item()
    assert chunked[True][1] <= 2 * stock[True][1] + 1e-5


def test_packed_loss_equals_the_sum_of_separate_losses():
    model = build_tiny("llama")
    a = TokenizedExample([5, 6, 7, 8], [-100, 6, 7, 8], False, "a")
    b = TokenizedExample([9, 10, 11], [-100, -100, 11], False, "b")
    pack = Pack(input_ids=a.input_ids + b.input_ids, labels=a.labels + b.labels,
                position_ids=[0, 1, 2, 3, 0, 1, 2], seq_lengths=[4, 3])
    packed = target_loss_sum(model, collate([pack], pad_token_id=0))
    separate = sum(target_loss_sum(model, collate([x], pad_token_id=0)) for x in (a, b))
    assert torch.isclose(packed, separate, rtol=1e-5)

