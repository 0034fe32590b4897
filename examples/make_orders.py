"""Generate the quickstart's synthetic order-extraction dataset.

Each row is a chat ``{"messages": [system, user, assistant]}`` where the user
describes an order in one sentence and the assistant answers with the order as
JSON. Output is deterministic for a given ``--seed``.

    python examples/make_orders.py --seed 0 --train 400 --eval 60 --ood 60

Besides train and eval (one generator: same phrasings, items, colours, cities and
quantities), it writes ``orders_ood.jsonl``: the same task built only from held-out
pools (items, colours, cities and phrasings that never occur in train, quantities
21-99 that train never has). Eval measures what the adapter memorised; the OOD
file measures whether it learned to copy values it never saw.

Two levers make the adapter copy rather than recall (benchmarks/generalisation.py
measures them on the OOD file):

- copy-teaching (``--copy-share``): that share of the train rows orders made-up
  things: pronounceable pseudo-word items with regular plurals (some two words),
  pseudo-word or shaded colours, pseudo-word and multi-word cities. Recalling a
  value cannot answer them; copying the span from the sentence can.
- broad phrasing (``--broad``): more train phrasings (colour after the item,
  city first, terse and chatty ones), a lower-case first letter or no final
  punctuation now and then, "a"/"an" for one, and quantities 100-999 (digits, or
  words for whole hundreds plus 0-20).

Neither ever uses a value or phrasing of the OOD pools (every word of them is
refused), and the eval split stays real-vocabulary orders in the train phrasings.
The quickstart data is copy-teaching + broad phrasing (``--copy-share 0.5 --broad``, the defaults: see
DEFAULT_COPY_SHARE for the measurements); ``--copy-share 0 --no-broad`` writes the first, plain recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPT = "Extract the order as JSON with keys item, color, quantity, city."

# singular -> plural
ITEMS: dict[str, str] = {
    "mug": "mugs",
    "lamp": "lamps",
    "box": "boxes",
    "knife": "knives",
    "shelf": "shelves",
    "scarf": "scarves",
    "watch": "watches",
    "brush": "brushes",
    "glass": "glasses",
    "dress": "dresses",
    "bench": "benches",
    "chair": "chairs",
    "bottle": "bottles",
    "candle": "candles",
    "backpack": "backpacks",
    "umbrella": "umbrellas",
    "notebook": "notebooks",
    "pillow": "pillows",
    "teapot": "teapots",
    "jacket": "jackets",
}

COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "black", "white",
    "orange", "purple", "pink", "brown", "gray", "silver",
)

CITIES: tuple[str, ...] = (
    "Oslo", "Nairobi", "Lisbon", "Tokyo", "Lima", "Cairo", "Berlin", "Toronto",
    "Madrid", "Dublin", "Seoul", "Sydney", "Mumbai", "Chicago", "Vienna", "Prague",
    "Helsinki", "Athens", "Manila", "Warsaw", "Accra", "Montreal", "Buenos Aires",
    "Cape Town", "New York",
)

NUMBER_WORDS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)
MAX_QUANTITY = len(NUMBER_WORDS)
TENS_WORDS: tuple[str, ...] = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

# Placeholders: {qty} {color} {items} {city}. {items} is singular when qty is 1.
TEMPLATES: tuple[str, ...] = (
    "Please ship {qty} {color} {items} to {city}.",
    "Could {qty} {color} {items} go to {city}?",
    "{qty} {color} {items} should go to {city}.",
    "{qty} {color} {items} must be delivered to {city}.",
    "Send {qty} {color} {items} to {city}.",
    "Can you send {qty} {color} {items} to {city}?",
    "I'd like to order {qty} {color} {items}, delivered to {city}.",
    "We need {qty} {color} {items} in {city}.",
    "Deliver {qty} {color} {items} to our office in {city}, please.",
    "Ship to {city}: {qty} {color} {items}.",
    "Kindly dispatch {qty} {color} {items} to {city}.",
    "My customer in {city} wants {qty} {color} {items}.",
    "Would you mail {qty} {color} {items} to {city}?",
    "Order for {city}: {qty} {color} {items}.",
    "Please get {qty} {color} {items} over to {city} by Friday.",
    "Put in an order of {qty} {color} {items} for {city}, thanks.",
)

# Held-out pools of the out-of-distribution file: none of these values or phrasings occurs in train or eval.
OOD_ITEMS: dict[str, str] = {
    "kettle": "kettles",
    "stool": "stools",
    "vase": "vases",
    "blanket": "blankets",
    "wallet": "wallets",
    "helmet": "helmets",
    "basket": "baskets",
    "mirror": "mirrors",
    "toaster": "toasters",
    "sofa": "sofas",
    "rug": "rugs",
    "clock": "clocks",
    "ladder": "ladders",
    "apron": "aprons",
    "puzzle": "puzzles",
    "tent": "tents",
    "sweater": "sweaters",
    "bucket": "buckets",
    "glove": "gloves",
    "whistle": "whistles",
}

OOD_COLORS: tuple[str, ...] = (
    "beige", "maroon", "teal", "navy", "olive", "violet", "turquoise", "ivory", "crimson", "golden",
)

OOD_CITIES: tuple[str, ...] = (
    "Reykjavik", "Montevideo", "Hanoi", "Tbilisi", "Quito", "Dakar", "Zagreb", "Kyoto", "Perth", "Bergen",
    "Porto", "Valparaiso", "Ljubljana", "Edinburgh", "San Diego", "Kuala Lumpur", "Tallinn", "Marrakesh",
    "Winnipeg", "Cusco",
)

OOD_QUANTITIES = range(MAX_QUANTITY + 1, 100)  # 21-99: never a train quantity
LARGE_QUANTITIES = range(100, 1000)  # --broad: 100-999, far above the OOD range (words only for N00 + 0-20)

OOD_TEMPLATES: tuple[str, ...] = (
    "Hi, I want {qty} {color} {items} sent to {city}.",
    "Our {city} store is out of stock; restock {qty} {color} {items}.",
    "Requesting {qty} {color} {items} for delivery in {city}.",
    "Add {qty} {color} {items} to the {city} shipment.",
    "Could you arrange {qty} {color} {items} for the team in {city}?",
    "Need {qty} {color} {items} shipped out to {city} asap.",
    "The {city} branch asked for {qty} {color} {items}.",
    "Book {qty} {color} {items}, destination {city}.",
)

# --broad: more train phrasings (other slot orders, terse and chatty ones); none is an OOD phrasing.
BROAD_TEMPLATES: tuple[str, ...] = (
    "{qty} {items} in {color}, please send them to {city}.",
    "Need {qty} {items} ({color}) delivered to {city}.",
    "{city} needs {qty} {color} {items}.",
    "For our {city} warehouse: {qty} {items}, color {color}.",
    "Please order {qty} {items} in {color} for the {city} office.",
    "hey can u send {qty} {color} {items} to {city}",
    "Ordering {qty} {color} {items} for {city}",
    "{qty} {color} {items}, ship to {city}",
    "Destination: {city}. Items: {qty} {color} {items}.",
    "We would love {qty} {color} {items} sent over to {city}.",
    "Quick order: {qty} {color} {items} to {city}, thanks!",
    "Please deliver {qty} {items} in {color} to {city} next week.",
)

# Copy-teaching: made-up values built from these parts (pseudo-words: onset + vowel + coda syllables).
ONSETS: tuple[str, ...] = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
                           "br", "dr", "gr", "kl", "pl", "tr", "sk", "st", "sh", "ch", "fl", "gl", "sn", "w")
VOWELS: tuple[str, ...] = ("a", "e", "i", "o", "u", "a", "e", "o", "ee", "oo")
INNER_CODAS: tuple[str, ...] = ("", "", "", "n", "r", "l")  # inside a word: keep it pronounceable
CODAS: tuple[str, ...] = ("", "n", "r", "l", "t", "k", "m", "sh", "x", "nd", "st")  # the last syllable
SHADES: tuple[str, ...] = ("dark", "light", "pale", "bright")  # shaded train colours: "dark red"
CITY_PREFIXES: tuple[str, ...] = ("Port", "New", "Lake", "Fort", "Saint", "Santa", "El", "Mount")
CITY_SUFFIXES: tuple[str, ...] = ("City", "Falls", "Springs", "Harbor", "Bay", "Heights")

# (item, city) pairs that never occur in train; part of the eval split uses them.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("teapot", "Lisbon"), ("umbrella", "Cairo"))
HELD_OUT_EVAL_FRACTION = 1 / 6


@dataclass(frozen=True)
class Order:
    """One sampled order and how it is phrased."""

    item: str
    color: str
    quantity: int
    city: str
    template: str
    as_words: bool
    plural: str
    lower_start: bool = False  # --broad: keep the first letter lower-case
    drop_final_punctuation: bool = False  # --broad: no final ".", "?" or "!"
    article_for_one: bool = False  # --broad: quantity 1 in words reads "a"/"an" instead of "one"

    def sentence(self) -> str:
        """Render the user message."""
        qty = number_words(self.quantity) if self.as_words else str(self.quantity)
        items = self.item if self.quantity == 1 else self.plural
        text = self.template.format(qty="\0", color=self.color, items=items, city=self.city)
        if self.as_words and self.quantity == 1 and self.article_for_one:
            qty = "an" if text.split("\0", 1)[1].lstrip()[:1].lower() in tuple("aeiou") else "a"
        text = text.replace("\0", qty)
        if self.drop_final_punctuation and text[-1] in ".?!":
            text = text[:-1]
        return text if self.lower_start else text[0].upper() + text[1:]

    def answer(self) -> str:
        """Render the assistant reply as compact-ordered JSON."""
        return json.dumps(
            {"item": self.item, "color": self.color, "quantity": self.quantity, "city": self.city}
        )

    def row(self) -> dict[str, list[dict[str, str]]]:
        """Render the chat row."""
        return {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.sentence()},
                {"role": "assistant", "content": self.answer()},
            ]
        }


def number_words(quantity: int) -> str:
    """1-99, and whole hundreds plus 0-20, in English words: 'seven', 'forty-two', 'three hundred and twelve'."""
    if 100 <= quantity <= 999 and quantity % 100 <= MAX_QUANTITY:
        hundreds, rest = divmod(quantity, 100)
        return f"{NUMBER_WORDS[hundreds - 1]} hundred" + (f" and {NUMBER_WORDS[rest - 1]}" if rest else "")
    if not 1 <= quantity <= 99:
        raise ValueError(f"quantity={quantity}: only 1-99 and N00-N20 (N = 1-9) have words here")
    if quantity <= MAX_QUANTITY:
        return NUMBER_WORDS[quantity - 1]
    tens, ones = divmod(quantity, 10)
    return TENS_WORDS[tens - 2] + (f"-{NUMBER_WORDS[ones - 1]}" if ones else "")


def has_words(quantity: int) -> bool:
    """Whether number_words can spell `quantity`."""
    return 1 <= quantity <= 99 or (100 <= quantity <= 999 and quantity % 100 <= MAX_QUANTITY)


def _phrasing(rng: random.Random, order: Order, broad: bool) -> Order:
    """With `broad`, restyle an order the way people type: lower-case start, no final stop, "a"/"an" for one.

    Draws nothing without `broad`, so the plain generator's random stream stays as it was.
    """
    if not broad:
        return order
    return dataclasses.replace(order, lower_start=rng.random() < 0.15, drop_final_punctuation=rng.random() < 0.15,
                               article_for_one=rng.random() < 0.5)


def _quantity(rng: random.Random, broad: bool) -> tuple[int, bool]:
    """(quantity, as_words): 1-20 (digits or words); with `broad` a quarter are 100-999 (words where spellable)."""
    if broad and rng.random() < 0.25:
        quantity = rng.choice(LARGE_QUANTITIES)
        return quantity, has_words(quantity) and rng.random() < 0.5
    quantity = rng.randint(1, MAX_QUANTITY)
    return quantity, rng.random() < 0.5


def _templates(broad: bool) -> tuple[str, ...]:
    return TEMPLATES + BROAD_TEMPLATES if broad else TEMPLATES


def _sample_order(rng: random.Random, item: str | None = None, city: str | None = None, broad: bool = False) -> Order:
    item = item or rng.choice(list(ITEMS))
    color = rng.choice(COLORS)
    if broad:
        quantity, as_words = _quantity(rng, broad)
        city, template = city or rng.choice(CITIES), rng.choice(_templates(broad))
    else:  # the first quickstart's draw order, kept so that --copy-share 0 --no-broad reproduces its files
        quantity = rng.randint(1, MAX_QUANTITY)
        city, template, as_words = city or rng.choice(CITIES), rng.choice(TEMPLATES), rng.random() < 0.5
    order = Order(item=item, color=color, quantity=quantity, city=city, template=template, as_words=as_words,
                  plural=ITEMS[item])
    return _phrasing(rng, order, broad)


def _forbidden_words() -> set[str]:
    """Every word of the held-out (OOD) pools and of the real train values: made-up names must avoid them all."""
    values = [*OOD_ITEMS, *OOD_ITEMS.values(), *OOD_COLORS, *OOD_CITIES, *TENS_WORDS,
              *ITEMS, *ITEMS.values(), *COLORS, *CITIES, *NUMBER_WORDS]
    return {word.lower() for value in values for word in value.replace("-", " ").split()}


FORBIDDEN_WORDS = _forbidden_words()


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up lower-case word of `syllables` syllables, none of FORBIDDEN_WORDS."""
    while True:
        codas = [rng.choice(INNER_CODAS) for _ in range(syllables - 1)] + [rng.choice(CODAS)]
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + coda for coda in codas)
        if len(word) >= 4 and word not in FORBIDDEN_WORDS:
            return word


def regular_plural(noun: str) -> str:
    """English plural by the regular rules: -es after s, x, z, ch, sh; else -s."""
    return noun + ("es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s")


def _made_up_item(rng: random.Random, compound_share: float) -> tuple[str, str]:
    """(singular, plural): a pseudo-noun ("drelok"/"droloks"), or with `compound_share` one before a train noun
    ("drelok lamp"). Compounds are off by default: next to made-up colours they are ambiguous ("five drelok lamps":
    colour or item?), and the benchmark found they teach the adapter to glue unseen colours into the item."""
    word = pseudo_word(rng, rng.choice((2, 2, 3)))
    if rng.random() < compound_share:
        noun = rng.choice(list(ITEMS))
        return f"{word} {noun}", f"{word} {ITEMS[noun]}"
    return word, regular_plural(word)


def _made_up_color(rng: random.Random) -> str:
    """A pseudo-word colour, a shaded train colour ("pale green") or a plain train colour."""
    roll = rng.random()
    if roll < 0.4:
        return pseudo_word(rng, rng.choice((1, 2)))
    return f"{rng.choice(SHADES)} {rng.choice(COLORS)}" if roll < 0.7 else rng.choice(COLORS)


def _made_up_city(rng: random.Random) -> str:
    """A capitalised pseudo-word city, or a multi-word one ("Port Velamor", "Drusk Falls", "Kavo Drena")."""
    def name() -> str:
        return pseudo_word(rng, rng.choice((2, 3))).capitalize()
    roll = rng.random()
    if roll < 0.45:
        return name()
    if roll < 0.7:
        return f"{rng.choice(CITY_PREFIXES)} {name()}"
    return f"{name()} {rng.choice(CITY_SUFFIXES)}" if roll < 0.88 else f"{name()} {name()}"


def _sample_copy_order(rng: random.Random, broad: bool, compound_share: float) -> Order:
    """Copy-teaching: an order of a made-up item, in a made-up or shaded colour, to a made-up city."""
    item, plural = _made_up_item(rng, compound_share)
    color, city = _made_up_color(rng), _made_up_city(rng)
    quantity, as_words = _quantity(rng, broad)
    order = Order(item=item, color=color, quantity=quantity, city=city, template=rng.choice(_templates(broad)),
                  as_words=as_words, plural=plural)
    return _phrasing(rng, order, broad)


def _sample_ood_order(rng: random.Random) -> Order:
    item = rng.choice(list(OOD_ITEMS))
    return Order(
        item=item,
        color=rng.choice(OOD_COLORS),
        quantity=rng.choice(OOD_QUANTITIES),
        city=rng.choice(OOD_CITIES),
        template=rng.choice(OOD_TEMPLATES),
        as_words=rng.random() < 0.5,
        plural=OOD_ITEMS[item],
    )


def _draw_unique(rng: random.Random, n: int, seen: set[str], held_out: bool | None, broad: bool = False,
                 copy: bool = False, compound_share: float = 0.0) -> list[dict]:
    """Draw `n` rows whose user sentences are not in `seen` (updated in place).

    held_out=True forces a held-out (item, city) pair, False forbids them, None allows any; copy=True draws
    copy-teaching orders (made-up values) instead.
    """
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise ValueError(f"could not draw {n} unique sentences")
        if copy:
            order = _sample_copy_order(rng, broad, compound_share)
        elif held_out:
            order = _sample_order(rng, *rng.choice(HELD_OUT_PAIRS), broad=broad)
        else:
            order = _sample_order(rng, broad=broad)
            if held_out is False and (order.item, order.city) in HELD_OUT_PAIRS:
                continue
        sentence = order.sentence()
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append(order.row())
    return rows


# The quickstart's recipe: copy-teaching + broad phrasing. Measured on the quickstart (r16 all-linear, 30 steps, lr
# 5e-4 with this data, 1e-3 with the plain one): on examples/data/orders_independent.jsonl (80 order sentences
# written without seeing this generator) the plain recipe (--copy-share 0 --no-broad) scored 7.5% (6/80), this one
# 33.8% (27/80); on orders_ood.jsonl 56.7% vs 63.3% (60 rows: +-6 points, within noise).
DEFAULT_COPY_SHARE = 0.5
DEFAULT_BROAD = True


def generate(seed: int, n_train: int, n_eval: int, copy_share: float = DEFAULT_COPY_SHARE,
             broad: bool = DEFAULT_BROAD, compound_share: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) rows; no user sentence appears twice across both splits.

    `copy_share` of the train rows are copy-teaching orders (their own random stream, then shuffled in);
    `broad` widens phrasing and quantities of every row; `compound_share` of the made-up items are two words.
    Eval rows are real-vocabulary orders only.
    """
    if not 0 <= copy_share <= 1:
        raise ValueError(f"copy_share={copy_share} must lie in [0, 1]")
    rng = random.Random(seed)
    seen: set[str] = set()
    n_copy = round(n_train * copy_share)
    train = _draw_unique(rng, n_train - n_copy, seen, held_out=False, broad=broad)
    n_held = round(n_eval * HELD_OUT_EVAL_FRACTION)
    eval_rows = _draw_unique(rng, n_held, seen, held_out=True, broad=broad)
    eval_rows += _draw_unique(rng, n_eval - n_held, seen, held_out=None, broad=broad)
    rng.shuffle(eval_rows)
    if n_copy:
        train += _draw_unique(random.Random(f"copy-{seed}"), n_copy, seen, held_out=None, broad=broad, copy=True,
                              compound_share=compound_share)
        random.Random(f"mix-{seed}").shuffle(train)
    return train, eval_rows


def generate_ood(seed: int, n: int) -> list[dict]:
    """`n` rows drawn only from the held-out pools (OOD_*), no user sentence twice.

    Its own random stream (seeded from `seed`), so train and eval stay as they were.
    """
    rng = random.Random(f"ood-{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n:
        if len(seen) > 1000 * (n + 1):
            raise ValueError(f"could not draw {n} unique sentences")
        order = _sample_ood_order(rng)
        if order.sentence() not in seen:
            seen.add(order.sentence())
            rows.append(order.row())
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines via a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400, help="number of training rows")
    parser.add_argument("--eval", type=int, default=60, help="number of evaluation rows")
    parser.add_argument("--ood", type=int, default=60, help="number of out-of-distribution evaluation rows")
    parser.add_argument("--copy-share", type=float, default=DEFAULT_COPY_SHARE,
                        help="share of train rows that order made-up items/colours/cities (copy-teaching)")
    parser.add_argument("--broad", action=argparse.BooleanOptionalAction, default=DEFAULT_BROAD,
                        help="more phrasings, casing, 'a'/'an' for one, quantities 100-999")
    parser.add_argument("--compound-share", type=float, default=0.0,
                        help="share of made-up items written as two words (ambiguous next to made-up colours)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent,
        help="folder whose data/ subfolder receives the files (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    train, eval_rows = generate(args.seed, args.train, args.eval, args.copy_share, args.broad, args.compound_share)
    data_dir = args.out_dir / "data"
    write_jsonl_atomic(data_dir / "orders_train.jsonl", train)
    write_jsonl_atomic(data_dir / "orders_eval.jsonl", eval_rows)
    ood_rows = generate_ood(args.seed, args.ood)
    write_jsonl_atomic(data_dir / "orders_ood.jsonl", ood_rows)
    print(f"wrote {len(train)} train, {len(eval_rows)} eval and {len(ood_rows)} out-of-distribution rows to {data_dir}")


if __name__ == "__main__":
    main()
