"""Forgetting check: how much an adapter changes the model away from its task, base vs tuned on general inputs.

Three measures on data shipped with lorafit (written for it, nothing downloaded), each comparing the tuned
model with its reference (by default the same model with its adapters switched off):

(a) mean per-token KL(base || tuned) on the base's own greedy answers to general prompts (facts, arithmetic,
    writing, code, advice, definitions, reasoning): the base answers once; one forward with and one without the
    adapter over prompt + answer; KL over the vocabulary at every answer position, averaged over answer tokens.
    Forgetting is predicted by this forward KL (Shenfeld et al., "RL's Razor", arXiv 2509.04259).
(b) perplexity ratio tuned / base on a short general English text (non-overlapping chunks of max_length tokens;
    log-perplexity increase on upstream text: Jin & Ren, arXiv 2406.14026).
(c) share of prompts whose greedy answer changed (tuned vs base, exact string compare after decoding).

Thresholds (a warning with advice when crossed): both correspond to about 0.1 nats per token.
- KL_HIGH = 0.1 nats/token: over a 30-token answer the base's own answer then loses about e^3 = 20x of its
  likelihood under the tuned model: a behaviour change, not noise (an untouched adapter gives exactly 0).
- PPL_RATIO_HIGH = 1.1: 10% higher perplexity = ln 1.1 = 0.095 nats/token more cross-entropy on general text.
(c) has no threshold: one flipped token changes the whole string, so it says how often, not how much.

Cost: two greedy generations (base, tuned) of the prompts, two forwards over prompt + answer, two forwards over the
text (1,639 SmolLM2 tokens). Measured on SmolLM2-135M with an r=16 all-linear adapter (the quickstart's shape) on
this project's 2 CPU cores shared with other jobs (load ~14): the defaults (14 prompts x 24 new tokens) took 224
CPU-seconds, 1127 s of wall time under that load (generation 75%, perplexity 17%, KL 8%); 8 prompts x 16 tokens
took 158 CPU-seconds. Generation grows with prompts x new tokens; the perplexity part is fixed.
tests/slow/test_forgetting_cost.py measures and prints it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.adapters.model import adapters_disabled, lora_layers
from lorafit.data.chat import build_prompt_ids
from lorafit.errors import UserError
from lorafit.evaluation.generate import generate_ids

KL_HIGH = 0.1  # nats per answer token
PPL_RATIO_HIGH = 1.1
DEFAULT_LIMIT = 14  # prompts: two of each of the 7 kinds (the order is round-robin over kinds)
DEFAULT_MAX_NEW_TOKENS = 24
DEFAULT_MAX_LENGTH = 512  # tokens per perplexity chunk
SHOWN_CHANGES = 3
PROMPTS_FILE = "general_prompts.jsonl"
TEXT_FILE = "general_text.txt"

Reference = Callable[[], AbstractContextManager[Any]]


def general_prompts(limit: int | None = None) -> list[str]:
    """The shipped general prompts, round-robin over their kinds (so the first `limit` cover every kind)."""
    if limit is not None and limit <= 0:
        raise UserError(f"limit={limit} must be positive (or None for all prompts)")
    rows = [json.loads(line) for line in _data_file(PROMPTS_FILE).splitlines() if line.strip()]
    by_kind: dict[str, list[str]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["prompt"])
    ordered = [prompts[i] for i in range(max(map(len, by_kind.values()))) for prompts in by_kind.values()
               if i < len(prompts)]
    return ordered[:limit] if limit else ordered


def general_text() -> str:
    """The shipped general English text (varied topics) for the perplexity ratio."""
    return _data_file(TEXT_FILE)


def token_kl(reference_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_tuned) = sum_v p_ref(v) (log p_ref(v) - log p_tuned(v)) per position, (..., V) -> (...),
    computed in fp32 or wider."""
    dtype = torch.promote_types(reference_logits.dtype, torch.float32)
    ref = F.log_softmax(reference_logits.to(dtype), dim=-1)
    tuned = F.log_softmax(tuned_logits.to(dtype), dim=-1)
    return (ref.exp() * (ref - tuned)).sum(-1)


@torch.no_grad()
def continuation_kl(model: Any, pairs: list[tuple[list[int], list[int]]], reference: Reference, *,
                    batch_size: int = 16) -> tuple[float, int]:
    """(mean KL(reference || model) per continuation token, number of tokens) over (prompt ids, continuation ids)
    pairs: one forward each way over prompt + continuation (right-padded), KL at the positions that predict the
    continuation tokens."""
    if not pairs or any(not continuation for _, continuation in pairs):
        raise ValueError("continuation_kl needs at least one pair, and a non-empty continuation in each")
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        ids, mask = _right_padded([prompt + continuation for prompt, continuation in batch], model.device)
        tuned = model(input_ids=ids, attention_mask=mask).logits
        with reference():
            base = model(input_ids=ids, attention_mask=mask).logits
        for row, (prompt, continuation) in enumerate(batch):
            positions = slice(len(prompt) - 1, len(prompt) + len(continuation) - 1)  # predict the continuation
            total += token_kl(base[row, positions], tuned[row, positions]).sum().item()
            count += len(continuation)
    return total / count, count


@torch.no_grad()
def text_nll(model: Any, ids: list[int], *, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens predicted) of `ids` cut into non-overlapping chunks of
    max_length tokens; each chunk predicts all its tokens but the first."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (a chunk predicts all tokens but its first)")
    total, count = 0.0, 0
    for start in range(0, len(ids), max_length):
        chunk = torch.tensor([ids[start:start + max_length]], device=model.device)
        if chunk.shape[1] < 2:
            continue
        logits = model(input_ids=chunk).logits[0, :-1]
        total += F.cross_entropy(logits.float(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    if count == 0:
        raise ValueError("the text is too short: it needs at least 2 tokens")
    return total, count


@torch.no_grad()
def forgetting_check(model: Any, tokenizer: Any, *, reference: Reference | None = None, limit: int = DEFAULT_LIMIT,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_length: int = DEFAULT_MAX_LENGTH,
                     batch_size: int = 16, prompts: list[str] | None = None, text: str | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Measures (a), (b), (c) of the module docstring for `model` against `reference` (a function returning a
    context in which the model computes as the reference; default: its adapters switched off, which is the base
    for a fresh adapter; a run that starts from a saved adapter passes a context that swaps in its start weights).

    prompts/text default to the shipped data (the first `limit` prompts). Returns plain data for summary.json:
    kl_per_token, kl_tokens, ppl_base, ppl_tuned, ppl_ratio, text_tokens, changed, changed_share, prompts,
    seconds, cpu_seconds, phases (wall seconds of generation, kl, perplexity), thresholds, warnings (strings with
    advice), changed_samples.
    """
    if reference is None:
        if not lora_layers(model):
            raise UserError("the model carries no adapter: pass reference=, a context in which it computes as "
                             "the model to compare with")
        reference = lambda: adapters_disabled(model)  # noqa: E731 - a fresh context each call
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be positive")
    clock, cpu = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}
    prompts = general_prompts(limit) if prompts is None else prompts[:limit]
    if not prompts:
        raise UserError("no prompts to compare on")
    was_training = model.training
    model.eval()
    try:
        prompt_ids = [build_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        options = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
        with reference():
            base_answers = generate_ids(model, tokenizer, prompt_ids, **options)
        tuned_answers = generate_ids(model, tokenizer, prompt_ids, **options)
        phases["generation_s"] = time.perf_counter() - clock
        pairs = [(p, a) for p, a in zip(prompt_ids, base_answers) if a]
        kl, kl_tokens = continuation_kl(model, pairs, reference, batch_size=batch_size)
        phases["kl_s"] = time.perf_counter() - clock - sum(phases.values())
        ids = tokenizer(general_text() if text is None else text)["input_ids"]
        nll_tuned, text_tokens = text_nll(model, ids, max_length=max_length)
        with reference():
            nll_base, _ = text_nll(model, ids, max_length=max_length)
        phases["perplexity_s"] = time.perf_counter() - clock - sum(phases.values())
    finally:
        model.train(was_training)
    base_texts, tuned_texts = ([tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
                               for answers in (base_answers, tuned_answers))
    changes = [(p, b, t) for p, b, t in zip(prompts, base_texts, tuned_texts) if b != t]
    result = {
        "kl_per_token": kl,
        "kl_tokens": kl_tokens,
        "ppl_base": math.exp(nll_base / text_tokens),
        "ppl_tuned": math.exp(nll_tuned / text_tokens),
        "ppl_ratio": math.exp((nll_tuned - nll_base) / text_tokens),
        "text_tokens": text_tokens,
        "changed": len(changes),
        "changed_share": len(changes) / len(prompts),
        "prompts": len(prompts),
        "seconds": time.perf_counter() - clock,
        "cpu_seconds": time.process_time() - cpu,  # all threads: the cost on a busy machine, where wall time lies
        "phases": phases,
        "thresholds": {"kl_per_token": KL_HIGH, "ppl_ratio": PPL_RATIO_HIGH},
        "changed_samples": [{"prompt": p, "base": b, "tuned": t} for p, b, t in changes[:SHOWN_CHANGES]],
    }
    result["warnings"] = forgetting_warnings(result)
    return result


def forgetting_warnings(result: dict[str, Any]) -> list[str]:
    """One line with advice per crossed threshold (empty: small drift)."""
    advice = ("lower training.lr or the number of steps/epochs, or mix general chat data into the training set "
              "(e.g. 10-20% of the rows)")
    warnings = []
    if result["kl_per_token"] > KL_HIGH:
        warnings.append(f"forgetting: mean token KL(base || tuned) on general prompts is {result['kl_per_token']:.3f} "
                        f"nats/token (> {KL_HIGH}): the adapter changes answers far from its task. Fix: {advice}.")
    if result["ppl_ratio"] > PPL_RATIO_HIGH:
        warnings.append(f"forgetting: perplexity on general text rose {result['ppl_ratio']:.3f}x "
                        f"({result['ppl_base']:.2f} -> {result['ppl_tuned']:.2f}; > {PPL_RATIO_HIGH}x). Fix: {advice}.")
    return warnings


def format_forgetting(result: dict[str, Any]) -> str:
    """A few lines for the console: the three figures, then any warnings."""
    lines = [f"forgetting check ({result['prompts']} general prompts, {result['text_tokens']} text tokens, "
             f"{result['seconds']:.0f}s):",
             f"  KL(base || tuned)  {result['kl_per_token']:.4f} nats/token over {result['kl_tokens']} answer tokens "
             f"(warn above {KL_HIGH})",
             f"  perplexity ratio   {result['ppl_ratio']:.4f} ({result['ppl_base']:.2f} -> {result['ppl_tuned']:.2f}; "
             f"warn above {PPL_RATIO_HIGH})",
             f"  changed answers    {result['changed']}/{result['prompts']} = {result['changed_share']:.1%}"]
    lines += [f"  {c['prompt']!r}: {c['base']!r} -> {c['tuned']!r}" for c in result["changed_samples"]]
    lines += [f"warning: {w}" for w in result["warnings"]] or ["  small drift: below both thresholds"]
    return "\n".join(lines)


def _right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (batch, longest); padding on the right never precedes a position we read."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _data_file(name: str) -> str:
    return resources.files("lorafit.evaluation").joinpath("data", name).read_text(encoding="utf-8")


__all__ = ["DEFAULT_LIMIT", "KL_HIGH", "PPL_RATIO_HIGH", "continuation_kl", "forgetting_check", "forgetting_warnings",
           "format_forgetting", "general_prompts", "general_text", "text_nll", "token_kl"]
