"""Eval-vs-train distance on a tiny synthetic pair whose figures are worked out by hand in the comments."""

from __future__ import annotations

import json

import pytest

from lorafit.data import Example
from lorafit.diagnose.dataset_audit import audit_dataset
from lorafit.diagnose.eval_distance import eval_distance, template
from lorafit.run_config import DataConfig, EvalSetConfig, EvaluationConfig, RunConfig


def order(user: str, item: str, color: str, quantity: int, city: str) -> Example:
    reply = json.dumps({"item": item, "color": color, "quantity": quantity, "city": city})
    return Example(source="x", messages=[{"role": "system", "content": "Extract the order."},
                                         {"role": "user", "content": user}, {"role": "assistant", "content": reply}])


TRAIN = [order("Send 3 red mugs to Oslo.", "mug", "red", 3, "Oslo"),
         order("Please ship two blue lamps to Lima.", "lamp", "blue", 2, "Lima")]
EVAL = [order("Send 5 red mugs to Lima.", "mug", "red", 5, "Lima"),  # train[0]'s template; 5 is new
        order("Please ship two blue lamps to Oslo.", "lamp", "blue", 2, "Oslo"),  # train[1]'s template; values seen
        order("Could you mail a green teapot to Buenos Aires?", "teapot", "green", 1, "Buenos Aires"),
        Example(source="x", messages=[{"role": "user", "content": "Hello there."},
                                      {"role": "assistant", "content": "Hi."}])]


def test_template_masks_each_slot_kind():
    reply = '{"item": "knife", "color": "red"}'
    masked = template('Please send "Big Tom" 12 red knives, 3pm, to New Buenos Aires. I\'d pay. Oslo is far', reply)
    # "Please" and "Oslo" start sentences (kept), "I'd" is no name, "New Buenos Aires" is one name, "knives" is the
    # reply's "knife", "3pm" holds a digit; "to"/"is"/"far" are not in the reply.
    assert masked.template == "please send <quote> <num> <value> <value> , <num> , to <name> . i'd pay . oslo is far"
    assert masked.values == {"big tom", "12", "red", "knife", "3pm", "new buenos aires"}
    assert template("Ship twenty mugs and 20 cups.").values == {"20"}  # number words count as their digits
    assert template("Send the mugs", '{"the": "send"}').template == "<value> the mugs"  # stop words never copied


def test_figures_match_the_hand_computation():
    d = eval_distance(TRAIN, EVAL)
    # templates: eval rows 1 and 2 reuse train templates, 3 and 4 do not -> 2/4
    assert d.template_share == 0.5 and d.eval_rows == 4
    # slot values: rows 1-3 have slots; only row 2's {2, blue, lamp, oslo} are all in train (5, teapot, green,
    # buenos aires are not) -> 1/3
    assert d.rows_with_slots == 3 and d.slot_value_share == pytest.approx(1 / 3)
    # 4-grams: row 1 has 3 (none in train), row 2 has 4 (3 in train: all but "blue lamps to oslo"), row 3 has 6
    # (none), row 4 none (2 words) -> 3/13
    assert d.eval_ngrams == 13 and d.ngram_overlap == pytest.approx(3 / 13)
    assert d.unseen_values == ["5", "buenos aires", "green", "teapot"]
    assert d.in_distribution  # template share 0.5 reaches the threshold
    farther = eval_distance(TRAIN, [EVAL[0], EVAL[2], EVAL[3]])  # templates 1/3, 4-grams 0/9
    assert farther.template_share == pytest.approx(1 / 3) and farther.ngram_overlap == 0
    assert not farther.in_distribution


def test_wording_and_values_alone_also_count_as_in_distribution():
    # a different template (extra "now"), but 4 of 5 4-grams and every value seen in train
    rephrased = [order("Please ship two blue lamps to Lima now.", "lamp", "blue", 2, "Lima")]
    d = eval_distance(TRAIN, rephrased)
    assert d.template_share == 0 and d.ngram_overlap == pytest.approx(4 / 5) and d.slot_value_share == 1
    assert d.in_distribution


def test_empty_eval_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        eval_distance(TRAIN, [])


def test_audit_reports_every_eval_set(tmp_path):
    from tiny_models import tiny_chat_tokenizer

    def write(name: str, rows: list[Example]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"messages": e.messages}) + "\n" for e in rows))
        return str(path)

    config = RunConfig(model="tiny", data=DataConfig(train=write("train.jsonl", TRAIN), eval=write("eval.jsonl", EVAL)),
                       evaluation=EvaluationConfig(sets={"ood": EvalSetConfig(path=write("ood.jsonl", EVAL[2:]))}))
    audit = audit_dataset(config, tiny_chat_tokenizer())
    assert audit.eval_distance["eval"]["template_share"] == 0.5 and audit.eval_distance["eval"]["in_distribution"]
    assert audit.eval_distance["ood"]["template_share"] == 0 and not audit.eval_distance["ood"]["in_distribution"]
    warnings = [f for f in audit.findings if f.code == "eval_in_distribution"]
    assert len(warnings) == 1 and warnings[0].message.startswith("eval: your eval set is in-distribution")
    assert "shared templates 50.0% of 4 rows" in warnings[0].message
    assert "ood vs train: shared templates 0.0%" in audit.to_text()
