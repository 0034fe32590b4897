"""Reading rows from files, with errors that name the file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorafit.data import DataError, Example, read_examples

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_formats_and_line_numbers(tmp_path):
    rows = [
        {"messages": CHAT, "answer": 42},
        {"prompt": "Hi", "completion": "Hello!"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello!"}]},
        {"text": "Just text.", "lang": "en"},
    ]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2]), "   ", json.dumps(rows[3])]
    path = write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    assert read_examples(str(path)) == [
        Example(source=f"{path}:1", messages=CHAT, fields={"answer": 42}),
        Example(source=f"{path}:3", messages=CHAT),
        Example(source=f"{path}:4", messages=[{"role": "system", "content": "Be brief."}] + CHAT),
        Example(source=f"{path}:6", text="Just text.", fields={"lang": "en"}),
    ]


def test_json_list_rows_know_their_lines(tmp_path):
    text = '[\n  {"text": "one"},\n\n  {"prompt": "Hi",\n   "completion": "Hello!", "id": 7}\n]\n'
    path = write(tmp_path, "train.json", text)
    assert read_examples(path) == [
        Example(source=f"{path}:2", text="one"),
        Example(source=f"{path}:4", messages=CHAT, fields={"id": 7}),
    ]


def test_csv_columns(tmp_path):
    chat_csv = write(tmp_path, "chat.csv", 'messages,id\n"' + json.dumps(CHAT).replace('"', '""') + '",a\n')
    assert read_examples(chat_csv) == [Example(source=f"{chat_csv}:2", messages=CHAT, fields={"id": "a"})]
    pc_csv = write(tmp_path, "pc.csv", 'prompt,completion\n"Hi","Hello!"\n"multi\nline","Hello!"\nHi,Hello!\n')
    assert [(e.source, e.messages[0]["content"]) for e in read_examples(pc_csv)] == [
        (f"{pc_csv}:2", "Hi"), (f"{pc_csv}:3", "multi\nline"), (f"{pc_csv}:5", "Hi")
    ]
    text_csv = write(tmp_path, "text.csv", "text\nsome text\n")
    assert read_examples(text_csv) == [Example(source=f"{text_csv}:2", text="some text")]


def row(obj) -> str:
    return json.dumps(obj)


GOOD = row({"text": "fine"})
BAD_ROWS = {
    "invalid_json": (GOOD + "\n{not json}\n", 2, "invalid JSON"),
    "not_an_object": (GOOD + "\n" + GOOD + "\n[1, 2]\n", 3, "not an object"),
    "missing_field": (row({"question": "Hi"}) + "\n", 1, "'messages' (a chat), 'prompt' + 'completion', or 'text'"),
    "prompt_without_completion": (row({"prompt": "Hi"}) + "\n", 1, "no 'completion'"),
    "unknown_role": (GOOD + "\n" + row({"messages": [{"role": "bot", "content": "x"}]}), 2, "user, assistant"),
    "content_not_string": (row({"messages": [{"role": "user", "content": 3}, CHAT[1]]}), 1, "not a string"),
    "empty_assistant": (row({"messages": [CHAT[0], {"role": "assistant", "content": " "}]}), 1, "turn is empty"),
    "no_assistant": (row({"messages": [CHAT[0]]}), 1, "no assistant turn"),
    "empty_text": (row({"text": ""}), 1, "non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_jsonl_rows_name_file_and_line(tmp_path, case):
    text, line, phrase = BAD_ROWS[case]
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(DataError) as error:
        read_examples(path)
    assert f"bad.jsonl:{line}:" in str(error.value)
    assert phrase in str(error.value)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize(
    "name, text, line, phrase",
    [
        ("bad.json", '[\n {"text": "a"},\n {"text": }\n]', 3, "invalid JSON"),
        ("bad.json", '[\n {"text": "a"}\n {"text": "b"}\n]', 3, "expected ',' or ']'"),
        ("bad.json", '[\n {"text": "a"},\n "just a string"\n]', 3, "not an object"),
        ("bad.json", '\n{"text": "a"}', 2, "not a JSON list"),
        ("bad.csv", "messages\nnot json\n", 2, "invalid JSON"),
        ("bad.csv", "text\na\nb,c\n", 3, "more cells than the header"),
        ("bad.csv", "question\nHi\n", 2, "accepted fields"),
    ],
)
def test_bad_json_and_csv_rows_name_file_and_line(tmp_path, name, text, line, phrase):
    with pytest.raises(DataError) as error:
        read_examples(write(tmp_path, name, text))
    assert f"{name}:{line}:" in str(error.value)
    assert phrase in str(error.value)


@pytest.mark.parametrize(
    "name, text, phrase",
    [
        ("empty.jsonl", "\n\n", "no rows"),
        ("empty.json", "[ ]", "no rows"),
        ("empty.csv", "text\n", "no rows"),
        ("data.txt", "hello", "unsupported file type '.txt'"),
    ],
)
def test_bad_files(tmp_path, name, text, phrase):
    with pytest.raises(DataError) as error:
        read_examples(write(tmp_path, name, text))
    assert name in str(error.value) and phrase in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        read_examples(tmp_path / "nowhere.jsonl")


def test_saved_dataset_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install lorafit\[datasets\]"):
        read_examples(tmp_path)


class _FakeDatasets:
    """Stands in for the `datasets` module: rows come back with None for absent columns, as Arrow does."""

    class DatasetDict(dict):
        pass

    def __init__(self, loaded):
        self.loaded = loaded

    def load_from_disk(self, path):
        return self.loaded


def test_saved_dataset_rows_drop_none_columns(tmp_path, monkeypatch):
    rows = [{"messages": CHAT, "text": None, "id": 1}, {"messages": None, "text": "plain", "id": 2}]
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(rows))
    assert read_examples(tmp_path) == [
        Example(source=f"{tmp_path}:1", messages=CHAT, fields={"id": 1}),
        Example(source=f"{tmp_path}:2", text="plain", fields={"id": 2}),
    ]


def test_saved_dataset_with_splits_asks_for_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(_FakeDatasets.DatasetDict(train=[], test=[])))
    with pytest.raises(DataError, match="point at one split"):
        read_examples(tmp_path)


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": CHAT, "id": 1}, {"text": "plain", "id": 2}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    examples = read_examples(tmp_path / "ds")
    assert [e.messages for e in examples][0] == CHAT
    assert [e.fields["id"] for e in examples] == [1, 2]
