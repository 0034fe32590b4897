"""Preference pairs: both TRL formats through the chat template, the chosen+rejected batch layout, truncation,
and bad rows named by file:line with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit.data import DataError, Example, build_prompt_ids, tokenize_example
from lorafit.data.chat import IGNORE
from lorafit.data.preferences import PreferencePair, collate_pairs, read_preferences, split_pairs

STANDARD = {"prompt": "What is the capital of France?", "chosen": "Paris.",
            "rejected": "The capital of France is Paris. It is a large city. Many people live there."}
CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}],
    "chosen": [{"role": "assistant", "content": "Fine, thanks."}],
    "rejected": [{"role": "assistant", "content": "Hello! I am fine. How can I help you today? Tell me."}],
}


def write_rows(tmp_path: Path, rows: list, name: str = "prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_standard_and_conversational_rows(tmp_path, chatml_tokenizer):
    path = write_rows(tmp_path, [STANDARD, CONVERSATIONAL])
    (standard, conversational), stats = read_preferences(path, chatml_tokenizer, max_seq_len=256)
    assert (stats.pairs, stats.truncated) == (2, 0) and str(stats) == "2 preference pairs"
    assert standard.source == f"{path}:1" and conversational.source == f"{path}:2"
    user = [{"role": "user", "content": STANDARD["prompt"]}]
    assert standard.prompt_ids == build_prompt_ids(chatml_tokenizer, user)
    decode = chatml_tokenizer.decode
    assert decode(standard.chosen_ids) == "Paris.<|im_end|>"
    assert decode(standard.rejected_ids) == STANDARD["rejected"] + "<|im_end|>"
    assert decode(conversational.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello! How are you?<|im_end|>\n"
        "<|im_start|>assistant\n")  # the row's system turn replaces the template's default one
    assert decode(conversational.chosen_ids) == "Fine, thanks.<|im_end|>"
    for pair, prompt in ((standard, user), (conversational, CONVERSATIONAL["prompt"])):
        for reply in ("chosen", "rejected"):
            completion = getattr(pair, f"{reply}_ids")
            message = CONVERSATIONAL[reply][0] if pair is conversational else {"role": "assistant",
                                                                             "content": STANDARD[reply]}
            sft = tokenize_example(chatml_tokenizer, Example(source="", messages=[*prompt, message]))
            # the completion is exactly what SFT learns on that assistant turn, right after the prompt's tokens
            assert completion == [t for t in sft.labels if t != IGNORE]
            assert sft.input_ids[: len(pair.prompt_ids) + len(completion)] == pair.prompt_ids + completion


def test_other_end_of_turn_token_closes_the_completion(make_tokenizer, smollm2_template, tmp_path):
    tokenizer = make_tokenizer(smollm2_template.replace("'<|im_end|>' + '\\n'", "'<|end|>' + '\\n'"))
    (pair,), _ = read_preferences(write_rows(tmp_path, [STANDARD]), tokenizer, max_seq_len=256)
    assert tokenizer.decode(pair.chosen_ids) == "Paris.<|end|>"


def test_replies_are_cut_to_fit_and_counted(tmp_path, chatml_tokenizer):
    path = write_rows(tmp_path, [STANDARD, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hi."}])
    (full, short), _ = read_preferences(path, chatml_tokenizer, max_seq_len=256)
    assert len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids)) < len(full.prompt_ids)
    limit = len(full.prompt_ids) + len(full.chosen_ids) + 2  # the chosen reply fits, the rejected one does not
    (cut, _), stats = read_preferences(path, chatml_tokenizer, max_seq_len=limit)
    assert stats.truncated == 1 and str(stats) == "2 preference pairs, 1 with a reply cut to fit data.max_seq_len"
    assert cut.truncated and cut.chosen_ids == full.chosen_ids
    assert cut.rejected_ids == full.rejected_ids[: limit - len(full.prompt_ids)]  # the start is kept
    assert len(cut.prompt_ids) + len(cut.rejected_ids) == limit


def test_collate_puts_chosen_rows_then_rejected_rows():
    pairs = [PreferencePair("a", [5, 6, 7], [8, 9], [10]),
             PreferencePair("b", [11], [12, 13, 14, 15], [16, 17, 18])]
    batch = collate_pairs(pairs, pad_token_id=0)
    rows = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15], [5, 6, 7, 10], [11, 16, 17, 18]]  # c0, c1, r0, r1
    assert batch["input_ids"].tolist() == [row + [0] * (5 - len(row)) for row in rows]
    assert batch["attention_mask"].tolist() == [[1] * len(row) + [0] * (5 - len(row)) for row in rows]
    assert batch["position_ids"].tolist() == [list(range(5))] * 4
    assert batch["targets"].tolist() == [
        [IGNORE, IGNORE, 8, 9, IGNORE],  # targets[t] = the completion token at t + 1; prompt and pad: -100
        [12, 13, 14, 15, IGNORE],
        [IGNORE, IGNORE, 10, IGNORE, IGNORE],
        [16, 17, 18, IGNORE, IGNORE],
    ]
    assert "reference_logps" not in batch
    chosen, rejected = split_pairs(batch["input_ids"])
    assert chosen.tolist()[1][:5] == rows[1] and rejected.tolist()[0][:4] == rows[2]

    with_refs = [PreferencePair("a", [1], [2], [3], ref_chosen_logp=-1.5, ref_rejected_logp=-2.5),
                 PreferencePair("b", [1], [2], [4], ref_chosen_logp=-0.5, ref_rejected_logp=-3.0)]
    assert collate_pairs(with_refs, 0)["reference_logps"].tolist() == [-1.5, -0.5, -2.5, -3.0]


MESSAGE = [{"role": "assistant", "content": "Yes."}]
BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "the row has no 'prompt' field. Fix: give the shared prompt in 'prompt'"),
    ({"prompt": "q", "rejected": "b"}, "the row has no 'chosen' field. Fix: write each row as"),
    ({"prompt": "q", "chosen": "a"}, "the row has no 'rejected' field"),
    ('["q", "a", "b"]', "the row is a list, not an object. Fix: write each row as"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a non-empty list of messages"),
    ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, r"prompt\[0\] is not an object with 'role' and 'content'"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": 5}]},
     r"rejected\[0\] content is a int, not a string"),
    ({"prompt": "q", "chosen": " Same answer.", "rejected": "Same answer."},
     "'chosen' and 'rejected' are the same reply, so the pair teaches nothing. Fix: give a different"),
    ({"prompt": "q", "chosen": MESSAGE + MESSAGE, "rejected": "b"}, "'chosen' must be one assistant reply, got 2"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "'rejected' must be one assistant reply"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' is an empty reply. Fix: write the chosen reply"),
    ({"prompt": [{"role": "user", "content": "q"}, *MESSAGE], "chosen": "a", "rejected": "b"},
     "the prompt ends with a assistant message. Fix: end the prompt with the user's message"),
    ({"prompt": "word " * 300, "chosen": "a", "rejected": "b"},
     r"the prompt has \d+ tokens, leaving no room for a reply within data.max_seq_len=64. Fix: shorten the prompt"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS, ids=[m[:30] for _, m in BAD_ROWS])
def test_bad_row_names_file_line_and_fix(tmp_path, chatml_tokenizer, row, message):
    path = write_rows(tmp_path, [STANDARD, STANDARD, row])  # the bad row is on line 3
    with pytest.raises(DataError, match=f"^{path}:3: {message}") as error:
        read_preferences(path, chatml_tokenizer, max_seq_len=64)
    assert "Fix: " in str(error.value) and "\n" not in str(error.value)


def test_empty_and_missing_files(tmp_path, chatml_tokenizer):
    empty = write_rows(tmp_path, [])
    with pytest.raises(DataError, match=f"^{empty}: the file holds no rows. Fix: add rows such as"):
        read_preferences(empty, chatml_tokenizer, 64)
    with pytest.raises(DataError, match="file not found"):
        read_preferences(tmp_path / "nope.jsonl", chatml_tokenizer, 64)


def test_json_list_files_are_read_too(tmp_path, chatml_tokenizer):
    path = tmp_path / "prefs.json"
    path.write_text("[\n" + json.dumps(STANDARD) + ",\n" + json.dumps(CONVERSATIONAL) + "\n]\n")
    pairs, _ = read_preferences(path, chatml_tokenizer, 256)
    assert [p.source for p in pairs] == [f"{path}:2", f"{path}:3"]
