"""DPO / IPO maths: the formulas by hand, the loss and adapter gradients of a hand-made batch against an fp64
computation from full logits, the reference policy at step 0, padding invariance and precomputed references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import build_tiny, randomize_adapters

import lorafit
import lorafit.train.loss as loss_module
from lorafit.data.preferences import PreferencePair, collate_pairs, split_pairs
from lorafit.distributed import Runner
from lorafit.run_config import DPOConfig, RunConfig
from lorafit.train.dpo_loss import (
    METRICS,
    backward_micro_batch,
    dpo_loss,
    evaluate_pairs,
    pair_losses,
    precompute_reference,
    reference_logps,
    sequence_logps,
)
from lorafit.train.reference import reference_start

PAD = 0
# Hand-made pairs (prompt, chosen, rejected) of unequal lengths, token ids < the tiny models' vocabulary (96).
PAIRS = [
    PreferencePair("p0", [5, 9, 13, 2], [11, 12, 40], [20]),
    PreferencePair("p1", [7, 3], [30, 31], [44, 45, 46, 47, 48]),
    PreferencePair("p2", [8, 8, 8, 1, 60, 61], [70], [71, 72]),
    PreferencePair("p3", [17, 18, 19], [21, 22, 23, 24], [25, 26]),
]
LN2 = math.log(2)


def _config(loss: str) -> DPOConfig:
    return DPOConfig(beta=0.5, loss=loss, label_smoothing=0.1 if loss == "sigmoid" else 0.0)


def _fp64_sequence_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed log-probs of `completion` after `prompt`, from the full fp64 logits of the unpadded sequence."""
    logits = model(torch.tensor([prompt + completion])).logits[0]  # (L, V) fp64
    positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # those that predict the completion
    return torch.log_softmax(logits[positions], dim=-1).gather(1, torch.tensor(completion)[:, None]).sum()


def _fp64_loss(policy: torch.nn.Module, reference: torch.nn.Module, d: DPOConfig) -> torch.Tensor:
    """The step's loss written out pair by pair in fp64: mean over pairs of the DPO (cDPO) or IPO formula."""
    total = torch.zeros((), dtype=torch.float64)
    for pair in PAIRS:
        pc = _fp64_sequence_logp(policy, pair.prompt_ids, pair.chosen_ids)
        pr = _fp64_sequence_logp(policy, pair.prompt_ids, pair.rejected_ids)
        with torch.no_grad():
            rc = _fp64_sequence_logp(reference, pair.prompt_ids, pair.chosen_ids)
            rr = _fp64_sequence_logp(reference, pair.prompt_ids, pair.rejected_ids)
        if d.loss == "sigmoid":
            z = d.beta * ((pc - rc) - (pr - rr))
            eps = d.label_smoothing
            total = total - (1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
        else:
            delta = (pc - rc) / len(pair.chosen_ids) - (pr - rr) / len(pair.rejected_ids)
            total = total + (delta - 1 / (2 * d.beta)) ** 2
    return total / len(PAIRS)


def _adapted(arch: str = "llama", **adapter) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base, the base with a LoRA adapter attached, dropout 0)."""
    base = build_tiny(arch)
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=4, alpha=8, dropout=0.0, **adapter))
    return base, model


def test_formulas_by_hand():
    pc, pr = torch.tensor([-3.0, -2.0], dtype=torch.float64), torch.tensor([-4.0, -1.0], dtype=torch.float64)
    rc, rr = torch.tensor([-3.5, -2.5], dtype=torch.float64), torch.tensor([-3.0, -1.5], dtype=torch.float64)
    beta, eps = 0.2, 0.25
    losses, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    deltas = [(-3.0 + 3.5) - (-4.0 + 3.0), (-2.0 + 2.5) - (-1.0 + 1.5)]  # 1.5, 0.0

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = [-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x) for x in deltas]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert losses[1].item() == pytest.approx(LN2, rel=1e-12)  # delta 0: ln 2 whatever the smoothing
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.1, 0.1], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-0.2, 0.1], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # a tie is not a win
    assert metrics["logps/chosen"].tolist() == [-3.0, -2.0] and metrics["logps/rejected"].tolist() == [-4.0, -1.0]
    assert set(metrics) == set(METRICS)

    n_c, n_r = torch.tensor([2, 5]), torch.tensor([4, 1])
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_tokens=n_c, rejected_tokens=n_r)
    averaged = [0.5 / 2 - (-1.0) / 4, 0.5 / 5 - 0.5 / 1]  # each log-ratio over its own reply's tokens
    torch.testing.assert_close(ipo, torch.tensor([(x - 1 / (2 * beta)) ** 2 for x in averaged],
                                                 dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    with pytest.raises(ValueError, match="'hinge'"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")


@pytest.mark.parametrize("plain_head", [True, False], ids=["head-at-targets", "full-logits"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_logps_match_fp64_full_logits(arch, plain_head, monkeypatch):
    if not plain_head:
        monkeypatch.setattr(loss_module, "has_plain_head", lambda model: False)
    _, model = _adapted(arch)
    randomize_adapters(model)
    model64 = copy.deepcopy(model).double()
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch)
        expected = [_fp64_sequence_logp(model64, p.prompt_ids, p.chosen_ids) for p in PAIRS]
        expected += [_fp64_sequence_logp(model64, p.prompt_ids, p.rejected_ids) for p in PAIRS]
    # rows: chosen of every pair, then rejected of every pair
    assert counts.tolist() == [len(p.chosen_ids) for p in PAIRS] + [len(p.rejected_ids) for p in PAIRS]
    # fp32 through two tiny blocks against fp64, summed over up to 5 tokens: ~1e-6 relative
    torch.testing.assert_close(logps.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("micro", [4, 2, 1])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_and_gradients_match_fp64_formula(arch, micro, loss):
    d = _config(loss)
    base, model = _adapted(arch)
    randomize_adapters(model)  # policy != reference: log-ratios, loss and gradients are not trivial
    model64, base64 = copy.deepcopy(model).double(), copy.deepcopy(base).double()

    sums = dict.fromkeys(("loss", *METRICS), 0.0)
    for start in range(0, len(PAIRS), micro):
        batch = collate_pairs(PAIRS[start : start + micro], PAD)
        for key, value in backward_micro_batch(Runner(model), batch, None, d, scale=1 / len(PAIRS)).items():
            sums[key] += value

    expected = _fp64_loss(model64, base64, d)
    expected.backward()
    # fp32 vs fp64 through two tiny blocks: ~1e-6 relative per log-prob
    assert sums["loss"] / len(PAIRS) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    grads32 = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads64 = {n: p.grad for n, p in model64.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in grads64) and any(".lora_B." in n for n in grads64)
    scale = max(g.abs().max().item() for g in grads64.values())
    assert scale > 1e-3
    for name, g64 in grads64.items():
        torch.testing.assert_close(grads32[name].double(), g64, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _step0(model: torch.nn.Module, reference, d: DPOConfig = DPOConfig()) -> dict[str, torch.Tensor]:
    losses, metrics = pair_losses(model, collate_pairs(PAIRS, PAD), reference, d)
    return {"loss": losses, **metrics}


def _assert_step0(values: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(values["loss"], torch.full((len(PAIRS),), LN2), rtol=0, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert values[key].abs().max() < 1e-6, key
    assert values["logps/chosen"].max() < 0


def _config_for(**fields) -> RunConfig:
    adapter = fields.pop("adapter", lorafit.AdapterConfig())
    return RunConfig(model="tiny", adapter=adapter, **fields)


def test_step0_fresh_adapter_reference_is_the_adapter_switched_off():
    base, model = _adapted()
    reference = reference_start(model, _config_for())
    assert reference is None
    values = _step0(model, reference)
    _assert_step0(values)
    # B = 0 adds an exact zero: policy and reference agree to the bit, so no pair counts as ranked right (TRL: 0)
    assert values["rewards/margins"].abs().max() == 0 and values["rewards/accuracies"].sum() == 0
    randomize_adapters(model)  # training moved the adapter: the reference is still the base model
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        # sequence log-probs of size ~13 in fp32 (ulp 1e-6): a few ulps where the two forwards round differently
        torch.testing.assert_close(reference_logps(model, batch, reference), sequence_logps(base, batch)[0],
                                   rtol=1e-6, atol=1e-6)
        assert (sequence_logps(model, batch)[0] - sequence_logps(base, batch)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_step0_pissa_reference_is_the_original_model(init):
    """PiSSA moves W0's principal part into A, B; switched off, its layers add it back: the original model."""
    base, model = _adapted(init=init)
    adapter = lorafit.AdapterConfig(r=4, alpha=8, dropout=0.0, init=init)
    reference = reference_start(model, _config_for(adapter=adapter))
    _assert_step0(_step0(model, reference))
    randomize_adapters(model)
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        torch.testing.assert_close(reference_logps(model, batch, reference), sequence_logps(base, batch)[0],
                                   rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["init_adapter", "bias", "loftq"])
def test_step0_reference_is_the_starting_adapter_swapped_in(kind):
    """From a saved adapter, trained biases or LoftQ the start is not the adapter switched off: the starting
    weights are swapped in, and after training moved them the reference is still the start."""
    if kind == "loftq":
        adapter = lorafit.AdapterConfig(r=4, alpha=8, dropout=0.0, init="loftq")
        base, model = _adapted(init="loftq")
        config = _config_for(adapter=adapter, quantize="nf4")
    elif kind == "bias":
        adapter = lorafit.AdapterConfig(r=4, alpha=8, dropout=0.0, bias="all")
        base, model = _adapted("qwen2", bias="all")
        randomize_adapters(model)  # the biases moved too: the adapter switched off would keep them
        config = _config_for(adapter=adapter)
    else:
        base, model = _adapted()
        randomize_adapters(model)  # as loaded from the saved adapter
        config = _config_for(init_adapter="saved_adapter")
    reference = reference_start(model, config)
    assert reference is not None
    at_start = copy.deepcopy(model)
    _assert_step0(_step0(model, reference))
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        switched_off = reference_logps(model, batch, None)
        assert (switched_off - sequence_logps(model, batch)[0]).abs().max() > 1e-4  # the base is not the start
    randomize_adapters(model, seed=4)  # training moved the adapter
    moved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(reference_logps(model, batch, reference), sequence_logps(at_start, batch)[0],
                                   rtol=0, atol=1e-6)
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters() if p.requires_grad)  # swapped back


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_pair_does_not_change_when_batched_with_a_longer_pair(arch):
    _, model = _adapted(arch)
    randomize_adapters(model)
    short = PAIRS[2]
    longer = PreferencePair("long", list(range(30, 50)), list(range(50, 62)), list(range(62, 80)))
    with torch.no_grad():
        alone = sequence_logps(model, collate_pairs([short], PAD))[0]
        together = sequence_logps(model, collate_pairs([longer, short], PAD))[0]
    chosen, rejected = split_pairs(together)
    torch.testing.assert_close(torch.stack([chosen[1], rejected[1]]), alone, rtol=0, atol=1e-5)


def test_precomputed_reference_gives_the_same_step():
    _, model = _adapted()
    randomize_adapters(model)
    d = _config("sigmoid")
    pairs = precompute_reference(model, PAIRS, None, PAD, batch_size=3)
    assert [p.source for p in pairs] == [p.source for p in PAIRS]
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        chosen, rejected = split_pairs(reference_logps(model, batch, None))
    assert [p.ref_chosen_logp for p in pairs] == pytest.approx(chosen.tolist(), abs=1e-6)
    assert [p.ref_rejected_logp for p in pairs] == pytest.approx(rejected.tolist(), abs=1e-6)
    on_the_fly = backward_micro_batch(Runner(model), batch, None, d, scale=1 / 4)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    precomputed = backward_micro_batch(Runner(model), collate_pairs(pairs, PAD), None, d, scale=1 / 4)
    assert precomputed == pytest.approx(on_the_fly, abs=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_evaluate_pairs_means_and_accuracy():
    _, model = _adapted()
    randomize_adapters(model)
    d = _config("sigmoid")
    result = evaluate_pairs(Runner(model), PAIRS, None, d, PAD, batch_size=3)
    with torch.no_grad():
        losses, metrics = pair_losses(model, collate_pairs(PAIRS, PAD), None, d)
    assert result["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    for key in METRICS:
        assert result[key] == pytest.approx(metrics[key].mean().item(), abs=1e-6), key
    p = result["rewards/accuracies"]
    assert result["rewards/accuracies_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(PAIRS) - 1)))
    assert model.training is False  # attach left the tiny model in eval mode; evaluate_pairs restores it
