"""Forgetting check on a tiny model: zero drift with B = 0, KL and perplexity against fp64 computations."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_chat import tiny_chat_model, with_random_adapter

import lorafit
from lorafit.adapters.model import merge_and_unload
from lorafit.cli import main
from lorafit.evaluation.forgetting import (
    continuation_kl,
    forgetting_check,
    forgetting_warnings,
    general_prompts,
    general_text,
    text_nll,
)

PROMPTS = ["What is the capital of France?", "Tell me a joke about cats.", "Write a short poem about the sea."]
TEXT = "The quick brown fox jumps over the lazy dog. Hello! How can I help you today? " * 3


def test_untouched_adapter_shows_no_drift():
    model, tokenizer = tiny_chat_model()
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, target_modules="all-linear"))  # B = 0
    result = forgetting_check(model, tokenizer, prompts=PROMPTS, text=TEXT, max_new_tokens=6, max_length=16)
    assert result["kl_per_token"] == 0.0 and result["ppl_ratio"] == 1.0
    assert result["changed"] == 0 and result["changed_share"] == 0.0 and result["warnings"] == []
    assert result["prompts"] == 3 and result["kl_tokens"] > 0
    json.dumps(result)  # plain data for summary.json


def fp64_models(scale: float):
    """(base, tuned) as plain fp64 transformers models: the tuned one with its adapter merged."""
    base, _ = tiny_chat_model()
    tuned = merge_and_unload(with_random_adapter(copy.deepcopy(base), scale))
    return base.double(), tuned.double()


def test_continuation_kl_equals_fp64_computation():
    model, tokenizer = tiny_chat_model()
    with_random_adapter(model, scale=0.5)
    generator = torch.Generator().manual_seed(5)
    pairs = [(torch.randint(0, 400, (n,), generator=generator).tolist(),
              torch.randint(0, 400, (c,), generator=generator).tolist()) for n, c in ((7, 5), (3, 9), (11, 1))]
    kl, tokens = continuation_kl(model, pairs, lambda: lorafit.adapters_disabled(model), batch_size=2)
    base, tuned = fp64_models(scale=0.5)
    total = 0.0
    for prompt, continuation in pairs:  # one unpadded sequence at a time
        ids = torch.tensor([prompt + continuation])
        positions = slice(len(prompt) - 1, len(ids[0]) - 1)
        p_log = torch.log_softmax(base(ids).logits[0, positions], -1)
        q_log = torch.log_softmax(tuned(ids).logits[0, positions], -1)
        total += (p_log.exp() * (p_log - q_log)).sum().item()
    reference = total / 15
    print(f"KL fp32 {kl:.8f} vs fp64 {reference:.8f}")
    assert tokens == 15 and reference > 1e-3  # a perturbation that matters
    assert kl == pytest.approx(reference, rel=1e-4, abs=1e-7)


def test_perplexity_ratio_equals_fp64_computation():
    model, tokenizer = tiny_chat_model()
    with_random_adapter(model, scale=0.5)
    result = forgetting_check(model, tokenizer, prompts=PROMPTS, text=TEXT, max_new_tokens=4, max_length=16)
    ids = tokenizer(TEXT)["input_ids"]
    base, tuned = fp64_models(scale=0.5)
    nll = {}
    for name, m in (("base", base), ("tuned", tuned)):
        chunks = [torch.tensor([ids[i:i + 16]]) for i in range(0, len(ids), 16) if len(ids[i:i + 16]) > 1]
        nll[name] = sum(F.cross_entropy(m(c).logits[0, :-1], c[0, 1:], reduction="sum").item() for c in chunks)
        count = sum(c.shape[1] - 1 for c in chunks)
    assert result["text_tokens"] == count
    assert result["ppl_base"] == pytest.approx(math.exp(nll["base"] / count), rel=1e-5)
    assert result["ppl_ratio"] == pytest.approx(math.exp((nll["tuned"] - nll["base"]) / count), rel=1e-5)
    assert result["ppl_ratio"] != 1.0


def test_changed_answers_match_one_by_one_generation():
    model, tokenizer = tiny_chat_model()
    with_random_adapter(model, scale=1.0)
    result = forgetting_check(model, tokenizer, prompts=PROMPTS, text=TEXT, max_new_tokens=5)
    base, tuned = fp64_models(scale=1.0)
    changed = 0
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        answers = [tokenizer.decode(m.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:],
                                    skip_special_tokens=True).strip() for m in (base, tuned)]
        changed += answers[0] != answers[1]
    assert result["changed"] == changed and result["changed_share"] == changed / 3
    assert changed > 0  # the comparison is not trivially 0 == 0


def test_warnings_fire_above_the_thresholds_only():
    quiet = {"kl_per_token": 0.1, "ppl_ratio": 1.1, "ppl_base": 10.0, "ppl_tuned": 11.0}
    assert forgetting_warnings(quiet) == []
    loud = forgetting_warnings({**quiet, "kl_per_token": 0.2, "ppl_ratio": 1.2, "ppl_tuned": 12.0})
    assert len(loud) == 2 and all("lower training.lr" in w for w in loud)


def test_bad_inputs():
    model, tokenizer = tiny_chat_model()
    with pytest.raises(ValueError, match="carries no adapter"):
        forgetting_check(model, tokenizer, prompts=PROMPTS, text=TEXT)
    with_random_adapter(model, scale=0.1)
    with pytest.raises(ValueError, match="no prompts"):
        forgetting_check(model, tokenizer, prompts=[], text=TEXT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        forgetting_check(model, tokenizer, prompts=PROMPTS, text=TEXT, max_new_tokens=0)
    with pytest.raises(ValueError, match="limit"):
        general_prompts(0)
    with pytest.raises(ValueError, match="max_length"):
        text_nll(model, [1, 2, 3], max_length=1)
    with pytest.raises(ValueError, match="too short"):
        text_nll(model, [1], max_length=8)
    with pytest.raises(ValueError, match="non-empty continuation"):
        continuation_kl(model, [([1, 2], [])], lambda: lorafit.adapters_disabled(model))


def test_shipped_data():
    prompts = general_prompts()
    assert len(prompts) == 150 == len(set(prompts))
    assert all(0 < len(p) <= 120 for p in prompts)
    rows = [json.loads(line) for line in (general_prompts.__globals__["_data_file"]("general_prompts.jsonl")
                                          .splitlines())]
    kinds = {row["kind"] for row in rows}
    assert kinds == {"facts", "arithmetic", "writing", "code", "advice", "definitions", "reasoning"}
    first = {next(r["kind"] for r in rows if r["prompt"] == p) for p in general_prompts(7)}
    assert first == kinds  # round-robin: any limit >= 7 covers every kind
    assert 1000 <= len(general_text().split()) <= 2500


def test_cli_forgetting_json(tiny_folders, capsys):
    model_dir, adapter_dir = tiny_folders
    assert main(["forgetting", "--model", str(model_dir), "--adapter", str(adapter_dir), "--limit", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 3 and result["kl_per_token"] > 0
    assert main(["forgetting", "--model", str(model_dir), "--adapter", str(adapter_dir), "--limit", "0"]) == 2
    assert "limit=0" in capsys.readouterr().err
