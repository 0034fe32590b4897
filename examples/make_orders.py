"""Generate the quickstart's synthetic order-extraction dataset.

Each row is a chat ``{"messages": [system, user, assistant]}`` where the user
describes an order in one sentence and the assistant answers with the order as
JSON. Output is deterministic for a given ``--seed``.

    python examples/make_orders.py --seed 0 --train 400 --eval 60 --ood 60

Besides train and eval (one generator: same phrasings, items, colours, cities and
quantities), it writes ``orders_ood.jsonl``: the same task built only from held-out
pools (items, colours, cities and phrasings that never occur in train, quantities
21-99 against train's 1-20). Eval measures what the adapter memorised; the OOD
file measures whether it learned to copy values it never saw.
"""

from __future__ import annotations

import argparse
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

OOD_QUANTITIES = range(MAX_QUANTITY + 1, 100)  # 21-99: outside train's 1-20

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

    def sentence(self) -> str:
        """Render the user message."""
        qty = number_words(self.quantity) if self.as_words else str(self.quantity)
        items = self.item if self.quantity == 1 else self.plural
        text = self.template.format(qty=qty, color=self.color, items=items, city=self.city)
        return text[0].upper() + text[1:]

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
    """1-99 in English words: 'seven', 'twenty', 'forty-two'."""
    if not 1 <= quantity <= 99:
        raise ValueError(f"quantity={quantity}: only 1-99 have words here")
    if quantity <= MAX_QUANTITY:
        return NUMBER_WORDS[quantity - 1]
    tens, ones = divmod(quantity, 10)
    return TENS_WORDS[tens - 2] + (f"-{NUMBER_WORDS[ones - 1]}" if ones else "")


def _sample_order(rng: random.Random, item: str | None = None, city: str | None = None) -> Order:
    item = item or rng.choice(list(ITEMS))
    return Order(
        item=item,
        color=rng.choice(COLORS),
        quantity=rng.randint(1, MAX_QUANTITY),
        city=city or rng.choice(CITIES),
        template=rng.choice(TEMPLATES),
        as_words=rng.random() < 0.5,
        plural=ITEMS[item],
    )


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


def _draw_unique(rng: random.Random, n: int, seen: set[str], held_out: bool | None) -> list[dict]:
    """Draw `n` rows whose user sentences are not in `seen` (updated in place).

    held_out=True forces a held-out (item, city) pair, False forbids them, None allows any.
    """
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise ValueError(f"could not draw {n} unique sentences")
        if held_out:
            order = _sample_order(rng, *rng.choice(HELD_OUT_PAIRS))
        else:
            order = _sample_order(rng)
            if held_out is False and (order.item, order.city) in HELD_OUT_PAIRS:
                continue
        sentence = order.sentence()
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append(order.row())
    return rows


def generate(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) rows; no user sentence appears twice across both splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _draw_unique(rng, n_train, seen, held_out=False)
    n_held = round(n_eval * HELD_OUT_EVAL_FRACTION)
    eval_rows = _draw_unique(rng, n_held, seen, held_out=True)
    eval_rows += _draw_unique(rng, n_eval - n_held, seen, held_out=None)
    rng.shuffle(eval_rows)
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
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent,
        help="folder whose data/ subfolder receives the files (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    train, eval_rows = generate(args.seed, args.train, args.eval)
    data_dir = args.out_dir / "data"
    write_jsonl_atomic(data_dir / "orders_train.jsonl", train)
    write_jsonl_atomic(data_dir / "orders_eval.jsonl", eval_rows)
    ood_rows = generate_ood(args.seed, args.ood)
    write_jsonl_atomic(data_dir / "orders_ood.jsonl", ood_rows)
    print(f"wrote {len(train)} train, {len(eval_rows)} eval and {len(ood_rows)} out-of-distribution rows to {data_dir}")


if __name__ == "__main__":
    main()
