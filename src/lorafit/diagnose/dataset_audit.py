"""Dataset audit before training: sizes, token lengths, truncation, duplicates, tiny replies, train/eval overlap,
and how far each eval set is from train (lorafit.diagnose.eval_distance).

Reads the files the way training does (lorafit.data), but collects every problem instead of stopping at the
first, so `lorafit check` can show them all at once, each with the rows to look at.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.data import DataError, Example, build_prompt_ids, read_examples, tokenize_example
from lorafit.data.chat import IGNORE
from lorafit.data.preferences import completion_ids, preference_messages
from lorafit.data.sources import read_rows
from lorafit.diagnose.checks import Check, format_checks
from lorafit.diagnose.eval_distance import EvalDistance, eval_distance
from lorafit.run_config import RunConfig

MIN_REPLY_TOKENS = 3  # replies shorter than this teach little beyond "stop" (fine for yes/no or label tasks)
SHOWN_SOURCES = 3  # rows named per finding
_NOT_WORD = re.compile(r"[^\w\s]")


@dataclass
class SplitSummary:
    """Size and token lengths (chat template included, before truncation) of one data file.

    For GRPO the lengths are those of the prompts (the chat up to the generation prompt); for DPO, of the prompt
    plus the longer of its two replies (the longest row the pair puts in a batch).
    """

    name: str
    path: str
    examples: int
    lengths: dict[str, float]  # min, median, p90, p99, max; empty when no row could be measured
    over_limit: int  # longer than the audit's limit: truncated (SFT) or rejected (GRPO)
    targets_lost: int  # SFT: no trained token left after truncation, so training drops these rows


@dataclass
class DatasetAudit:
    """What audit_dataset found: one summary per split, and findings with the rows to fix."""

    limit: int
    limit_name: str  # "data.max_seq_len", or "data.max_seq_len - grpo.max_new_tokens" for GRPO prompts
    splits: list[SplitSummary]
    findings: list[Check] = field(default_factory=list)
    eval_distance: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval set name -> EvalDistance.to_dict()

    def to_text(self) -> str:
        """A table of the splits followed by the findings, for the terminal."""
        lines = [f"dataset audit (token lengths with the chat template; {self.limit_name} = {self.limit}):",
                 f"  {'split':<6}{'examples':>9}{'min':>7}{'median':>8}{'p90':>7}{'p99':>7}{'max':>7}  over limit"]
        for s in self.splits:
            stats = "".join(f"{s.lengths.get(key, '-'):>{width}}" for key, width in
                            (("min", 7), ("median", 8), ("p90", 7), ("p99", 7), ("max", 7)))
            share = f"{s.over_limit / s.examples:.1%}"
            lines.append(f"  {s.name:<6}{s.examples:>9}{stats}  {s.over_limit} ({share})   {s.path}")
        for name, distance in self.eval_distance.items():
            lines.append(f"  {name} vs train: {distance['summary']}")
        lines.append(format_checks(self.findings, title="dataset findings"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) for files and reports."""
        return asdict(self)


def audit_dataset(config: RunConfig, tokenizer: Any) -> DatasetAudit:
    """Audit data.train (and data.eval) of `config` with the model's tokenizer; fast enough for 10k rows.

    For method grpo the rows are prompts: their length is checked against max_seq_len - grpo.max_new_tokens
    and reply checks are skipped.
    """
    data = config.data
    if getattr(config, "method", "sft") == "dpo":
        return _audit_preferences(config, tokenizer)
    grpo = getattr(config, "method", "sft") == "grpo"
    audit = DatasetAudit(limit=data.max_seq_len - config.grpo.max_new_tokens if grpo else data.max_seq_len,
                         limit_name="data.max_seq_len - grpo.max_new_tokens" if grpo else "data.max_seq_len",
                         splits=[])
    train = read_examples(data.train, require_reply=False)
    evaluation = read_examples(data.eval, require_reply=False) if data.eval else None
    for name, path, examples in [("train", data.train, train), ("eval", data.eval, evaluation)]:
        if examples is None:
            continue
        if grpo:
            summary, findings = _audit_prompts(name, str(path), examples, tokenizer, audit.limit)
        else:
            summary, findings = _audit_chats(name, str(path), examples, tokenizer, audit.limit, data.assistant_only)
        audit.splits.append(summary)
        audit.findings += findings
    audit.findings += _duplicate_findings(train)
    if evaluation is not None:
        audit.findings += _overlap_findings(train, evaluation)
    eval_sets = {"eval": evaluation} if evaluation is not None else {}
    eval_sets |= {name: read_examples(spec.path, require_reply=False) for name, spec in config.evaluation.sets.items()}
    for name, examples in eval_sets.items():
        distance = eval_distance(train, examples)
        audit.eval_distance[name] = {**distance.to_dict(), "summary": distance.to_text()}
        audit.findings += _distance_findings(name, distance)
    return audit


def _distance_findings(name: str, distance: EvalDistance) -> list[Check]:
    """The in-distribution warning (thresholds: EvalDistance.in_distribution), with the figures."""
    if not distance.in_distribution:
        return []
    return [Check(
        "warning", "eval_in_distribution",
        f"{name}: your eval set is in-distribution: it measures memorisation, not generalisation "
        f"({distance.to_text()}).",
        "also score an eval set written independently of the training data (new phrasings, values never in train) "
        "as evaluation.sets.out_of_distribution; keep this one as in_distribution.",
    )]


def _audit_chats(name: str, path: str, examples: list[Example], tokenizer: Any, max_seq_len: int,
                 assistant_only: bool) -> tuple[SplitSummary, list[Check]]:
    """SFT rows: truncation, rows that lose every target to it, and missing, empty or tiny replies."""
    lengths = token_lengths(tokenizer, examples)
    truncated = [e for e, n in zip(examples, lengths) if n > max_seq_len]
    # Only a truncated row can lose every target (a chat without reply is reported as no_reply).
    lost = [e for e in truncated if all(label == IGNORE for label in tokenize_example(
        tokenizer, e, assistant_only=assistant_only, max_seq_len=max_seq_len).labels)]
    summary = SplitSummary(name, path, len(examples), _length_stats(lengths), len(truncated), len(lost))
    findings = []
    if truncated:
        findings.append(Check(
            "warning", "truncated",
            f"{name}: {_count(truncated, examples)} are longer than data.max_seq_len={max_seq_len} tokens and lose their "
            f"end (longest {max(lengths)}){_examples(truncated)}.",
            f"raise data.max_seq_len to {_covering(lengths, 0.99)} (covers 99% of rows) or {max(lengths)} (all), "
            "or shorten those rows.",
        ))
    if lost:
        findings.append(Check(
            "warning", "targets_lost",
            f"{name}: {_count(lost, examples)} keep no trained token within max_seq_len={max_seq_len}, so training "
            f"drops them{_examples(lost)}.",
            "raise data.max_seq_len or shorten the prompts so that the reply fits.",
        ))
    return summary, findings + _reply_findings(name, examples, tokenizer)


def _audit_prompts(name: str, path: str, examples: list[Example], tokenizer: Any,
                   limit: int) -> tuple[SplitSummary, list[Check]]:
    """GRPO rows: chats whose prompt (up to the generation prompt) must leave room for the completion."""
    chats = [e for e in examples if e.messages is not None]
    lengths = [len(build_prompt_ids(tokenizer, e.messages)) for e in chats]
    too_long = [e for e, n in zip(chats, lengths) if n > limit]
    text_rows = [e for e in examples if e.messages is None]
    summary = SplitSummary(name, path, len(examples), _length_stats(lengths), len(too_long), 0)
    findings = []
    if too_long:
        findings.append(Check(
            "warning", "prompt_too_long",
            f"{name}: {_count(too_long, examples)} have a prompt longer than data.max_seq_len - grpo.max_new_tokens = "
            f"{limit} tokens (longest {max(lengths)}); GRPO stops on them{_examples(too_long)}.",
            "raise data.max_seq_len, lower grpo.max_new_tokens, or shorten those prompts.",
        ))
    if text_rows:
        findings.append(Check(
            "warning", "text_rows",
            f"{name}: {_count(text_rows, examples)} are plain 'text'; GRPO needs chat rows{_examples(text_rows)}.",
            'write them as {"messages": [{"role": "user", "content": ...}]}.',
        ))
    return summary, findings


@dataclass(frozen=True)
class _Pair:
    """One readable preference row as the audit sees it: where, its prompt's key and token counts."""

    source: str
    prompt_key: str
    row_key: str
    prompt_tokens: int
    longest: int  # prompt + the longer reply, untruncated


def _audit_preferences(config: RunConfig, tokenizer: Any) -> DatasetAudit:
    """DPO rows: pair counts and lengths, rows training rejects (missing field, identical replies, ...), prompts
    that leave no room for a reply, replies cut to fit, duplicated pairs, and prompts shared by train and eval."""
    data = config.data
    audit = DatasetAudit(limit=data.max_seq_len, limit_name="data.max_seq_len", splits=[])
    read: dict[str, list[_Pair]] = {}
    for name, path in (("train", data.train), ("eval", data.eval)):
        if path is None:
            continue
        pairs, bad = _read_pairs(str(path), tokenizer)
        read[name] = pairs
        lengths = [p.longest for p in pairs]
        over = [p for p in pairs if p.longest > data.max_seq_len]
        audit.splits.append(SplitSummary(name, str(path), len(pairs) + len(bad), _length_stats(lengths), len(over), 0))
        audit.findings += _pair_findings(name, pairs, bad, data.max_seq_len)
    train, evaluation = read["train"], read.get("eval")
    copies = [p for group in _groups(train, lambda p: p.row_key) for p in group[1:]]
    if copies:
        audit.findings.append(Check(
            "warning", "exact_duplicates",
            f"train: {len(copies)} of {len(train)} pairs repeat another pair exactly{_named(copies)}; they weigh "
            "those pairs double.", "remove the copies (keep one of each)."))
    if evaluation:
        prompts = {p.prompt_key for p in train}
        shared = [p for p in evaluation if p.prompt_key in prompts]
        if shared:
            audit.findings.append(Check(
                "warning", "eval_overlap_prompt",
                f"eval: {len(shared)} of {len(evaluation)} pairs have a prompt that also appears in train"
                f"{_named(shared)}; held-out preference accuracy then rewards memorisation.",
                "move those prompts to one split only."))
    return audit


def _read_pairs(path: str, tokenizer: Any) -> tuple[list[_Pair], list[str]]:
    """The readable pairs of a file and, for every row training would reject, its one-line error."""
    pairs, bad = [], []
    for source, row in read_rows(path):
        try:
            prompt, chosen, rejected = preference_messages(row, source)
        except DataError as err:
            bad.append(str(err))
            continue
        prompt_ids = build_prompt_ids(tokenizer, prompt)
        longest = max(len(completion_ids(tokenizer, prompt, prompt_ids, reply, source)) for reply in (chosen, rejected))
        replies = "\x00".join(_normalise(m["content"]) for m in (chosen, rejected))
        pairs.append(_Pair(source, _messages_key(prompt), f"{_messages_key(prompt)}\x00{replies}", len(prompt_ids),
                           len(prompt_ids) + longest))
    return pairs, bad


def _pair_findings(name: str, pairs: list[_Pair], bad: list[str], max_seq_len: int) -> list[Check]:
    findings = []
    if bad:
        findings.append(Check(
            "warning", "bad_rows",
            f"{name}: {len(bad)} of {len(pairs) + len(bad)} rows cannot be trained on; training stops at the first: "
            + " | ".join(bad[:SHOWN_SOURCES]), "fix or remove those rows (each message names file:line)."))
    no_room = [p for p in pairs if p.prompt_tokens >= max_seq_len]
    cut = [p for p in pairs if p.longest > max_seq_len and p.prompt_tokens < max_seq_len]
    if no_room:
        findings.append(Check(
            "warning", "prompt_too_long",
            f"{name}: {len(no_room)} of {len(pairs)} pairs have a prompt of data.max_seq_len={max_seq_len} tokens or "
            f"more, leaving no room for a reply; training stops on them{_named(no_room)}.",
            "raise data.max_seq_len or shorten those prompts."))
    if cut:
        longest = max(p.longest for p in pairs)
        findings.append(Check(
            "warning", "truncated",
            f"{name}: {len(cut)} of {len(pairs)} pairs have a reply cut to fit data.max_seq_len={max_seq_len} "
            f"(longest prompt + reply {longest}){_named(cut)}; a cut reply is scored without its end.",
            f"raise data.max_seq_len to {longest} or shorten those replies."))
    return findings


def _named(pairs: list[_Pair]) -> str:
    return f" (e.g. {', '.join(Path(p.source).name for p in pairs[:SHOWN_SOURCES])})"


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    p50, p90, p99 = (round(float(v), 1) for v in np.percentile(lengths, [50, 90, 99]))
    return {"min": min(lengths), "median": p50, "p90": p90, "p99": p99, "max": max(lengths)}


def token_lengths(tokenizer: Any, examples: list[Example]) -> list[int]:
    """Untruncated token count of each example as training sees it; chats are rendered and encoded in one batch."""
    chats = [e for e in examples if e.messages is not None]
    texts = tokenizer.apply_chat_template([e.messages for e in chats], tokenize=False) if chats else []
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] if chats else []
    chat_lengths = iter(len(ids) for ids in encoded)
    return [next(chat_lengths) if e.messages is not None else len(tokenize_example(tokenizer, e).input_ids)
            for e in examples]


def _reply_findings(name: str, examples: list[Example], tokenizer: Any) -> list[Check]:
    """Chats without a reply, with an empty reply (training rejects both), or with a reply of a token or two."""
    chats = [e for e in examples if e.messages is not None]
    no_reply = [e for e in chats if not _replies(e)]
    empty = [e for e in chats if any(not reply.strip() for reply in _replies(e))]
    with_text = [(e, reply) for e in chats for reply in _replies(e) if reply.strip()]
    counts = tokenizer([reply for _, reply in with_text], add_special_tokens=False)["input_ids"] if with_text else []
    tiny = list({id(e): e for (e, _), ids in zip(with_text, counts) if len(ids) < MIN_REPLY_TOKENS}.values())
    findings = []
    if no_reply:
        findings.append(Check(
            "warning", "no_reply",
            f"{name}: {_count(no_reply, examples)} have no assistant turn, so nothing to learn; training stops on "
            f"them{_examples(no_reply)}.",
            "add the assistant's reply to those rows or remove them.",
        ))
    if empty:
        findings.append(Check(
            "warning", "empty_reply",
            f"{name}: {_count(empty, examples)} have an empty assistant turn; training stops on them{_examples(empty)}.",
            "write the reply or remove the empty turn.",
        ))
    if tiny:
        findings.append(Check(
            "info", "tiny_reply",
            f"{name}: {_count(tiny, examples)} have an assistant reply under {MIN_REPLY_TOKENS} tokens"
            f"{_examples(tiny)}.",
            "fine for label-like answers (yes/no, a class name); otherwise complete or remove those rows.",
        ))
    return findings


def _duplicate_findings(train: list[Example]) -> list[Check]:
    """Exact copies (same text) and near copies (same text after normalising case, punctuation and spaces)."""
    exact_groups = _groups(train, _exact_key)
    copies = [e for group in exact_groups for e in group[1:]]
    near_pairs = []
    for group in _groups(train, _chat_key):
        distinct = list({_exact_key(e): e for e in group}.values())
        near_pairs += [(distinct[0], e) for e in distinct[1:]]
    findings = []
    if copies:
        shown = "; ".join(" = ".join(_where(e) for e in group[:SHOWN_SOURCES]) for group in exact_groups[:SHOWN_SOURCES])
        findings.append(Check(
            "warning", "exact_duplicates",
            f"train: {_count(copies, train)} are exact copies of another row (e.g. {shown}); they weigh those "
            "examples double and can make the model memorise them.",
            "remove the copies (keep one of each).",
        ))
    if near_pairs:
        shown = "; ".join(f"{_where(a)} ~ {_where(b)}" for a, b in near_pairs[:SHOWN_SOURCES])
        findings.append(Check(
            "info", "near_duplicates",
            f"train: {_count(near_pairs, train)} differ from another row only in case, punctuation or spacing "
            f"(e.g. {shown}).",
            "remove them unless the variation is intended.",
        ))
    return findings


def _overlap_findings(train: list[Example], evaluation: list[Example]) -> list[Check]:
    """Eval rows whose whole chat, or whose prompt, also appears in train: the eval then measures memory."""
    chats = {_chat_key(e) for e in train}
    prompts = {_prompt_key(e) for e in train}
    same_chat = [e for e in evaluation if _chat_key(e) in chats]
    same_prompt = [e for e in evaluation if _chat_key(e) not in chats and _prompt_key(e) in prompts]
    findings = []
    if same_chat:
        findings.append(Check(
            "warning", "eval_overlap_chat",
            f"eval: {_count(same_chat, evaluation)} also appear in train (same chat after normalising)"
            f"{_examples(same_chat)}; eval loss and accuracy then reward memorisation.",
            "remove those rows from one of the files.",
        ))
    if same_prompt:
        findings.append(Check(
            "warning", "eval_overlap_prompt",
            f"eval: {_count(same_prompt, evaluation)} have a prompt that also appears in train with another reply"
            f"{_examples(same_prompt)}.",
            "move those prompts to one split only.",
        ))
    return findings


def _replies(example: Example) -> list[str]:
    return [m["content"] for m in example.messages if m["role"] == "assistant"]


def _normalise(text: str) -> str:
    """Case, punctuation and whitespace removed: 'Hello,  World!' and 'hello world' become equal."""
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def _exact_key(example: Example) -> str:
    if example.text is not None:
        return example.text
    return "\x00".join(f"{m['role']}\x01{m['content']}" for m in example.messages)


def _chat_key(example: Example) -> str:
    return _messages_key(example.messages) if example.text is None else _normalise(example.text)


def _prompt_key(example: Example) -> str:
    """The chat before its final assistant turn (the whole row for plain text)."""
    if example.text is not None:
        return _normalise(example.text)
    messages = example.messages
    cut = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return _messages_key(messages[:cut])


def _messages_key(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"{m['role']}: {_normalise(m['content'])}" for m in messages)


def _groups(examples: list[Any], key: Callable[[Any], str]) -> list[list[Any]]:
    """Groups of two or more examples (or pairs) with the same key, in file order."""
    by_key: dict[str, list[Any]] = defaultdict(list)
    for example in examples:
        by_key[key(example)].append(example)
    return [group for group in by_key.values() if len(group) > 1]


def _covering(lengths: list[int], share: float) -> int:
    """The smallest length that at least `share` of the rows fit in."""
    ordered = sorted(lengths)
    return ordered[max(0, int(np.ceil(share * len(ordered))) - 1)]


def _count(found: Iterable[object], examples: list[Example]) -> str:
    n = len(list(found))
    return f"{n} of {len(examples)} rows ({n / len(examples):.1%})"


def _where(example: Example) -> str:
    return Path(example.source).name  # "file.jsonl:12"; the split's full path is in the table


def _examples(found: list[Example]) -> str:
    return f" (e.g. {', '.join(_where(e) for e in found[:SHOWN_SOURCES])})"


__all__ = ["MIN_REPLY_TOKENS", "DatasetAudit", "SplitSummary", "audit_dataset", "token_lengths"]
