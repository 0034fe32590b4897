"""Dataset audit on small synthetic JSONL files: every finding fires on its defect and stays quiet without it."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import tiny_chat_tokenizer

from lorafit.data import DataError, build_prompt_ids, read_examples, tokenize_example
from lorafit.diagnose.dataset_audit import (
    MIN_REPLY_TOKENS,
    audit_dataset,
    token_lengths,
)
from lorafit.run_config import DataConfig, GRPOConfig, RunConfig

USERS = ["What is the capital of France?", "Tell me a joke about cats.", "Write a short poem about the sea.",
         "Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def chat(user: str, reply: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def clean_rows(n: int = 5, tag: str = "train") -> list[dict]:
    return [chat(f"{USERS[i % len(USERS)]} ({tag} {i})", f"Here is my answer number {i} for {tag}.") for i in range(n)]


def write(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def audit(tmp_path, tokenizer, train: list[dict], eval_rows: list[dict] | None = None, max_seq_len: int = 512,
          **run):
    data = DataConfig(train=write(tmp_path, "train.jsonl", train), max_seq_len=max_seq_len,
                      eval=write(tmp_path, "eval.jsonl", eval_rows) if eval_rows is not None else None)
    return audit_dataset(RunConfig(model="tiny", data=data, **run), tokenizer)


def finding(result, code: str):
    found = [f for f in result.findings if f.code == code]
    assert len(found) == 1, [f.code for f in result.findings]
    return found[0]


def reference_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Token count of each rendered chat, straight from the tokenizer (no lorafit code)."""
    return [len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                          add_special_tokens=False)["input_ids"]) for r in rows]


def linear_percentile(values: list[int], q: float) -> float:
    """The textbook linear-interpolation percentile (rank q/100 * (n-1) between sorted neighbours)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def test_clean_data_gives_sizes_lengths_and_no_findings(tmp_path, tokenizer):
    train = [chat(USERS[i % 5] + " Please explain." * (i % 4), f"Answer {i}: " + "the sea " * i) for i in range(11)]
    result = audit(tmp_path, tokenizer, train, clean_rows(3, "eval"))
    assert result.findings == []
    assert [(s.name, s.examples) for s in result.splits] == [("train", 11), ("eval", 3)]
    lengths = reference_lengths(tokenizer, train)
    stats = result.splits[0].lengths
    assert (stats["min"], stats["max"]) == (min(lengths), max(lengths))
    for key, q in (("median", 50), ("p90", 90), ("p99", 99)):
        assert stats[key] == pytest.approx(linear_percentile(lengths, q), abs=0.05)  # stored rounded to 0.1
    assert result.splits[0].over_limit == 0 and result.splits[0].targets_lost == 0


@pytest.mark.parametrize("assistant_only", [True, False])
def test_lengths_are_those_training_sees(tmp_path, tokenizer, assistant_only):
    rows = clean_rows(3) + [{"text": "The quick brown fox."}, {"messages": [{"role": "user", "content": "Hi"}]},
                            chat("Tell me a joke.", "Cats sleep all day.", system="Be brief.")]
    examples = read_examples(write(tmp_path, "mixed.jsonl", rows), require_reply=False)
    expected = [len(tokenize_example(tokenizer, e, assistant_only=assistant_only).input_ids) for e in examples]
    assert token_lengths(tokenizer, examples) == expected


def test_truncation_counts_rows_longer_than_max_seq_len(tmp_path, tokenizer):
    train = [chat(USERS[0], "Paris. " * k) for k in (1, 2, 8, 16, 24)]
    lengths = reference_lengths(tokenizer, train)
    limit = sorted(lengths)[2]  # the two longest rows exceed it
    result = audit(tmp_path, tokenizer, train, max_seq_len=limit)
    check = finding(result, "truncated")
    assert result.splits[0].over_limit == sum(n > limit for n in lengths) == 2
    assert check.level == "warning" and "2 of 5 rows (40.0%)" in check.message
    assert "train.jsonl:4" in check.message and "train.jsonl:5" in check.message
    assert f"or {max(lengths)} (all)" in check.fix
    assert "truncated" not in [f.code for f in audit(tmp_path, tokenizer, train, max_seq_len=max(lengths)).findings]


def test_rows_whose_reply_starts_past_max_seq_len_are_lost(tmp_path, tokenizer):
    long_prompt = chat("The quick brown fox jumps over the lazy dog. " * 30, "Fine.")
    train = clean_rows(3) + [long_prompt]
    (prompt_only,) = reference_lengths(tokenizer, [{"messages": long_prompt["messages"][:1]}])
    result = audit(tmp_path, tokenizer, train, max_seq_len=prompt_only)  # the reply begins after the limit
    assert result.splits[0].targets_lost == 1
    assert "train.jsonl:4" in finding(result, "targets_lost").message


def test_exact_and_near_duplicates(tmp_path, tokenizer):
    base = clean_rows(4)
    near = chat(base[1]["messages"][0]["content"].upper() + " ", base[1]["messages"][1]["content"].rstrip(".") + "!!")
    result = audit(tmp_path, tokenizer, base + [base[0], base[0], near])
    exact = finding(result, "exact_duplicates")
    assert exact.level == "warning" and "2 of 7 rows" in exact.message  # two extra copies of row 1
    assert "train.jsonl:1 = train.jsonl:5 = train.jsonl:6" in exact.message
    close = finding(result, "near_duplicates")
    assert close.level == "info" and "1 of 7 rows" in close.message and "train.jsonl:2 ~ train.jsonl:7" in close.message


def test_near_duplicates_do_not_count_exact_copies(tmp_path, tokenizer):
    base = clean_rows(3)
    result = audit(tmp_path, tokenizer, base + [base[2]])
    assert [f.code for f in result.findings] == ["exact_duplicates"]


def test_missing_and_empty_replies_are_reported_not_raised(tmp_path, tokenizer):
    no_reply = {"messages": [{"role": "user", "content": "Hello!"}]}
    empty = chat("Tell me a joke.", "  ")
    train = clean_rows(3) + [no_reply, empty]
    with pytest.raises(DataError):  # training stops at the first of them ...
        read_examples(write(tmp_path, "check.jsonl", train))
    result = audit(tmp_path, tokenizer, train)  # ... the audit lists both
    assert "train.jsonl:4" in finding(result, "no_reply").message
    assert "train.jsonl:5" in finding(result, "empty_reply").message


def test_tiny_replies(tmp_path, tokenizer):
    short, edge = "ok", "Paris."
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) == MIN_REPLY_TOKENS - 1
    assert len(tokenizer(edge, add_special_tokens=False)["input_ids"]) == MIN_REPLY_TOKENS  # not tiny
    result = audit(tmp_path, tokenizer, clean_rows(3) + [chat("Is it Paris?", short), chat("Where?", edge)])
    check = finding(result, "tiny_reply")
    assert check.level == "info" and "1 of 5 rows" in check.message and "train.jsonl:4" in check.message
    assert "tiny_reply" not in [f.code for f in audit(tmp_path, tokenizer, clean_rows(3)).findings]


def test_train_eval_overlap_by_chat_and_by_prompt(tmp_path, tokenizer):
    train = clean_rows(4)
    same_chat = chat(train[0]["messages"][0]["content"].lower(), train[0]["messages"][1]["content"])
    same_prompt = chat(train[2]["messages"][0]["content"], "A different answer entirely.")
    result = audit(tmp_path, tokenizer, train, clean_rows(2, "eval") + [same_chat, same_prompt])
    assert "eval.jsonl:3" in finding(result, "eval_overlap_chat").message
    check = finding(result, "eval_overlap_prompt")
    assert "1 of 4 rows" in check.message and "eval.jsonl:4" in check.message
    # train's sentences with other numbers: no overlap, but the same templates (lorafit.diagnose.eval_distance)
    assert [f.code for f in audit(tmp_path, tokenizer, train, clean_rows(2, "eval")).findings] == ["eval_in_distribution"]


def test_text_rows_are_audited_for_duplicates_and_overlap(tmp_path, tokenizer):
    train = [{"text": "The quick brown fox."}, {"text": "the quick brown fox"}, {"text": "Hello there."}]
    result = audit(tmp_path, tokenizer, train, [{"text": "Hello there."}])
    assert {f.code for f in result.findings} == {"near_duplicates", "eval_overlap_chat", "eval_in_distribution"}


def test_text_and_dict_outputs(tmp_path, tokenizer):
    train = clean_rows(3)
    result = audit(tmp_path, tokenizer, train + [train[0]], clean_rows(2, "eval"))
    text = result.to_text()
    assert "median" in text and "p99" in text and "data.max_seq_len = 512" in text
    assert "warning:" in text and "[exact_duplicates]" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["splits"][0]["examples"] == 4 and data["findings"][0]["code"] == "exact_duplicates"


def test_grpo_rows_are_prompts_checked_against_the_room_left_for_completions(tmp_path, tokenizer):
    prompts = [{"messages": [{"role": "user", "content": u}], "answer": "x"} for u in USERS]
    long_prompt = {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}]}
    rows = prompts + [long_prompt, {"text": "Plain text is not a prompt."}]
    lengths = [len(build_prompt_ids(tokenizer, r["messages"])) for r in prompts + [long_prompt]]
    limit = max(lengths[:-1])  # max_seq_len 64 + this - 64 new tokens: only the long prompt is over
    result = audit(tmp_path, tokenizer, rows, max_seq_len=limit + 64, method="grpo",
                   grpo=GRPOConfig(max_new_tokens=64))
    assert result.limit == limit and result.limit_name == "data.max_seq_len - grpo.max_new_tokens"
    assert {f.code for f in result.findings} == {"prompt_too_long", "text_rows"}  # no reply checks for prompts
    assert "train.jsonl:6" in finding(result, "prompt_too_long").message
    assert "train.jsonl:7" in finding(result, "text_rows").message
    split = result.splits[0]
    assert (split.examples, split.over_limit) == (7, 1)
    assert (split.lengths["min"], split.lengths["max"]) == (min(lengths), max(lengths))


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_dpo_rows_are_pairs_with_lengths_bad_rows_truncation_duplicates_and_overlap(tmp_path, tokenizer):
    from lorafit.data.preferences import read_preferences

    good = [pair(f"{USERS[i]} ({i})", "Paris.", "The capital of France is Paris, a fine city.") for i in range(4)]
    clean = audit(tmp_path, tokenizer, good, [pair("Hello! (eval)", "Hi.", "Hello there, how are you?")],
                  max_seq_len=512, method="dpo")
    pairs, _ = read_preferences(tmp_path / "train.jsonl", tokenizer, 512)
    want = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]  # what training batches
    assert [s.examples for s in clean.splits] == [4, 1] and clean.findings == []
    assert clean.splits[0].lengths["max"] == max(want) and clean.splits[0].lengths["min"] == min(want)

    rows = good + [pair("Same?", "Yes.", "Yes."), {"prompt": "No reply"}, good[0],
                   pair("Why is that so?", "Short.", "Long " * 60)]
    limit = max(want) + 2  # fits the good pairs; the long prompt + reply does not
    result = audit(tmp_path, tokenizer, rows, [good[1], pair("New prompt", "A.", "B b b.")], max_seq_len=limit,
                   method="dpo")
    assert [s.examples for s in result.splits] == [8, 2]
    bad = finding(result, "bad_rows").message
    assert "2 of 8 rows" in bad and "train.jsonl:5" in bad and "same reply" in bad and "no 'chosen' field" in bad
    assert "train.jsonl:8" in finding(result, "truncated").message and result.splits[0].over_limit == 1
    assert "train.jsonl:7" in finding(result, "exact_duplicates").message
    assert "1 of 2 pairs" in finding(result, "eval_overlap_prompt").message
    with pytest.raises(DataError, match="train.jsonl:5"):  # training stops where the audit said
        read_preferences(tmp_path / "train.jsonl", tokenizer, limit)
    tight = audit(tmp_path, tokenizer, good, max_seq_len=4, method="dpo")
    assert "4 of 4 pairs" in finding(tight, "prompt_too_long").message
