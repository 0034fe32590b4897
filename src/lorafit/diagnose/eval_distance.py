"""How far an eval set is from the training set, beyond exact duplicates: shared templates, slot values, n-grams.

An eval split drawn from the same generator as train (same phrasings, same names and numbers) scores what the
model memorised, not whether it generalises. Three figures, all on the prompt side of each row (the user turns of a
chat, the whole text of a plain-text row; system prompts are left out because they are usually one shared
instruction):

- **template share**: share of eval rows whose *template* also occurs in train. The template is the prompt with
  its slot-like tokens masked (see `template`): numbers, names, quoted strings and words the reply copies.
- **slot-value share**: among eval rows with at least one slot, the share whose slot values all occur as slot
  values somewhere in train (the model has seen every value it must reproduce).
- **4-gram overlap**: share of the eval prompts' word 4-grams (every position, lower-cased, unmasked) that occur in
  train prompts.

Slot-like tokens, in order of precedence (a token takes the first class it fits):
1. `<quote>`: a quoted span: "...", “...”, or '...' opened after a non-word character (so "I'd" is no quote).
2. `<num>`: a word containing a digit ("12", "3pm", "A-7") or an English number word (zero..twenty, the tens,
   hundred, thousand, million, billion, dozen). Number words up to ninety count as their digits ("two" == "2").
3. `<name>`: a capitalised word that does not start a sentence (text start or after . ! ? or a line break), other
   than "I" and its contractions; adjacent capitalised words form one name ("Buenos Aires").
4. `<value>`: a word of 3+ letters, not a stop word, that the row's reply contains, itself or as its singular
   ("mugs" -> "mug", "boxes" -> "box", "knives" -> "knife"): values the answer copies out of the prompt.
A capitalised first word of a sentence is a name only through rule 4 (the reply copies it); otherwise sentence
starts ("Please", "Send") stay template words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from lorafit.data import Example
from lorafit.errors import UserError

# Thresholds of the in-distribution warning (see in_distribution()).
TEMPLATE_SHARE_HIGH = 0.5
NGRAM_OVERLAP_HIGH = 0.6
SLOT_SHARE_HIGH = 0.8
NGRAM = 4
SHOWN_VALUES = 5

_TOKEN = re.compile(r"""(?P<quote>"[^"\n]*"|“[^”\n]*”|(?<!\w)'[^'\n]+'(?!\w))"""
                    r"""|(?P<word>\w+(?:['’-]\w+)*)|(?P<punct>[^\w\s])|(?P<newline>\n)""")
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_SENTENCE_END = {".", "!", "?", "\n"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS |= {w: str(10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)}
_NUMBER_WORDS |= {w: w for w in ("hundred", "thousand", "million", "billion", "dozen")}
_PRONOUN_I = {"i", "i'd", "i'm", "i'll", "i've", "i’d", "i’m", "i’ll", "i’ve"}
_STOP_WORDS = frozenset(
    "the and for with that this you your are was were have has had not but from they them their what which who "
    "how why when where can could would should will please into about our out all any its his her she him there "
    "here some more most than then also just only very like want need get got make made does did done been being "
    "over under each other such these those may might must shall let yes".split())


@dataclass(frozen=True)
class EvalDistance:
    """The three figures for one eval set against train, with the counts they rest on."""

    eval_rows: int
    template_share: float  # eval rows whose template occurs in train / eval rows
    slot_value_share: float | None  # eval rows whose slot values all occur in train / eval rows with slots
    rows_with_slots: int
    ngram_overlap: float | None  # eval 4-gram occurrences seen in train / eval 4-gram occurrences
    eval_ngrams: int
    unseen_values: list[str]  # a few eval slot values that train never has

    @property
    def in_distribution(self) -> bool:
        """Most eval rows reuse a train phrasing, or the eval wording and values both largely repeat train.

        template_share >= 0.5: at least half the score comes from sentences the model saw with other values;
        4-gram overlap >= 0.6 together with slot-value share >= 0.8: most of the wording and nearly every value
        was in train, even where whole templates differ. Either way the eval rewards recall, not transfer.
        """
        wording = ((self.ngram_overlap or 0.0) >= NGRAM_OVERLAP_HIGH
                   and (self.slot_value_share or 0.0) >= SLOT_SHARE_HIGH)
        return self.template_share >= TEMPLATE_SHARE_HIGH or wording

    def to_text(self) -> str:
        slots = f"{self.slot_value_share:.1%} of {self.rows_with_slots}" if self.slot_value_share is not None else "n/a"
        ngrams = f"{self.ngram_overlap:.1%} of {self.eval_ngrams}" if self.ngram_overlap is not None else "n/a"
        return (f"shared templates {self.template_share:.1%} of {self.eval_rows} rows, all slot values seen in train "
                f"{slots} rows, {NGRAM}-grams seen in train {ngrams}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "in_distribution": self.in_distribution}


@dataclass(frozen=True)
class Masked:
    """A prompt with its slots masked: the template string and the slot values (normalised)."""

    template: str
    values: frozenset[str]


def template(prompt: str, reply: str = "") -> Masked:
    """The prompt's template (slot-like tokens replaced by <quote>, <num>, <name>, <value>; other words lower-cased,
    joined by single spaces) and its slot values (lower-cased; number words as digits). See the module docstring."""
    reply_words = {w.casefold() for w in _WORD.findall(reply)}
    parts: list[str] = []
    values: set[str] = set()
    sentence_start = True
    last_name: str | None = None  # the name just before, to join "Buenos Aires" into one slot
    for match in _TOKEN.finditer(prompt):
        kind, text = match.lastgroup, match.group()
        word = text.casefold()
        slot, value = None, None
        if kind == "quote":
            slot, value = "<quote>", text[1:-1].strip().casefold()
        elif kind == "word" and (any(c.isdigit() for c in text) or word in _NUMBER_WORDS):
            slot, value = "<num>", _NUMBER_WORDS.get(word, word)
        elif kind == "word" and text[0].isupper() and not sentence_start and word not in _PRONOUN_I:
            slot, value = "<name>", word
        elif kind == "word" and (copied := _copied(word, reply_words)):
            slot, value = "<value>", copied
        if slot == "<name>" and last_name is not None and prompt[match.start() - 1] == " ":
            values.discard(last_name)
            value = f"{last_name} {value}"
        elif slot is not None:
            parts.append(slot)
        else:
            parts.append("\\n" if kind == "newline" else word)
        if value is not None:
            values.add(value)
        last_name = value if slot == "<name>" else None
        sentence_start = text in _SENTENCE_END
    return Masked(" ".join(parts), frozenset(values))


def eval_distance(train: Iterable[Example], evaluation: Iterable[Example]) -> EvalDistance:
    """The template share, slot-value share and 4-gram overlap of `evaluation` against `train` (rows as read by
    lorafit.data); raises ValueError when the eval set is empty."""
    train, evaluation = list(train), list(evaluation)
    if not evaluation:
        raise UserError("the eval set holds no rows to compare with train")
    train_masked = [template(*_prompt_and_reply(e)) for e in train]
    eval_masked = [template(*_prompt_and_reply(e)) for e in evaluation]
    train_templates = {m.template for m in train_masked}
    train_values = set().union(*(m.values for m in train_masked))
    with_slots = [m for m in eval_masked if m.values]
    unseen = sorted({v for m in with_slots for v in m.values - train_values})
    train_ngrams = set().union(*(_ngrams(_prompt_and_reply(e)[0]) for e in train))
    eval_ngrams = [g for e in evaluation for g in _ngrams(_prompt_and_reply(e)[0])]
    return EvalDistance(
        eval_rows=len(eval_masked),
        template_share=sum(m.template in train_templates for m in eval_masked) / len(eval_masked),
        slot_value_share=(sum(m.values <= train_values for m in with_slots) / len(with_slots)) if with_slots else None,
        rows_with_slots=len(with_slots),
        ngram_overlap=(sum(g in train_ngrams for g in eval_ngrams) / len(eval_ngrams)) if eval_ngrams else None,
        eval_ngrams=len(eval_ngrams),
        unseen_values=unseen[:SHOWN_VALUES],
    )


def _prompt_and_reply(example: Example) -> tuple[str, str]:
    """(user turns, assistant turns) of a chat, each joined by line breaks; (text, "") for a plain-text row."""
    if example.messages is None:
        return example.text or "", ""
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    replies = [m["content"] for m in example.messages if m["role"] == "assistant"]
    return "\n".join(users), "\n".join(replies)


def _copied(word: str, reply_words: set[str]) -> str | None:
    """The reply word that `word` is (itself, or its singular), for content words of 3+ letters; else None."""
    if len(word) < 3 or not word.isalpha() or word in _STOP_WORDS:
        return None
    candidates = [word]
    if word.endswith("ves"):
        candidates += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        candidates.append(word[:-2])
    if word.endswith("s"):
        candidates.append(word[:-1])
    return next((c for c in candidates if c in reply_words), None)


def _ngrams(prompt: str) -> list[tuple[str, ...]]:
    words = [w.casefold() for w in _WORD.findall(prompt)]
    return [tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


__all__ = ["NGRAM", "EvalDistance", "Masked", "eval_distance", "template"]
