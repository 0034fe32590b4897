"""Preference pairs for DPO: read rows, format them with the chat template, and batch chosen + rejected together.

A row is TRL's standard format `{"prompt": str, "chosen": str, "rejected": str}` or its conversational format,
where `prompt` is a list of messages (a system turn and earlier turns allowed, ending with the user's) and
`chosen` / `rejected` are each a list holding one assistant message. The prompt becomes the token ids up to the
template's generation prompt (build_prompt_ids); a completion is the tokens the full chat adds after them, up to and
including the end-of-turn token that closes the reply (the tokens SFT learns on an assistant turn), so the policy
is scored on stopping too.

Batches (collate_pairs) hold the 2B rows of B pairs in one padded batch: rows 0..B-1 are prompt + chosen of
pairs 0..B-1, rows B..2B-1 are prompt + rejected of the same pairs in the same order, so that row i and row B+i
are one pair. Targets are shifted as in SFT (data/collate.py): targets[r, t] is the completion token at t+1, and
-100 on prompt and pad positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.data.chat import IGNORE, ChatTemplateError, TokenizedExample, build_prompt_ids, tokenize_example
from lorafit.data.collate import collate
from lorafit.data.sources import Example, as_messages, fail, read_rows

FIELDS = ("prompt", "chosen", "rejected")
FORMAT = '{"prompt": "...", "chosen": "...", "rejected": "..."} (or each a list of messages)'


@dataclass(frozen=True)
class PreferencePair:
    """One pair's token ids; the reference log-probs are filled in by precompute_reference (else None)."""

    source: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    prompt_text: str = ""  # the prompt's last user message (what a behaviour measure sees as the prompt)


@dataclass
class PreferenceStats:
    """Counts for one file: pairs read and pairs whose chosen or rejected reply was cut to fit max_seq_len."""

    pairs: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        cut = f", {self.truncated} with a reply cut to fit data.max_seq_len" if self.truncated else ""
        return f"{self.pairs} preference pairs{cut}"


def read_preferences(path: str | Path, tokenizer: Any,
                     max_seq_len: int) -> tuple[list[PreferencePair], PreferenceStats]:
    """Every row of a .jsonl/.json/.csv file as a tokenized pair; a bad row raises DataError naming file:line."""
    pairs = [pair_from_row(row, source, tokenizer, max_seq_len) for source, row in read_rows(path)]
    if not pairs:
        fail(str(path), "the file holds no rows", f"add rows such as {FORMAT}")
    return pairs, PreferenceStats(pairs=len(pairs), truncated=sum(p.truncated for p in pairs))


def pair_from_row(row: object, source: str, tokenizer: Any, max_seq_len: int) -> PreferencePair:
    """Validate one row and tokenize it; replies are cut (keeping their start) so that prompt + reply fits."""
    prompt, chosen, rejected = preference_messages(row, source)
    prompt_ids = build_prompt_ids(tokenizer, prompt)
    if len(prompt_ids) >= max_seq_len:
        fail(source, f"the prompt has {len(prompt_ids)} tokens, leaving no room for a reply within "
                     f"data.max_seq_len={max_seq_len}", "shorten the prompt or raise data.max_seq_len")
    room = max_seq_len - len(prompt_ids)
    chosen_ids = completion_ids(tokenizer, prompt, prompt_ids, chosen, source)
    rejected_ids = completion_ids(tokenizer, prompt, prompt_ids, rejected, source)
    truncated = len(chosen_ids) > room or len(rejected_ids) > room
    return PreferencePair(source=source, prompt_ids=prompt_ids, chosen_ids=chosen_ids[:room],
                          rejected_ids=rejected_ids[:room], truncated=truncated, prompt_text=prompt[-1]["content"])


def preference_messages(row: object, source: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(prompt messages, chosen assistant message, rejected assistant message) of a checked row."""
    if not isinstance(row, dict):
        fail(source, f"the row is a {type(row).__name__}, not an object", f"write each row as {FORMAT}")
    missing = [key for key in FIELDS if key not in row]
    if missing:
        fix = ("give the shared prompt in 'prompt' and only the replies in 'chosen' and 'rejected'"
               if missing == ["prompt"] else f"write each row as {FORMAT}")
        fail(source, f"the row has no '{missing[0]}' field", fix)
    prompt = as_messages(row["prompt"], "user", source, "prompt")
    if prompt[-1]["role"] != "user":
        fail(source, f"the prompt ends with a {prompt[-1]['role']} message", "end the prompt with the user's message")
    chosen, rejected = (_reply(row[name], source, name) for name in ("chosen", "rejected"))
    if chosen["content"].strip() == rejected["content"].strip():
        fail(source, "'chosen' and 'rejected' are the same reply, so the pair teaches nothing",
             "give a different rejected reply or remove the row")
    return prompt, chosen, rejected


def completion_ids(tokenizer: Any, prompt: list[dict[str, Any]], prompt_ids: list[int], reply: dict[str, Any],
                   source: str) -> list[int]:
    """The tokens the rendered chat prompt + reply adds after `prompt_ids`, through the reply's end-of-turn token."""
    full = tokenize_example(tokenizer, Example(source=source, messages=[*prompt, reply]))
    if full.input_ids[: len(prompt_ids)] != prompt_ids:
        raise ChatTemplateError(f"{source}: the chat template tokenizes the prompt differently on its own and "
                                "followed by the reply. Fix: use a template whose generation prompt ends on a "
                                "token boundary (as ChatML's '<|im_start|>assistant\\n' does).")
    last = max(i for i, label in enumerate(full.labels) if label != IGNORE)  # end of the reply's turn
    return full.input_ids[len(prompt_ids) : last + 1]


def collate_pairs(pairs: list[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows: chosen of pairs 0..B-1, then rejected of the same pairs in that order.

    Keys as data.collate gives them (input_ids, attention_mask, position_ids, shifted targets with -100 on prompt
    and pad positions), plus `reference_logps` (2B,) in the same row order when every pair carries precomputed ones.
    """
    rows = [_row(p, p.chosen_ids) for p in pairs] + [_row(p, p.rejected_ids) for p in pairs]
    batch = collate(rows, pad_token_id)
    refs = [p.ref_chosen_logp for p in pairs] + [p.ref_rejected_logp for p in pairs]
    if all(r is not None for r in refs):
        batch["reference_logps"] = torch.tensor(refs, dtype=torch.float32)
    return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values of a collate_pairs batch, (2B, ...) -> chosen (B, ...), rejected (B, ...)."""
    chosen, rejected = values.chunk(2)
    return chosen, rejected


def _reply(value: object, source: str, name: str) -> dict[str, Any]:
    messages = as_messages(value, "assistant", source, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        fail(source, f"'{name}' must be one assistant reply, got {len(messages)} message(s) "
                     f"with roles {[m['role'] for m in messages]}",
             'write it as a string or [{"role": "assistant", "content": "..."}]')
    if not messages[0]["content"].strip():
        fail(source, f"'{name}' is an empty reply", f"write the {name} reply or remove the row")
    return messages[0]


def _row(pair: PreferencePair, completion: list[int]) -> TokenizedExample:
    ids = pair.prompt_ids + completion
    return TokenizedExample(input_ids=ids, labels=[IGNORE] * len(pair.prompt_ids) + completion,
                            truncated=pair.truncated, source=pair.source)


__all__ = ["PreferencePair", "PreferenceStats", "collate_pairs", "completion_ids", "pair_from_row",
           "preference_messages", "read_preferences", "split_pairs"]
