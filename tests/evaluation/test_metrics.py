"""Tests for lorafit.evaluation.metrics."""

import pytest

from lorafit.evaluation import exact_match, json_exact_match, json_strict_match, score

REF = '{"item": "mug", "color": "red", "quantity": 3, "city": "Oslo"}'


def test_exact_match_strips_whitespace_and_end_of_turn() -> None:
    assert exact_match(f"  {REF}<|im_end|>\n", REF)
    assert exact_match(f"{REF} <|im_end|>", f"{REF}\n")


def test_exact_match_is_strict_about_content() -> None:
    assert not exact_match(REF.replace("Oslo", "oslo"), REF)
    assert not exact_match(f"Sure! {REF}", REF)


def test_json_ignores_key_order() -> None:
    shuffled = '{"city": "Oslo", "quantity": 3, "item": "mug", "color": "red"}'
    assert json_exact_match(shuffled, REF)
    assert not exact_match(shuffled, REF)


def test_json_distinguishes_int_from_string() -> None:
    assert not json_exact_match(REF.replace(": 3", ': "3"'), REF)


def test_json_prose_is_false() -> None:
    assert not json_exact_match("The order is three red mugs to Oslo.", REF)
    assert not json_exact_match('{"item": "mug", "color": ', REF)
    assert not json_exact_match("", REF)


def test_json_accepts_fences_and_surrounding_text() -> None:
    assert json_exact_match(f"```json\n{REF}\n```<|im_end|>", REF)
    assert json_exact_match(f"Here you go: {{not json}} {REF} Hope that helps!", REF)


def test_json_detects_wrong_value_and_extra_key() -> None:
    assert not json_exact_match(REF.replace("red", "blue"), REF)
    assert not json_exact_match(REF.replace("}", ', "note": "x"}'), REF)


def test_score_counts_and_accuracy() -> None:
    preds = [REF, f"```{REF}```", "no idea", REF.replace("3", "4")]
    assert score(preds, [REF] * 4, "json") == {
        "metric": "json", "correct": 2, "total": 4, "accuracy": 0.5,
    }
    assert score(preds, [REF] * 4, "exact")["correct"] == 1


def test_score_unknown_metric_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="exact.*json"):
        score([REF], [REF], "bleu")


def test_score_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        score([REF, REF], [REF], "exact")


def test_json_takes_the_first_object_and_ignores_the_rest() -> None:
    # the lenient metric looks no further than the first object: a wrong second object does not count against it
    assert json_exact_match(f'{REF} {{"item": "lamp"}}', REF)
    assert not json_exact_match(f'{{"item": "lamp"}} {REF}', REF)


def test_json_strict_needs_the_whole_reply_to_be_the_object() -> None:
    shuffled = '{"city": "Oslo", "quantity": 3, "item": "mug", "color": "red"}'
    assert json_strict_match(shuffled, REF)  # key order still ignored
    assert json_strict_match(f"  {REF}\n<|im_end|>", REF)  # whitespace and end-of-turn tokens are not content
    assert not json_strict_match(f"```json\n{REF}\n```", REF)
    assert not json_strict_match(f"Here you go: {REF}", REF)
    assert not json_strict_match(f"{REF} Hope that helps!", REF)
    assert not json_strict_match(f"{REF}{REF}", REF)
    assert not json_strict_match(REF.replace(": 3", ': "3"'), REF)
    assert not json_strict_match("[1, 2]", REF)


def test_json_strict_reference_without_object_raises() -> None:
    with pytest.raises(ValueError, match="no JSON object"):
        json_strict_match(REF, "no json here")


def test_score_json_strict_and_the_run_config_accepts_it(tmp_path) -> None:
    from lorafit.run_config import load_run_config

    (tmp_path / "run.yaml").write_text("model: tiny\ndata: {train: t.jsonl}\nevaluation: {metric: json_strict}\n")
    assert load_run_config(tmp_path / "run.yaml").evaluation.metric == "json_strict"
    preds = [REF, f"```{REF}```", f"Sure: {REF}", "no idea"]
    assert score(preds, [REF] * 4, "json_strict") == {"metric": "json_strict", "correct": 1, "total": 4,
                                                      "accuracy": 0.25}
    assert score(preds, [REF] * 4, "json")["correct"] == 3


def test_contains_finds_the_reference_inside_a_sentence() -> None:
    from lorafit.evaluation import contains_match

    assert contains_match("The capital of France is Paris.<|im_end|>", " Paris\n")
    assert not contains_match("The capital of France is paris.", "Paris")  # case-sensitive, like exact
    assert score(["It is Paris.", "Lyon"], ["Paris", "Paris"], "contains")["correct"] == 1
    with pytest.raises(ValueError, match="reference is empty"):
        contains_match("anything", "  <|im_end|>")
