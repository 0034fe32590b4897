"""Tests for examples/make_orders.py (loaded from its path: examples/ is not a package)."""

import hashlib
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from example_scripts import load_example

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_orders.py"


@pytest.fixture(scope="module")
def mo() -> ModuleType:
    return load_example("make_orders")


@pytest.fixture(scope="module")
def splits(mo: ModuleType) -> tuple[list[dict], list[dict]]:
    """The previous quickstart's recipe (copy-teaching + broad phrasing, 400 rows); the wide pools: rich_splits."""
    return mo.generate(seed=0, n_train=400, n_eval=60, copy_share=0.5, broad=True, rich_share=0.0)


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


def _is_made_up(mo: ModuleType, answer: dict) -> bool:
    """A copy-teaching row: its item is no train item (a pseudo-word, or one before a train noun)."""
    return answer["item"] not in mo.ITEMS


def _plural(mo: ModuleType, item: str) -> str:
    """The plural the generator writes: the irregular table for train nouns (also last in a compound), else regular."""
    *head, noun = item.split(" ")
    return " ".join([*head, mo.ITEMS[noun] if noun in mo.ITEMS else mo.regular_plural(noun)])


def test_answers_are_canonical_json(mo: ModuleType, splits) -> None:
    for row in splits[0] + splits[1]:
        raw = row["messages"][2]["content"]
        ans = json.loads(raw)
        assert list(ans) == ["item", "color", "quantity", "city"]
        assert raw == json.dumps(ans, ensure_ascii=False)
        q = ans["quantity"]
        assert type(q) is int and (1 <= q <= 20 or 100 <= q <= 999)
        assert ans["item"] == ans["item"].lower() and ans["color"] == ans["color"].lower()
        if not _is_made_up(mo, ans):
            assert ans["color"] in mo.COLORS and ans["city"] in mo.CITIES


def test_eval_rows_use_real_vocabulary_only(mo: ModuleType, splits) -> None:
    for ans in map(_answer, splits[1]):
        assert ans["item"] in mo.ITEMS and ans["color"] in mo.COLORS and ans["city"] in mo.CITIES


def test_user_mentions_quantity_item_colour_and_city(mo: ModuleType, splits) -> None:
    for row in splits[0] + splits[1]:
        text, ans = _user(row).lower(), _answer(row)
        q = ans["quantity"]
        forms = {str(q), mo.number_words(q) if mo.has_words(q) else str(q)} | ({"a", "an"} if q == 1 else set())
        assert any(re.search(rf"(^|\s){f}\b", text) for f in forms), text
        assert ans["city"].lower() in text and re.search(rf"\b{ans['color']}\b", text), text
        noun = ans["item"] if q == 1 else _plural(mo, ans["item"])
        assert re.search(rf"\b{noun}\b", text), text


@pytest.fixture(scope="module")
def copy_splits(mo: ModuleType) -> tuple[list[dict], list[dict]]:
    return mo.generate(seed=0, n_train=400, n_eval=60, copy_share=0.5, broad=True, rich_share=0.0)


def test_copy_recipe_rows_are_canonical_and_mention_their_values(mo: ModuleType, copy_splits) -> None:
    test_answers_are_canonical_json(mo, copy_splits)
    test_eval_rows_use_real_vocabulary_only(mo, copy_splits)
    test_user_mentions_quantity_item_colour_and_city(mo, copy_splits)
    test_ood_values_and_phrasings_never_occur_in_train_or_eval(mo, copy_splits, mo.generate_ood(0, 60))


def test_copy_teaching_share_and_made_up_values(mo: ModuleType, copy_splits) -> None:
    """Half the train rows order made-up things, none of them a value or word of the OOD pools or of train."""
    made_up = [a for a in map(_answer, copy_splits[0]) if _is_made_up(mo, a)]
    assert len(made_up) == 200
    words = {w for a in made_up for key in ("item", "color", "city") for w in a[key].lower().split()}
    ood_words = {w for value in (*mo.OOD_ITEMS, *mo.OOD_ITEMS.values(), *mo.OOD_COLORS, *mo.OOD_CITIES)
                 for w in value.lower().split()}
    assert not words & ood_words, words & ood_words
    assert {a["city"] for a in made_up}.isdisjoint(mo.CITIES)
    assert any(" " in a["city"] for a in made_up) and any(" " in a["color"] for a in made_up)  # "pale green"
    assert not any(" " in a["item"] for a in made_up)  # compound items are off by default (ambiguous)


def test_compound_share_makes_two_word_items(mo: ModuleType) -> None:
    compound, _ = mo.generate(0, 400, 60, copy_share=0.5, broad=True, compound_share=0.2, rich_share=0.0)
    two_words = [a for a in map(_answer, compound) if " " in a["item"]]
    assert 0.1 * 200 < len(two_words) < 0.3 * 200
    assert all(a["item"].split()[-1] in mo.ITEMS for a in two_words)


def test_plain_recipe_reproduces_the_first_quickstart_data(mo: ModuleType) -> None:
    """--copy-share 0 --no-broad is the generator before copy-teaching: its files' sha256."""
    train, eval_rows = mo.generate(0, 400, 60, copy_share=0.0, broad=False, rich_share=0.0)
    digest = {name: hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
              .hexdigest() for name, rows in (("train", train), ("eval", eval_rows))}
    assert digest == {"train": "3c53b7584880be22bedfc26d42d7b7099ca782abfc82fb4924e1c8a53bf8ca56",
                      "eval": "c3f047a7f1267b394ce82f83a61772679945da3f5f3548b59d370820ac0ab373"}


def test_pseudo_words_and_regular_plurals(mo: ModuleType) -> None:
    import random
    rng = random.Random(0)
    words = [mo.pseudo_word(rng, 2) for _ in range(500)]
    assert all(w.isalpha() and w.islower() and len(w) >= 4 and w not in mo.FORBIDDEN_WORDS for w in words)
    assert len(set(words)) > 400  # varied, not a handful recycled
    assert [mo.regular_plural(w) for w in ("drelok", "flamax", "voomish", "tabus", "kelch")] == \
        ["dreloks", "flamaxes", "voomishes", "tabuses", "kelches"]


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
    assert train == mo.mix_in_replay(mo.generate(3, 20, 5)[0], mo.REPLAY_FILE, mo.DEFAULT_REPLAY_SHARE, seed=3)
    ood = [json.loads(line) for line in (data / "orders_ood.jsonl").read_text().splitlines()]
    assert ood == mo.generate_ood(3, 60)


def test_committed_files_match_default_generation(mo: ModuleType, tmp_path: Path) -> None:
    """`python examples/make_orders.py` with its defaults rewrites the committed files byte for byte."""
    mo.main(["--out-dir", str(tmp_path)])
    for name in ("orders_train.jsonl", "orders_eval.jsonl", "orders_ood.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == (SCRIPT.parent / "data" / name).read_bytes(), name


def test_disjoint_even_when_collisions_are_likely(mo: ModuleType, monkeypatch) -> None:
    """Shrink the vocabulary so that random draws collide; dedup must still hold."""
    monkeypatch.setattr(mo, "ITEMS", {"mug": "mugs", "teapot": "teapots"})
    monkeypatch.setattr(mo, "COLORS", ("red",))
    monkeypatch.setattr(mo, "CITIES", ("Oslo", "Lisbon"))
    monkeypatch.setattr(mo, "TEMPLATES", mo.TEMPLATES[:1])
    monkeypatch.setattr(mo, "HELD_OUT_PAIRS", (("teapot", "Lisbon"),))
    train, eval_rows = mo.generate(seed=0, n_train=100, n_eval=20, copy_share=0.0, broad=False, rich_share=0.0)
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
        assert raw == json.dumps(ans, ensure_ascii=False) and list(ans) == ["item", "color", "quantity", "city"]
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
    assert not {a["quantity"] for a in seen_answers} & set(mo.OOD_QUANTITIES)
    # no held-out value appears anywhere in a train/eval sentence (plurals and number words included)
    seen_words = set().union(*(_words(_user(r)) for r in seen))
    ood_values = {*mo.OOD_ITEMS, *mo.OOD_ITEMS.values(), *mo.OOD_COLORS,
                  *(w for city in mo.OOD_CITIES for w in _words(city))}
    ood_values |= {w for q in mo.OOD_QUANTITIES for w in _words(mo.number_words(q))} - set(mo.NUMBER_WORDS)
    assert not ood_values & seen_words, ood_values & seen_words
    # no OOD phrasing is a train template, and no sentence of one matches a train template
    train_templates = mo.TEMPLATES + mo.BROAD_TEMPLATES
    assert not set(mo.OOD_TEMPLATES) & set(train_templates)
    assert not any(_pattern(t).fullmatch(_user(r)) for r in ood for t in train_templates)
    used = {t for r in ood for t in mo.OOD_TEMPLATES if _pattern(t).fullmatch(_user(r))}
    assert len(used) == len(mo.OOD_TEMPLATES)  # every held-out phrasing is used


def test_number_words(mo: ModuleType) -> None:
    assert [mo.number_words(q) for q in (1, 20, 21, 40, 99)] == ["one", "twenty", "twenty-one", "forty", "ninety-nine"]
    assert [mo.number_words(q) for q in (100, 512, 920)] == ["one hundred", "five hundred and twelve",
                                                             "nine hundred and twenty"]
    for unspellable in (0, 121, 1000):
        assert not mo.has_words(unspellable)
        with pytest.raises(ValueError, match=f"quantity={unspellable}"):
            mo.number_words(unspellable)


INDEPENDENT_FILES = [SCRIPT.parent / "data" / name
                     for name in ("orders_independent.jsonl", "orders_independent2.jsonl")]


@pytest.fixture(scope="module")
def rich_splits(mo: ModuleType) -> tuple[list[dict], list[dict]]:
    return mo.generate(seed=0, n_train=600, n_eval=60, copy_share=0.4, broad=True, rich_share=0.5)


def _rich_quantity_forms(mo: ModuleType, q: int) -> set[str]:
    forms = {str(q), f"{q:,}"} | ({mo.number_words(q)} if mo.has_words(q) else set())
    forms |= {text for text, value in mo.QUANTITY_IDIOMS if value == q} | ({"a", "an"} if q == 1 else set())
    return forms | ({f"{mo.THOUSAND_WORDS[q // 1000 - 1]} thousand"} if q % 1000 == 0 and q <= 10000 else set())


def test_rich_pools_hold_no_held_out_value(mo: ModuleType) -> None:
    """The wide pools share no word with the OOD pools and no value with the independently written sets."""
    rich_values = [*mo.RICH_ITEMS, *mo.RICH_ITEMS.values(), *mo.RICH_COLORS, *mo.RICH_CITIES]
    ood_words = {w for value in (*mo.OOD_ITEMS, *mo.OOD_ITEMS.values(), *mo.OOD_COLORS, *mo.OOD_CITIES)
                 for w in _words(value)}
    assert not {w for value in rich_values for w in _words(value)} & ood_words
    held_out: dict[str, set] = {"item": set(), "color": set(), "city": set()}
    for path in INDEPENDENT_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            answer = _answer(json.loads(line))
            for key, values in held_out.items():
                values.add(answer[key])
    assert all(len(values) >= 70 for values in held_out.values())  # both files were read
    assert not set(mo.RICH_ITEMS) & held_out["item"]
    assert not set(mo.RICH_COLORS) & held_out["color"]
    assert not set(mo.RICH_CITIES) & held_out["city"]


def test_rich_rows_are_canonical_and_mention_their_values(mo: ModuleType, rich_splits) -> None:
    train, eval_rows = rich_splits
    test_eval_rows_use_real_vocabulary_only(mo, rich_splits)
    test_ood_values_and_phrasings_never_occur_in_train_or_eval(mo, rich_splits, mo.generate_ood(0, 60))
    users = [_user(r) for r in train + eval_rows]
    assert len(set(users)) == len(users)
    for row in train:
        raw, ans, text = row["messages"][2]["content"], _answer(row), _user(row)
        assert raw == json.dumps(ans, ensure_ascii=False) and list(ans) == ["item", "color", "quantity", "city"]
        q = ans["quantity"]
        assert type(q) is int and (1 <= q <= 20 or 100 <= q <= 10000), q
        assert any(re.search(rf"(^|[\s(]){re.escape(f)}\b", text.lower()) for f in _rich_quantity_forms(mo, q)), text
        assert ans["city"] in text and re.search(rf"\b{re.escape(ans['color'])}\b", text.lower()), text
        plural = {**mo.ITEMS, **mo.RICH_ITEMS}.get(ans["item"]) or _plural(mo, ans["item"])
        assert re.search(rf"\b{re.escape(ans['item'] if q == 1 else plural)}\b", text.lower()), text


def test_rich_recipe_mixes_its_parts(mo: ModuleType, rich_splits) -> None:
    answers = [_answer(r) for r in rich_splits[0]]
    rich = [a for a in answers if a["item"] in mo.RICH_ITEMS and a["color"] in mo.RICH_COLORS
            and a["city"] in mo.RICH_CITIES]
    assert len(rich) >= 180  # the 30% wide-pool rows (copy rows may draw from the pools too)
    assert sum(" " in a["item"] for a in rich) > 40 and sum(a["quantity"] >= 1000 for a in answers) > 30
    users = [_user(r) for r in rich_splits[0]]
    assert any("dozen" in u for u in users) and any("pair of" in u for u in users)
    assert sum(any(u.startswith(p.split("{")[0]) for p in mo.RICH_PREFIXES) for u in users) > 30


def test_rich_copy_rows_never_make_up_both_item_and_colour(mo: ModuleType, rich_splits) -> None:
    """Next to each other, two made-up words leave the colour/item boundary a guess: one side is always real."""
    known_items = {*mo.ITEMS, *mo.RICH_ITEMS}
    known_colors = {*mo.COLORS, *mo.RICH_COLORS}
    made_up = [a for a in map(_answer, rich_splits[0]) if a["item"] not in known_items]
    assert len(made_up) > 80
    assert all(a["color"] in known_colors for a in made_up)
    made_up_colours = [a for a in map(_answer, rich_splits[0]) if a["color"] not in known_colors]
    assert len(made_up_colours) > 40 and all(a["item"] in known_items for a in made_up_colours)


def test_replay_rows_make_up_their_share(mo: ModuleType, tmp_path: Path) -> None:
    replay = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
              for i in range(50)]
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in replay))
    train = mo.generate(0, 80, 10)[0]
    mixed = mo.mix_in_replay(train, path, 0.2, seed=0)
    assert len(mixed) == 100 and sum(r in replay for r in mixed) == 20
    assert sorted(map(json.dumps, (r for r in mixed if r not in replay))) == sorted(map(json.dumps, train))
    assert mixed == mo.mix_in_replay(train, path, 0.2, seed=0) and mixed != mo.mix_in_replay(train, path, 0.2, 1)
    assert mo.mix_in_replay(train, path, 0.0, seed=0) == train
    with pytest.raises(ValueError, match="50 rows, 320 needed"):
        mo.mix_in_replay(train, path, 0.8, seed=0)
