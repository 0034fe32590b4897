"""Turn examples into token ids and labels with the tokenizer's own chat template.

Loss masks come from character spans: each assistant turn's content (plus its
end-of-turn token) is located in the rendered chat, then mapped to tokens through
offsets. This works with any template that renders prefixes consistently, without
`{% generation %}` markers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lorafit.data.sources import Example
from lorafit.errors import UserError

IGNORE = -100  # the label of a position that has no target (PyTorch's and transformers' ignore_index)
_PROGRESS_MIN_EXAMPLES = 2000


class ChatTemplateError(UserError):
    """The chat template renders a prefix of a chat differently from the whole chat."""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids with unshifted labels (-100 where no loss), as in Hugging Face models."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    source: str


@dataclass
class TokenizeStats:
    """Counts for a tokenization run; token totals cover the kept examples only."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    total_tokens: int = 0
    target_tokens: int = 0


def tokenize_example(
    tokenizer: Any, example: Example, *, assistant_only: bool = True, max_seq_len: int | None = None
) -> TokenizedExample:
    """Tokenize one example; truncation keeps the start and is flagged in `truncated`."""
    if example.text is not None:
        input_ids, labels = _tokenize_text(tokenizer, example.text)
    else:
        input_ids, labels = _tokenize_chat(tokenizer, example, assistant_only)
    truncated = max_seq_len is not None and len(input_ids) > max_seq_len
    if truncated:
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated, source=example.source)


def tokenize_examples(
    tokenizer: Any, examples: Iterable[Example], *, assistant_only: bool = True, max_seq_len: int | None = None
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize many examples, dropping those left with no target token after truncation."""
    examples = list(examples)
    stats = TokenizeStats(examples=len(examples))
    kept = []
    progress = tqdm(examples, desc="tokenizing", disable=len(examples) <= _PROGRESS_MIN_EXAMPLES)
    for example in progress:
        tokenized = tokenize_example(tokenizer, example, assistant_only=assistant_only, max_seq_len=max_seq_len)
        stats.truncated += tokenized.truncated
        targets = sum(label != IGNORE for label in tokenized.labels)
        if targets == 0:
            stats.dropped += 1
            continue
        kept.append(tokenized)
        stats.total_tokens += len(tokenized.input_ids)
        stats.target_tokens += targets
    return kept, stats


def build_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the chat up to the generation prompt, dropping a final assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text learns every token and ends with EOS so the model learns to stop."""
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    input_ids = tokenizer(text)["input_ids"]
    return input_ids, list(input_ids)


def _tokenize_chat(tokenizer: Any, example: Example, assistant_only: bool) -> tuple[list[int], list[int]]:
    text = _render(tokenizer, example.messages, add_generation_prompt=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    if not assistant_only:
        return input_ids, list(input_ids)
    spans = _assistant_spans(tokenizer, example.messages, text, example.source)
    labels = [
        token if lo < hi and any(start <= lo and hi <= end for start, end in spans) else IGNORE
        for token, (lo, hi) in zip(input_ids, encoding["offset_mapping"])
    ]
    return input_ids, labels


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str, source: str) -> list[tuple[int, int]]:
    """Character spans in `text` (the rendered chat) of each assistant reply and its end-of-turn token."""
    closers = _special_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        start, end = _locate_content(text, prefix, message["content"], source)
        spans.append((start, _end_of_turn(text, end, closers)))
    return spans


def _locate_content(text: str, prefix: str, content: str, source: str) -> tuple[int, int]:
    """The reply starts where the rendered prefix ends; templates that trim may shift it by whitespace."""
    if not text.startswith(prefix):
        raise ChatTemplateError(
            f"{source}: the chat template renders the conversation before an assistant turn differently "
            "from the full conversation, so the assistant tokens cannot be located. "
            "Fix: use a template whose rendering of a prefix (with add_generation_prompt=True) "
            "is a prefix of the full chat."
        )
    if text.startswith(content, len(prefix)):
        return len(prefix), len(prefix) + len(content)
    stripped = content.strip()
    start = text.find(stripped, len(prefix))
    if start < 0 or text[len(prefix) : start].strip():
        raise ChatTemplateError(
            f"{source}: the chat template does not place the assistant reply right after the generation prompt. "
            "Fix: use a template that renders assistant content verbatim (or only trimmed)."
        )
    return start, start + len(stripped)


def _end_of_turn(text: str, end: int, closers: set[str]) -> int:
    """Extend a reply over the special token that closes it (e.g. <|im_end|>), if only whitespace precedes it."""
    pos = len(text) - len(text[end:].lstrip())
    found = [token for token in closers if text.startswith(token, pos)]
    return pos + max(map(len, found)) if found else end


def _special_tokens(tokenizer: Any) -> set[str]:
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return added | set(tokenizer.all_special_tokens)


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
