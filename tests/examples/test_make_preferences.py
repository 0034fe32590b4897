"""Tests for examples/make_preferences.py (loaded from its path: examples/ is not a package)."""

from pathlib import Path
from types import ModuleType

import pytest
from example_scripts import load_example
from tiny_models import tiny_chat_tokenizer

from lorafit.data.preferences import read_preferences

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_preferences.py"


@pytest.fixture(scope="module")
def mp() -> ModuleType:
    return load_example("make_preferences")


def test_deterministic_for_seed(mp):
    assert mp.generate(7, 50, 10) == mp.generate(7, 50, 10)
    assert mp.generate(7, 50, 10) != mp.generate(8, 50, 10)


def test_chosen_is_one_sentence_and_rejected_is_not(mp):
    train, held_out = mp.generate(0, 400, 60)
    rows = train + held_out
    assert set(mp.one_sentence([r["prompt"] for r in rows], [r["chosen"] for r in rows])) == {1.0}
    assert set(mp.one_sentence([r["prompt"] for r in rows], [r["rejected"] for r in rows])) == {0.0}
    assert all(r["chosen"] in r["rejected"] for r in rows)  # the same answer, buried in the long style
    assert len({r["prompt"] for r in rows}) == len(rows)  # no question asked twice
    kinds = [r["prompt"].split()[0] for r in train]
    assert {"What", "How", "Why"} <= set(kinds)  # facts, definitions, how-tos, advice, explanations


def test_held_out_subjects_never_appear_in_training(mp):
    train, held_out = mp.generate(0, 400, 60)
    subjects = list(mp.COUNTRIES) + [question for _, question, _, _ in mp.TOPICS]

    def mentioned(rows):
        return {s for s in subjects for r in rows if s.lower() in r["prompt"].lower()}

    assert mentioned(held_out) and not mentioned(held_out) & mentioned(train)


def test_files_are_written_and_read_as_preference_pairs(mp, tmp_path):
    mp.main(["--seed", "0", "--train", "40", "--eval", "12", "--out-dir", str(tmp_path)])
    tokenizer = tiny_chat_tokenizer()
    pairs, stats = read_preferences(tmp_path / "data" / "short_answers_train.jsonl", tokenizer, max_seq_len=512)
    assert stats.pairs == 40 and stats.truncated == 0
    assert all(len(p.chosen_ids) < len(p.rejected_ids) for p in pairs)
    held_out, _ = read_preferences(tmp_path / "data" / "short_answers_eval.jsonl", tokenizer, max_seq_len=512)
    assert len(held_out) == 12


@pytest.mark.parametrize(("reply", "one"), [
    ("Paris is the capital of France.", True),
    ("Paris", True),
    ("Use a mild soap, e.g. dish soap, and rinse well.", True),
    ('He said "Stop." Then he left.', False),
    ("Certainly! Paris is the capital.", False),
    ("Steps:\n1. Boil water.", False),
    ("Paris is the capital of France. ", True),
    (" ".join(["word"] * 31) + ".", False),  # longer than MAX_WORDS: not short
])
def test_one_sentence_rule(mp, reply, one):
    assert mp.is_one_sentence(reply) is one


def test_measure_scores_each_reply_and_the_trainer_reports_its_mean_and_stderr(mp):
    from lorafit.evaluation.metrics import mean_and_stderr

    values = mp.one_sentence(["q"] * 4, ["One.", "Two. Three.", "Four.", "Five! Six."])
    assert values == [1.0, 0.0, 1.0, 0.0]
    mean, stderr = mean_and_stderr(values)
    assert mean == 0.5 and stderr == pytest.approx((0.5 * 0.5 / 3) ** 0.5)  # sample std / sqrt(n)
    with pytest.raises(ValueError):
        mean_and_stderr([])
