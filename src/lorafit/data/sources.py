"""Read training rows from JSONL, JSON, CSV files or a saved Hugging Face dataset.

Every row becomes an `Example` that remembers where it came from ("file:line"), so
errors and audits can point at the exact line to fix.
"""

from __future__ import annotations

import csv
import json
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from lorafit.errors import UserError

ROLES = ("system", "user", "assistant")
_SPACE = re.compile(r"\s*")
ACCEPTED_FORMATS = "'messages' (a chat), 'prompt' + 'completion', or 'text'"
_MESSAGE_SHAPE = '{"role": "user", "content": "..."}'


class DataError(UserError):
    """A training file or row that cannot be used; the message says where, what and how to fix."""


@dataclass(frozen=True)
class Example:
    """One training row: either a chat (`messages`) or plain `text`, plus any extra fields."""

    source: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def read_examples(path: str | Path, *, require_reply: bool = True) -> list[Example]:
    """Read every row of a .jsonl/.json/.csv file or a `save_to_disk` dataset folder.

    require_reply=False accepts chats without an assistant turn (prompts to generate from).
    """
    examples = [example_from_row(row, source, require_reply=require_reply) for source, row in read_rows(path)]
    if not examples:
        raise DataError(f"{path}: the file holds no rows. Fix: add rows with {ACCEPTED_FORMATS}.")
    return examples


def read_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """(source "file:line", decoded row) for each row of a .jsonl/.json/.csv file or a `save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        return _dataset_rows(path)
    if path.suffix in _FILE_READERS:
        return _utf8_only(path, _FILE_READERS[path.suffix](path))
    raise DataError(
        f"{path}: unsupported file type '{path.suffix}'. Use .jsonl, .json, .csv, "
        "or a folder written by datasets' save_to_disk."
    )


def _utf8_only(path: Path, rows: Iterator[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The rows of a text file, with a file that is not UTF-8 text (binary, Latin-1, ...) as a DataError."""
    try:
        yield from rows
    except UnicodeDecodeError as err:
        fail(str(path), f"not UTF-8 text (byte {err.object[err.start]:#04x} cannot be decoded)",
             "save the file as UTF-8 text: a data file is .jsonl, .json or .csv")


def example_from_row(row: object, source: str, *, require_reply: bool = True) -> Example:
    """Validate one row (a dict) and turn it into an `Example`; unknown keys go to `fields`."""
    if not isinstance(row, dict):
        problem = f"the row is a {type(row).__name__}, not an object"
        fail(source, problem, f"write each row as a JSON object with {ACCEPTED_FORMATS}")
    if "messages" in row:
        used, messages = ("messages",), _messages(row["messages"], source, "messages")
    elif "prompt" in row or "completion" in row:
        missing = [key for key in ("prompt", "completion") if key not in row]
        if missing:
            fail(source, f"the row has no '{missing[0]}' field", "give both 'prompt' and 'completion'")
        prompt = as_messages(row["prompt"], "user", source, "prompt")
        completion = as_messages(row["completion"], "assistant", source, "completion")
        used, messages = ("prompt", "completion"), prompt + completion
    elif "text" in row:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            fail(source, "'text' must be a non-empty string", "put the document text in 'text'")
        return Example(source=source, text=text, fields=_extra(row, ("text",)))
    else:
        fail(source, f"the row has none of the accepted fields (found: {sorted(row)})", f"use {ACCEPTED_FORMATS}")
    if require_reply:
        _check_chat(messages, source)
    return Example(source=source, messages=messages, fields=_extra(row, used))


def fail(source: str, problem: str, fix: str) -> NoReturn:
    """Raise the DataError every bad row gives: "source: problem. Fix: fix."."""
    raise DataError(f"{source}: {problem}. Fix: {fix}.") from None  # hide the parser error we replace


def _extra(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in used}


def as_messages(value: object, role: str, source: str, name: str) -> list[dict[str, Any]]:
    """A prompt/completion given as a string becomes a single `role` message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, source, name)


def _messages(value: object, source: str, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        fail(source, f"'{name}' must be a non-empty list of messages", f"write it as [{_MESSAGE_SHAPE}, ...]")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            fail(source, f"{where} is not an object with 'role' and 'content'", f"write it as {_MESSAGE_SHAPE}")
        if message["role"] not in ROLES:
            fail(source, f"{where} has unknown role {message['role']!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            fail(source, f"{where} content is a {kind}, not a string", "give the content as plain text")
        messages.append(dict(message))
    return messages


def _check_chat(messages: list[dict[str, Any]], source: str) -> None:
    assistant_turns = [m for m in messages if m["role"] == "assistant"]
    if not assistant_turns:
        fail(source, "the chat has no assistant turn, so there is nothing to learn", "add the assistant's reply")
    if any(not m["content"].strip() for m in assistant_turns):
        fail(source, "an assistant turn is empty", "write the assistant's reply or remove the turn")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                source = f"{path}:{number}"
                yield source, _decode(line, source, "write one valid JSON object per line")


def _decode(text: str, source: str, fix: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        fail(source, f"invalid JSON ({error.msg} at column {error.colno})", fix)


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Walk a top-level JSON list item by item so each row knows its line number."""
    text = path.read_text(encoding="utf-8-sig")
    line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def where(pos: int) -> str:
        return f"{path}:{bisect_right(line_starts, pos)}"

    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos == len(text):
        return
    if text[pos] != "[":
        fail(where(pos), "the file is not a JSON list", "write the rows as [{...}, {...}] or use .jsonl")
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}", f"invalid JSON ({error.msg})", "correct the JSON on that line")
        yield where(pos), row
        pos = _skip_space(text, end)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            fail(where(pos), "invalid JSON (expected ',' or ']')", "separate rows with commas and close the list")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    """CSV cells are strings; an empty cell counts as absent and 'messages' holds a JSON list."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2
        for raw in reader:
            source = f"{path}:{start}"
            start = reader.line_num + 1
            if None in raw:
                fail(source, "the row has more cells than the header", "quote cells that contain commas")
            row: dict[str, Any] = {key: value for key, value in raw.items() if value}
            if "messages" in row:
                fix = "put the chat in the 'messages' cell as a JSON list"
                row["messages"] = _decode(row["messages"], source, fix)
            yield source, row


def _dataset_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        problem = "reading a saved dataset folder needs the 'datasets' package"
        fail(str(path), problem, "pip install lorafit[datasets]")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = sorted(dataset)
        fail(str(path), f"the folder holds the splits {splits}", f"point at one split, e.g. {path / splits[0]}")
    for number, row in enumerate(dataset, start=1):
        # Arrow gives every row every column; a None cell means the row lacks that field.
        yield f"{path}:{number}", {key: value for key, value in row.items() if value is not None}


_FILE_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
