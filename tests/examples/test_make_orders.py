"""Tests for examples/make_orders.py (loaded from its path: examples/ is not a package)."""

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_orders.py"


@pytest.fixture(scope="module")
def mo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_orders", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations via sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits(mo: ModuleType) -> tuple[list[dict], list[dict]]:
    return mo.generate(seed=0, n_train=400, n_eval=60)


def _user(row: dict) -> str:
    return row["messages"][1]["content"]


def _answer(row: dict) -> dict:
    return json.loads(row["messages"][2]["content"])


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: each {placeholder} matches any text."""
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), re.IGNORECASE)


def test_deterministic_for_seed(mo: ModuleType) -> None:
    assert mo.generate(7, 50, 10) == mo.generate(7, 50, 10)
    assert mo.generate(7, 50, 10) != mo.generate(8, 50, 10)


def test_row_counts_and_roles(mo: ModuleType, splits) -> None:
    train, eval_rows = splits
    assert (len(train), len(eval_rows)) == (400, 60)
    for row in train + eval_rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == mo.SYSTEM_PROMPT


def test_answers_are_canonical_json(mo: ModuleType, splits) -> None:
    for row in splits[0] + splits[1]:
        raw = row["messages"][2]["content"]
        ans = json.loads(raw)
        assert list(ans) == ["item", "color", "quantity", "city"]
        assert raw == json.dumps(ans)
        assert type(ans["quantity"]) is int and 1 <= ans["quantity"] <= 20
        assert ans["item"] in mo.ITEMS  # singular form
        assert ans["item"] == ans["item"].lower() and ans["color"] == ans["color"].lower()
        assert ans["city"] in mo.CITIES


def test_user_mentions_quantity_item_and_city(mo: ModuleType, splits) -> None:
    for row in splits[0] + splits[1]:
        text, ans = _user(row).lower(), _answer(row)
        q = ans["quantity"]
        forms = {str(q), mo.NUMBER_WORDS[q - 1]}
        assert any(re.search(rf"\b{f}\b", text) for f in forms), text
        assert ans["city"].lower() in text
        noun = ans["item"] if q == 1 else mo.ITEMS[ans["item"]]
        assert re.search(rf"\b{ans['color']} {noun}\b", text), text


def test_plurals_include_irregular_forms(mo: ModuleType) -> None:
    assert mo.ITEMS["box"] == "boxes"
    assert mo.ITEMS["knife"] == "knives"


def test_train_eval_disjoint(mo: ModuleType, splits) -> None:
    train, eval_rows = splits
    train_users = [_user(r) for r in train]
    eval_users = [_user(r) for r in eval_rows]
    assert len(set(train_users)) == len(train_users)
    assert len(set(eval_users)) == len(eval_users)
    assert not set(train_users) & set(eval_users)
    held = set(mo.HELD_OUT_PAIRS)
    assert not any((_answer(r)["item"], _answer(r)["city"]) in held for r in train)
    assert any((_answer(r)["item"], _answer(r)["city"]) in held for r in eval_rows)


def test_digit_and_word_quantities_both_present(mo: ModuleType, splits) -> None:
    texts = [_user(r).lower() for r in splits[0]]
    assert any(re.search(r"\b\d+\b", t) for t in texts)
    words = "|".join(mo.NUMBER_WORDS)
    assert any(re.search(rf"\b({words})\b", t) for t in texts)


def test_singular_and_plural_present(splits) -> None:
    quantities = {_answer(r)["quantity"] for r in splits[0]}
    assert 1 in quantities and len(quantities - {1}) > 5


def test_at_least_ten_templates_used(mo: ModuleType, splits) -> None:
    patterns = [_pattern(t) for t in mo.TEMPLATES]
    used = {i for r in splits[0] for i, p in enumerate(patterns) if p.fullmatch(_user(r))}
    assert len(used) >= 10


def test_main_writes_files_atomically(mo: ModuleType, tmp_path: Path) -> None:
    mo.main(["--seed", "3", "--train", "20", "--eval", "5", "--out-dir", str(tmp_path)])
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == ["orders_eval.jsonl", "orders_ood.jsonl", "orders_train.jsonl"]
    train = [json.loads(line) for line in (data / "orders_train.jsonl").read_text().splitlines()]
    assert train == mo.generate(3, 20, 5)[0]
    ood = [json.loads(line) for line in (data / "orders_ood.jsonl").read_text().splitlines()]
    assert ood == mo.generate_ood(3, 60)


def test_committed_files_match_default_generation(mo: ModuleType, splits) -> None:
    data = SCRIPT.parent / "data"
    for name, rows in (("orders_train.jsonl", splits[0]), ("orders_eval.jsonl", splits[1]),
                       ("orders_ood.jsonl", mo.generate_ood(0, 60))):
        lines = (data / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows


def test_disjoint_even_when_collisions_are_likely(mo: ModuleType, monkeypatch) -> None:
    """Shrink the vocabulary so that random draws collide; dedup must still hold."""
    monkeypatch.setattr(mo, "ITEMS", {"mug": "mugs", "teapot": "teapots"})
    monkeypatch.setattr(mo, "COLORS", ("red",))
    monkeypatch.setattr(mo, "CITIES", ("Oslo", "Lisbon"))
    monkeypatch.setattr(mo, "TEMPLATES", mo.TEMPLATES[:1])
    monkeypatch.setattr(mo, "HELD_OUT_PAIRS", (("teapot", "Lisbon"),))
    train, eval_rows = mo.generate(seed=0, n_train=100, n_eval=20)
    users = [_user(r) for r in train + eval_rows]
    assert len(set(users)) == len(users) == 120


@pytest.fixture(scope="module")
def ood(mo: ModuleType) -> list[dict]:
    return mo.generate_ood(seed=0, n=60)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_ood_rows_are_deterministic_canonical_and_unique(mo: ModuleType, ood) -> None:
    assert len(ood) == 60 and ood == mo.generate_ood(0, 60) and ood != mo.generate_ood(1, 60)
    users = [_user(r) for r in ood]
    assert len(set(users)) == 60
    for row in ood:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == mo.SYSTEM_PROMPT
        raw, ans = row["messages"][2]["content"], _answer(row)
        assert raw == json.dumps(ans) and list(ans) == ["item", "color", "quantity", "city"]
        text, q = _user(row).lower(), ans["quantity"]
        assert str(q) in re.findall(r"\d+", text) or re.search(rf"\b{mo.number_words(q)}\b", text), text
        noun = ans["item"] if q == 1 else mo.OOD_ITEMS[ans["item"]]
        assert re.search(rf"\b{ans['color']} {noun}\b", text) and ans["city"].lower() in text, text


def test_ood_values_and_phrasings_never_occur_in_train_or_eval(mo: ModuleType, splits, ood) -> None:
    seen = splits[0] + splits[1]
    seen_answers = [_answer(r) for r in seen]
    ood_answers = [_answer(r) for r in ood]
    for key in ("item", "color", "quantity", "city"):
        assert not {a[key] for a in ood_answers} & {a[key] for a in seen_answers}, key
    assert min(a["quantity"] for a in ood_answers) > max(a["quantity"] for a in seen_answers)
    # no held-out value appears anywhere in a train/eval sentence (plurals and number words included)
    seen_words = set().union(*(_words(_user(r)) for r in seen))
    ood_values = {*mo.OOD_ITEMS, *mo.OOD_ITEMS.values(), *mo.OOD_COLORS,
                  *(w for city in mo.OOD_CITIES for w in _words(city))}
    ood_values |= {w for q in mo.OOD_QUANTITIES for w in _words(mo.number_words(q))} - set(mo.NUMBER_WORDS)
    assert not ood_values & seen_words, ood_values & seen_words
    # no OOD phrasing is a train template, and no sentence of one matches a train template
    assert not set(mo.OOD_TEMPLATES) & set(mo.TEMPLATES)
    assert not any(_pattern(t).fullmatch(_user(r)) for r in ood for t in mo.TEMPLATES)
    used = {t for r in ood for t in mo.OOD_TEMPLATES if _pattern(t).fullmatch(_user(r))}
    assert len(used) == len(mo.OOD_TEMPLATES)  # every held-out phrasing is used


def test_number_words(mo: ModuleType) -> None:
    assert [mo.number_words(q) for q in (1, 20, 21, 40, 99)] == ["one", "twenty", "twenty-one", "forty", "ninety-nine"]
    with pytest.raises(ValueError, match="quantity=100"):
        mo.number_words(100)
