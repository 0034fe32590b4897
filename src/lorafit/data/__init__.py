"""Data loading for lorafit: read rows, apply chat templates with loss masks, pack and batch."""

from lorafit.data.chat import (
    ChatTemplateError,
    TokenizedExample,
    TokenizeStats,
    build_prompt_ids,
    tokenize_example,
    tokenize_examples,
)
from lorafit.data.collate import collate, count_targets, shift_labels
from lorafit.data.packing import Pack, pack_examples
from lorafit.data.sources import DataError, Example, example_from_row, read_examples

__all__ = [
    "ChatTemplateError",
    "DataError",
    "Example",
    "Pack",
    "TokenizeStats",
    "TokenizedExample",
    "build_prompt_ids",
    "collate",
    "count_targets",
    "example_from_row",
    "pack_examples",
    "read_examples",
    "shift_labels",
    "tokenize_example",
    "tokenize_examples",
]
