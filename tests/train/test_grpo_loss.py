"""GRPO maths: advantages, the per-token objective, and the loss + gradient of a hand-made batch against fp64."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny_models import build_tiny, randomize_adapters, tiny_chat_tokenizer

import lorafit
from lorafit.distributed import Runner
from lorafit.run_config import GRPOConfig
from lorafit.train.grpo import (
    Prompt,
    Samples,
    completion_logprobs,
    group_advantages,
    grpo_token_loss,
    reference_logprobs,
    sequence_batch,
    update_step,
)
from lorafit.train.reference import start_weights

PROMPTS = [[5, 9, 13, 2], [7, 3]]
COMPLETIONS = [[11, 12, 40], [20], [30, 31], [44, 45, 46, 47]]  # G = 2: two per prompt, consecutive
ADVANTAGES = [0.7, -0.7, -1.2, 0.9]
# logp_old - logp per token (10 tokens): ratios exp(-delta) fall on both sides of the clip range [0.8, 1.2]
# and inside it, each at least 0.03 away from a boundary so fp32 and fp64 take the same branch.
DELTAS = [0.4, -0.05, 0.3, -0.4, 0.4, -0.35, 0.02, 0.5, -0.3, 0.0]
CONFIG = GRPOConfig(num_generations=2, temperature=0.7, beta=0.3, epsilon=0.2)


def test_group_advantages_match_numpy():
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0]
    groups = np.array(rewards).reshape(2, 4)
    centred = groups - groups.mean(axis=1, keepdims=True)
    expected = centred / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)  # TRL: Bessel-corrected std + 1e-4
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale=True)
    np.testing.assert_allclose(got.numpy(), expected.reshape(-1), rtol=1e-12)
    assert got[4:].abs().max() == 0  # a group whose rewards are all equal teaches nothing
    unscaled = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale=False)
    np.testing.assert_allclose(unscaled.numpy(), centred.reshape(-1), rtol=1e-12)


def test_token_loss_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.3], dtype=torch.float64)
    old = logp - torch.tensor([0.5, -0.5, -0.1, 0.0], dtype=torch.float64)  # ratio e^0.5, e^-0.5, e^-0.1, 1
    ref = torch.tensor([-1.3, -2.0, -0.2, -0.3], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0], dtype=torch.float64)
    loss, kl, clipped = grpo_token_loss(logp, old, ref, adv, epsilon=0.2, beta=0.1)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(-0.1), 1.0]
    surrogate = [-min(r[0] * 1.0, 1.2 * 1.0),  # A > 0, ratio above 1.2: clipped at 1.2
                 -min(r[1] * -2.0, 0.8 * -2.0),  # A < 0, ratio below 0.8: clipped at 0.8
                 -min(r[2] * 0.5, r[2] * 0.5),  # inside the range
                 1.0]
    d = [-0.3, 0.0, 0.3, 0.0]  # ref - logp
    k3 = [math.exp(x) - x - 1 for x in d]
    np.testing.assert_allclose(kl.numpy(), k3, rtol=1e-12)
    np.testing.assert_allclose(loss.numpy(), [s + 0.1 * k for s, k in zip(surrogate, k3)], rtol=1e-12)
    assert clipped.tolist() == [True, True, False, False]
    no_ref_loss, no_kl, _ = grpo_token_loss(logp, old, None, adv, epsilon=0.2, beta=0.1)
    assert no_kl is None
    np.testing.assert_allclose(no_ref_loss.numpy(), surrogate, rtol=1e-12)


def _samples() -> Samples:
    prompts = [Prompt(source=f"p{i}", ids=ids, text="", fields={}) for i, ids in enumerate(PROMPTS)]
    repeated = [p for p in prompts for _ in range(CONFIG.num_generations)]
    return Samples(repeated, COMPLETIONS, [""] * 4, {}, torch.zeros(4))


def _fp64_loss(policy: torch.nn.Module, base: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """The objective written out sequence by sequence on unpadded inputs, in fp64: (mean loss, clipped tokens)."""
    total, clipped, deltas = 0.0, 0, iter(DELTAS)
    for i, completion in enumerate(COMPLETIONS):
        prompt = PROMPTS[i // CONFIG.num_generations]
        ids = torch.tensor([prompt + completion])
        positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # those that predict the completion
        target = torch.tensor(completion)[:, None]
        logp = torch.log_softmax(policy(ids).logits[0, positions] / CONFIG.temperature, -1).gather(1, target)[:, 0]
        with torch.no_grad():
            ref = torch.log_softmax(base(ids).logits[0, positions] / CONFIG.temperature, -1).gather(1, target)[:, 0]
        for t in range(len(completion)):
            a = ADVANTAGES[i]
            ratio = torch.exp(-torch.tensor(next(deltas), dtype=torch.float64))  # exp(logp - logp_old) at this point
            ratio = ratio * torch.exp(logp[t] - logp[t].detach())  # same value, carries the gradient of logp
            low, high = 1 - CONFIG.epsilon, 1 + CONFIG.epsilon
            surrogate = torch.minimum(ratio * a, ratio.clamp(low, high) * a)
            clipped += int((a > 0 and ratio.item() > high) or (a < 0 and ratio.item() < low))
            d = ref[t] - logp[t]
            total = total - surrogate + CONFIG.beta * (torch.exp(d) - d - 1)
    return total / sum(map(len, COMPLETIONS)), clipped


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("micro", [4, 2, 1])
def test_loss_and_gradient_match_fp64_formula(arch, micro):
    base = build_tiny(arch)
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)  # policy != reference: the KL term and its gradient are not zero
    model64, base64 = copy.deepcopy(model).double(), copy.deepcopy(base).double()

    samples, advantages = _samples(), torch.tensor(ADVANTAGES)
    batches = [sequence_batch(samples, advantages, i, i + micro, 0, torch.device("cpu")) for i in range(0, 4, micro)]
    refs = [reference_logprobs(model, b, CONFIG.temperature) for b in batches]
    deltas = torch.tensor(DELTAS).split([len(b["advantages"]) for b in batches])
    olds = [completion_logprobs(model, b, CONFIG.temperature).detach() + d for b, d in zip(batches, deltas)]
    stats = update_step(Runner(model), batches, olds, refs, CONFIG, use_bf16=False)

    expected, clipped = _fp64_loss(model64, base64)
    expected.backward()
    assert 0 < clipped < len(DELTAS)  # both branches of the min are exercised
    assert stats["clip_fraction"] == pytest.approx(clipped / len(DELTAS), abs=1e-12)
    # fp32 through two tiny blocks against fp64: rounding ~1e-7 relative per op, ~1e-6 after the network
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    grads32 = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads64 = {n: p.grad for n, p in model64.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in grads64.values())
    assert scale > 1e-3
    for name, g64 in grads64.items():
        torch.testing.assert_close(grads32[name].double(), g64, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_reference_is_the_base_model_and_the_adapter_comes_back():
    base = build_tiny("llama")
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    batch = sequence_batch(_samples(), torch.tensor(ADVANTAGES), 0, 4, 0, torch.device("cpu"))
    with torch.no_grad():
        ref = reference_logprobs(model, batch, 0.7)
        plain = completion_logprobs(base, batch, 0.7)
        policy = completion_logprobs(model, batch, 0.7)
    torch.testing.assert_close(ref, plain, rtol=0, atol=1e-6)  # same weights, the adapter branch skipped
    assert (policy - plain).abs().max() > 1e-3  # and switched back on afterwards


def test_reference_from_a_saved_adapter_is_its_starting_weights():
    """Training on from a saved adapter, the reference is that adapter as it started, not the base model."""
    model = lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model, seed=3)
    at_start = copy.deepcopy(model)
    start = start_weights(model)
    randomize_adapters(model, seed=4)  # training has moved the adapter
    moved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = sequence_batch(_samples(), torch.tensor(ADVANTAGES), 0, 4, 0, torch.device("cpu"))
    ref = reference_logprobs(model, batch, 0.7, start=start)
    with torch.no_grad():
        torch.testing.assert_close(ref, completion_logprobs(at_start, batch, 0.7), rtol=0, atol=1e-6)
        assert (completion_logprobs(model, batch, 0.7) - ref).abs().max() > 1e-3
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters() if p.requires_grad)  # swapped back
    assert set(start) == set(moved) and sum(t.numel() for t in start.values()) < 0.2 * sum(
        p.numel() for p in model.parameters())  # the copy is adapter-sized


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_of_training_layout_match_the_sampling_pass(arch):
    """Right-padded training rows give the log-probs the left-padded, KV-cached sampler drew from."""
    torch.manual_seed(0)
    model = lorafit.attach(build_tiny(arch), lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    prompts = [[5, 9, 13, 2, 8, 8], [7, 3]]
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = torch.tensor([[1] * 6, [0] * 4 + [1] * 2])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=True,
                         temperature=0.8, top_k=0, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    completions = out.sequences[:, 6:].tolist()
    logits = torch.stack(out.logits, dim=1) / 0.8  # (2, 5, V) as the sampler saw them
    sampled = torch.log_softmax(logits, -1).gather(2, out.sequences[:, 6:, None])[..., 0]
    prompt_objects = [Prompt(source="", ids=p, text="", fields={}) for p in prompts]
    samples = Samples(prompt_objects, completions, ["", ""], {}, torch.zeros(2))
    batch = sequence_batch(samples, torch.zeros(2), 0, 2, 0, torch.device("cpu"))
    with torch.no_grad():
        ours = completion_logprobs(model, batch, 0.8)
    torch.testing.assert_close(ours, sampled.reshape(-1), rtol=0, atol=2e-5)  # fp32, different kernels / masks


def test_sequence_batch_layout():
    tokenizer = tiny_chat_tokenizer()
    samples = _samples()
    batch = sequence_batch(samples, torch.tensor(ADVANTAGES), 0, 4, tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["input_ids"][0].tolist() == PROMPTS[0] + COMPLETIONS[0]
    assert batch["input_ids"][1].tolist()[:5] == PROMPTS[0] + COMPLETIONS[1]
    assert batch["attention_mask"].sum(1).tolist() == [7, 5, 4, 6]
    assert batch["targets"][batch["targets"] != -100].tolist() == [t for c in COMPLETIONS for t in c]
    assert batch["advantages"].tolist() == pytest.approx([0.7] * 3 + [-0.7] + [-1.2] * 2 + [0.9] * 4)


def _to_bnb_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear of the blocks becomes a bitsandbytes NF4 Linear4bit (the head stays as it is)."""
    bnb = pytest.importorskip("bitsandbytes")
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(module, name, layer.to(child.weight.device))  # .to() quantises
    return model


def test_a_4bit_base_is_its_own_reference():
    """With an NF4 base the reference is the same 4-bit weights with the adapter off: no float copy appears."""
    base = _to_bnb_4bit(build_tiny("llama"))
    batch = sequence_batch(_samples(), torch.tensor(ADVANTAGES), 0, 4, 0, torch.device("cpu"))
    with torch.no_grad():
        plain = completion_logprobs(base, batch, 0.7)
    model = lorafit.attach(base, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    ref = reference_logprobs(model, batch, 0.7)
    torch.testing.assert_close(ref, plain, rtol=0, atol=1e-6)
    stats = update_step(Runner(model), [batch], [None], [ref], CONFIG, use_bf16=False)
    assert stats["kl"] > 0 and {id(p) for p in model.parameters() if not p.requires_grad} == frozen
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    assert sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8) > 0  # still 4-bit codes
