"""Generate the quickstart's synthetic order-extraction dataset.

Each row is a chat ``{"messages": [system, user, assistant]}`` where the user
describes an order and the assistant answers with the order as JSON. Output is
deterministic for a given ``--seed``.

    python examples/make_orders.py            # the quickstart's files (the defaults)

Besides train and eval (eval: the first pools' items, colours and cities in the
train phrasings), it writes ``orders_ood.jsonl``: the same task built only from
held-out pools (items, colours, cities and phrasings that never occur in train,
quantities 21-99 that train never has). Eval measures what the adapter memorised;
the OOD file measures whether it learned to copy values it never saw.

Four levers make the adapter copy rather than recall (benchmarks/generalisation.py
measures them on the OOD file and on two sets written without this generator):

- copy-teaching (``--copy-share``): that share of the train rows orders made-up
  things: pronounceable pseudo-word items with regular plurals, pseudo-word or
  shaded colours, pseudo-word and multi-word cities. Recalling a value cannot
  answer them; copying the span from the sentence can.
- broad phrasing (``--broad``): more train phrasings (colour after the item,
  city first, terse and chatty ones), a lower-case first letter or no final
  punctuation now and then, "a"/"an" for one, and quantities 100-999 (digits, or
  words for whole hundreds plus 0-20).
- wide pools (``--rich-share``): that share of the train rows orders real things
  from large pools (229 items, many of them two words; 72 colours; 185 cities,
  accents kept), with idioms ("a dozen", "a pair of"), thousands ("2,500"), form-
  like phrasings and chatter around the order (greetings, names, dates, order
  numbers). With it, copy-teaching rows never make up both item and colour.
- replay (``--replay-share``): the base model's own replies to general prompts
  (examples/make_replay.py) mixed in, so that training keeps its behaviour off the
  task (the forgetting check's KL).

None ever uses a value or phrasing of the OOD pools (every word of them is
refused), nor a value of the independently written test files (a test checks).
The defaults are the quickstart's recipe (see DEFAULT_COPY_SHARE for the
measurements); ``--copy-share 0 --no-broad --rich-share 0 --replay-share 0
--train 400`` writes the first, plain recipe.
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

# --rich-share: real-vocabulary orders from wide pools (none of them an OOD value), with quantity idioms and the
# chatter real messages carry (greetings, names, dates, order numbers). Items are single nouns and compounds whose
# plural inflects the last word; the answer names the item in the singular, whole.
RICH_ITEMS: dict[str, str] = {
    **{noun: noun + "s" for noun in (
        "spoon", "fork", "plate", "bowl", "saucer", "jug", "ladle", "spatula", "colander", "skillet", "tablecloth",
        "doormat", "mop", "sponge", "hanger", "drawer", "desk", "couch", "ottoman", "mattress", "quilt", "towel",
        "sock", "hat", "cap", "belt", "shirt", "blouse", "skirt", "coat", "boot", "sandal", "sneaker", "slipper",
        "mitten", "beanie", "bracelet", "necklace", "ring", "earring", "badge", "sticker", "poster", "easel",
        "crayon", "marker", "eraser", "ruler", "stapler", "binder", "folder", "calculator", "keyboard", "speaker",
        "headset", "charger", "cable", "router", "tablet", "camera", "tripod", "flashlight", "drill", "hammer",
        "shovel", "rake", "hose", "trowel", "scooter", "surfboard", "paddle", "racket", "medal", "frisbee", "ribbon",
        "wreath", "ornament", "figurine", "doll", "puppet", "marble", "tile", "plank", "bolt", "screw", "hinge",
        "key", "teacup", "goblet", "decanter", "carafe", "jersey", "toothbrush", "hairbrush", "suitcase", "dumbbell",
        "kettlebell", "basketball", "football", "volleyball", "frying pan", "salad bowl", "butter knife",
        "oven mitt", "ice tray", "shower curtain", "laundry bag", "ironing board", "ceiling fan", "coat hook",
        "coat rack", "key ring", "photo album", "paint roller", "sketch pad", "glue stick", "paper clip",
        "rubber band", "sticky note", "coffee table", "side table", "garden chair", "plant pot", "bird feeder",
        "dog bowl", "dog collar", "cat bed", "fishing rod", "golf ball", "golf club", "baseball cap", "hockey stick",
        "ski jacket", "swim cap", "tape measure", "ear plug", "extension cord", "light bulb", "power strip",
        "phone charger", "memory card", "hard drive", "ink cartridge", "gift bag", "duffel bag", "travel pillow",
        "shower cap", "candle holder", "wine rack", "spice jar", "cookie jar", "baking tray", "muffin tin",
        "pizza cutter", "bottle opener", "can opener", "salt shaker", "pepper mill", "egg cup", "place mat",
        "table lamp", "night light", "name tag", "luggage tag", "milk crate", "fruit bowl", "bread bin", "trash can",
        "recycling bin", "pencil sharpener", "desk fan", "beach ball", "tennis racket", "exercise ball",
        "resistance band", "foam roller", "snow shovel", "ice scraper", "bike lock", "bike light", "bike bell",
        "tire pump", "door stop", "chopping board", "rolling pin", "cake tin", "sauce pan", "soup bowl", "dish rack",
        "bath toy", "toy car", "board game", "jigsaw", "paper plate", "party cup", "table cloth", "flask",
        "dress shirt", "loaf pan", "baby onesie", "ukulele", "radio", "cactus pot", "puppy bed")},
    **{
        "dish": "dishes", "torch": "torches", "wrench": "wrenches", "brooch": "brooches", "compass": "compasses",
        "sandwich box": "sandwich boxes", "tool box": "tool boxes", "gift box": "gift boxes",
        "pencil box": "pencil boxes", "matchbox": "matchboxes", "paint brush": "paint brushes",
        "scrubbing brush": "scrubbing brushes", "battery": "batteries", "diary": "diaries", "trophy": "trophies",
        "bread knife": "bread knives", "steak knife": "steak knives", "pocket knife": "pocket knives",
        "book shelf": "book shelves", "wall shelf": "wall shelves", "silk scarf": "silk scarves",
        "hobby knife": "hobby knives", "wristwatch": "wristwatches", "stopwatch": "stopwatches",
        "hatbox": "hatboxes"},
}

RICH_COLORS: tuple[str, ...] = (
    "midnight blue", "ice blue", "sea green", "moss green", "apple green", "lemon yellow", "sunflower", "honey",
    "butter", "cherry", "brick red", "wine", "claret", "raspberry", "cranberry", "berry", "hot pink", "baby pink",
    "bubblegum", "orchid", "heather", "amethyst", "aubergine", "mulberry", "grape", "chocolate", "caramel",
    "cinnamon", "hazel", "walnut", "mahogany", "chestnut", "sand", "stone", "pebble", "smoke", "ash", "steel",
    "steel grey", "pearl", "off-white", "bone", "linen", "pistachio", "fern", "pine", "spruce", "jungle green",
    "aquamarine", "ocean blue", "denim", "cornflower", "petrol", "electric blue", "neon green", "pumpkin", "brick",
    "cognac", "tobacco", "sepia", "jet black", "onyx", "platinum", "nickel", "ruby red", "lime green", "dark blue",
    "light green", "pale yellow", "deep purple", "soft pink", "warm grey",
)

RICH_CITIES: tuple[str, ...] = (
    "Barcelona", "Brussels", "Bucharest", "Sofia", "Belgrade", "Sarajevo", "Skopje", "Tirana", "Riga", "Vilnius",
    "Kyiv", "Odesa", "Lviv", "Ankara", "Izmir", "Beirut", "Amman", "Doha", "Riyadh", "Jeddah", "Baku", "Almaty",
    "Tashkent", "Lahore", "Delhi", "Kolkata", "Hyderabad", "Colombo", "Yangon", "Bangkok", "Phnom Penh", "Vientiane",
    "Surabaya", "Denpasar", "Cebu", "Davao", "Taipei", "Hong Kong", "Beijing", "Shenzhen", "Chengdu", "Osaka",
    "Nagoya", "Sapporo", "Fukuoka", "Busan", "Incheon", "Vladivostok", "Novosibirsk", "Moscow", "Kazan", "Vancouver",
    "Edmonton", "Ottawa", "Halifax", "Boston", "Philadelphia", "Baltimore", "Pittsburgh", "Cleveland", "Detroit",
    "Milwaukee", "Minneapolis", "Phoenix", "Dallas", "Houston", "Miami", "Orlando", "Atlanta", "Memphis", "Seattle",
    "Los Angeles", "Sacramento", "Kansas City", "St. Louis", "Mexico City", "Puebla", "Tijuana", "Kingston",
    "Panama City", "Managua", "Medellín", "Cali", "Caracas", "Arequipa", "La Paz", "Córdoba", "Recife", "Salvador",
    "Fortaleza", "Curitiba", "Belo Horizonte", "Manaus", "Brasília", "Fez", "Algiers", "Khartoum", "Dar es Salaam",
    "Lusaka", "Harare", "Maputo", "Luanda", "Kinshasa", "Abuja", "Kano", "Bamako", "Ouagadougou", "Abidjan",
    "Freetown", "Monrovia", "Durban", "Pretoria", "Gaborone", "Antananarivo", "Darwin", "Canberra", "Hamilton",
    "Nelson", "Suva", "Apia", "Nouméa", "Aberdeen", "Belfast", "Cork", "Liverpool", "Bristol", "Oxford", "Cambridge",
    "York", "Nottingham", "Brighton", "Nice", "Toulouse", "Nantes", "Lille", "Strasbourg", "Hamburg", "Cologne",
    "Leipzig", "Dresden", "Zurich", "Basel", "Salzburg", "Graz", "Milan", "Turin", "Naples", "Venice", "Genoa",
    "Palermo", "Valencia", "Bilbao", "Málaga", "Granada", "Zaragoza", "Gothenburg", "Malmö", "Uppsala", "Aarhus",
    "Odense", "Tampere", "Turku", "Wrocław", "Poznań", "Brno", "Košice", "Debrecen", "Cluj-Napoca", "Thessaloniki",
    "Patras", "Nicosia", "Valletta", "Luxembourg", "Monaco", "Andorra la Vella", "Stavanger", "Aalborg", "Reims",
    "Le Havre", "Utrecht", "Eindhoven", "Groningen", "Leuven", "Liège", "Namur",
)

# Quantity idioms (text, value): none is 21-99, the OOD file's range.
QUANTITY_IDIOMS: tuple[tuple[str, int], ...] = (
    ("a dozen", 12), ("half a dozen", 6), ("a pair of", 2), ("a single", 1), ("just one", 1),
)
THOUSAND_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Chatter around the order, as real messages carry it; {name} {n} {date} are filled in, digits included on purpose.
RICH_PREFIXES: tuple[str, ...] = (
    "Hello,", "Good morning!", "Hi team,", "Dear Sir or Madam,", "Hey there,", "Quick one:", "Order request:",
    "Re: order #{n} -", "This is {name} from the purchasing office.", "My name is {name}.", "Hello again,",
    "Morning!", "Following up on our call,", "Happy Monday!", "Greetings from {name},", "As discussed,",
)
RICH_SUFFIXES: tuple[str, ...] = (
    "Thanks!", "Thank you.", "Cheers, {name}", "Best regards, {name}", "We need them by {date}.",
    "It's for our spring fair.", "Please invoice us as usual.", "Reference: PO-{n}.",
    "Call me if anything is unclear.", "Delivery before {date} would be great.", "Many thanks, {name}.",
    "Our account number is {n}.", "Let me know the cost.", "They are gifts for the staff.",
    "Please confirm by email.", "Much appreciated!",
)
FIRST_NAMES: tuple[str, ...] = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas",
                                "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Paula", "Ravi", "Sven", "Tomás", "Yuki")
MONTHS: tuple[str, ...] = ("January", "February", "March", "April", "May", "June", "July", "August",
                           "September", "October", "November", "December")

RICH_TEMPLATES: tuple[str, ...] = (
    "I'd like {qty} {color} {items} delivered to {city}.",
    "We're after {qty} {color} {items} for our shop in {city}.",
    "Please send {qty} {items} in {color} to {city}.",
    "Could we get {qty} {color} {items} sent to {city}?",
    "Is it possible to ship {qty} {color} {items} to {city}?",
    "{city} office here: we need {qty} {color} {items}.",
    "Looking to buy {qty} {color} {items} for a project in {city}.",
    "Can I order {qty} {color} {items}? They go to {city}.",
    "We run a small business in {city} and need {qty} {color} {items}.",
    "For the {city} team, {qty} {color} {items} please.",
    "{qty} {color} {items} to {city}, please.",
    "Please have {qty} {color} {items} delivered to our store in {city}.",
    "I need {qty} {items} ({color}) sent to {city} before the weekend.",
    "Our client in {city} is asking for {qty} {color} {items}.",
    "Could you deliver {qty} {color} {items} to the {city} warehouse?",
    "Please post {qty} {color} {items} to {city}.",
    "Shipping to {city}: {qty} {color} {items}, thanks.",
    "Place an order for {qty} {color} {items} to be sent to {city}.",
    "We would like to purchase {qty} {items}, colour {color}, for delivery to {city}.",
    "{qty} {items}, {color}, to {city} please.",
    "Deliver {qty} {items} ({color}) to {city}.",
    "Item: {items}; colour: {color}; quantity: {qty}; city: {city}",
    "Qty: {qty} | Item: {items} | Color: {color} | Ship to: {city}",
    "{city} - {qty} {items} in {color}",
    "Order details: {qty} {items}, {color}. Delivery city: {city}.",
    "Could you send {qty} {items} to {city}? Colour: {color}.",
    "I'm in {city} and would like {qty} {items}, the {color} ones.",
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
    quantity_text: str = ""  # --rich-share: the quantity as written when it is neither digits nor number_words
    prefix: str = ""  # --rich-share: chatter before the order ("Hello,", "My name is Ana.")
    suffix: str = ""  # --rich-share: chatter after it ("Thanks!", "Reference: PO-4821.")

    def sentence(self) -> str:
        """Render the user message."""
        qty = self.quantity_text or (number_words(self.quantity) if self.as_words else str(self.quantity))
        items = self.item if self.quantity == 1 else self.plural
        text = self.template.format(qty="\0", color=self.color, items=items, city=self.city)
        if self.as_words and self.quantity == 1 and self.article_for_one and not self.quantity_text:
            qty = "an" if text.split("\0", 1)[1].lstrip()[:1].lower() in tuple("aeiou") else "a"
        text = text.replace("\0", qty)
        if self.drop_final_punctuation and text[-1] in ".?!" and not self.suffix:
            text = text[:-1]
        if self.prefix.endswith((",", ":", "-")) and not self.template.startswith(("{", "I ", "I'")):
            text = text[0].lower() + text[1:]  # "Hello, please ship ..." ({city} and "I" keep their capital)
        text = " ".join(part for part in (self.prefix, text, self.suffix) if part)
        return text if self.lower_start else text[0].upper() + text[1:]

    def answer(self) -> str:
        """Render the assistant reply as compact-ordered JSON, accents as written ("Medellín", not "Medell\\u00edn":
        the reply copies the sentence's characters instead of escaping them)."""
        return json.dumps(
            {"item": self.item, "color": self.color, "quantity": self.quantity, "city": self.city}, ensure_ascii=False
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
              *ITEMS, *ITEMS.values(), *COLORS, *CITIES, *NUMBER_WORDS,
              *RICH_ITEMS, *RICH_ITEMS.values(), *RICH_COLORS, *RICH_CITIES]
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


def _sample_copy_order(rng: random.Random, broad: bool, compound_share: float, rich: bool = False) -> Order:
    """Copy-teaching: an order of a made-up item, in a made-up or shaded colour, to a made-up city.

    With `rich`, never both item and colour made up (which word is the colour would be a guess): a made-up item
    (possibly two words) in a real colour, or a real item in a made-up colour; the city made up or a real one of
    RICH_CITIES; rich quantities and chatter."""
    if not rich:
        item, plural = _made_up_item(rng, compound_share)
        color, city = _made_up_color(rng), _made_up_city(rng)
        quantity, as_words = _quantity(rng, broad)
        order = Order(item=item, color=color, quantity=quantity, city=city, template=rng.choice(_templates(broad)),
                      as_words=as_words, plural=plural)
        return _phrasing(rng, order, broad)
    if rng.random() < 0.5:
        item, plural = _made_up_item(rng, compound_share)
        color = rng.choice(COLORS + RICH_COLORS)
    else:
        item = rng.choice(list(ITEMS) + list(RICH_ITEMS))
        plural, color = {**ITEMS, **RICH_ITEMS}[item], _made_up_color(rng)
    city = _made_up_city(rng) if rng.random() < 0.6 else rng.choice(RICH_CITIES)
    return _rich_order(rng, item, plural, color, city)


def _rich_quantity(rng: random.Random) -> tuple[int, bool, str]:
    """(quantity, as_words, quantity_text): an idiom ("a dozen"), thousands ("2,500", "three thousand"),
    hundreds, or 1-20 as digits or words; never 21-99."""
    roll = rng.random()
    if roll < 0.15:
        text, quantity = rng.choice(QUANTITY_IDIOMS)
        return quantity, False, text
    if roll < 0.3:
        quantity = rng.choice((rng.randrange(1000, 10001, 50), 1000 * rng.randint(1, 10)))
        style = rng.random()
        if quantity % 1000 == 0 and style < 0.4:
            return quantity, False, f"{THOUSAND_WORDS[quantity // 1000 - 1]} thousand"
        return quantity, False, f"{quantity:,}" if style < 0.7 else str(quantity)
    quantity, as_words = _quantity(rng, broad=roll < 0.5)
    return quantity, as_words, ""


def _chatter(rng: random.Random, pool: tuple[str, ...]) -> str:
    """One line of `pool` with its {name} {n} {date} filled in."""
    return rng.choice(pool).format(name=rng.choice(FIRST_NAMES), n=rng.randint(100, 99999),
                                   date=f"{rng.randint(1, 28)} {rng.choice(MONTHS)}")


def _rich_order(rng: random.Random, item: str, plural: str, color: str, city: str) -> Order:
    """An order phrased by any train template, with a rich quantity and, a third of the time each, chatter."""
    quantity, as_words, quantity_text = _rich_quantity(rng)
    order = Order(item=item, color=color, quantity=quantity, city=city,
                  template=rng.choice(_templates(True) + RICH_TEMPLATES), as_words=as_words, plural=plural,
                  quantity_text=quantity_text,
                  prefix=_chatter(rng, RICH_PREFIXES) if rng.random() < 0.35 else "",
                  suffix=_chatter(rng, RICH_SUFFIXES) if rng.random() < 0.35 else "")
    return _phrasing(rng, order, True)


def _sample_rich_order(rng: random.Random) -> Order:
    """A real-vocabulary order from the wide pools (RICH_*)."""
    item = rng.choice(list(RICH_ITEMS))
    return _rich_order(rng, item, RICH_ITEMS[item], rng.choice(RICH_COLORS), rng.choice(RICH_CITIES))


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
                 copy: bool = False, compound_share: float = 0.0, rich: bool = False) -> list[dict]:
    """Draw `n` rows whose user sentences are not in `seen` (updated in place).

    held_out=True forces a held-out (item, city) pair, False forbids them, None allows any; copy=True draws
    copy-teaching orders (made-up values) instead; rich=True alone draws orders from the wide real pools, and
    with copy=True the rich copy-teaching orders.
    """
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise ValueError(f"could not draw {n} unique sentences")
        if copy:
            order = _sample_copy_order(rng, broad, compound_share, rich)
        elif rich:
            order = _sample_rich_order(rng)
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


# The quickstart's recipe (benchmarks/generalisation.py, variant rich50_800_60_lr1e-3_replay15; quickstart r16
# all-linear, 60 steps, lr 1e-3): 800 order rows, half from the wide pools (rich), 40% copy-teaching, 10% the first
# pools, all broadly phrased, plus 15% replay rows. Scored on orders_ood.jsonl / orders_independent.jsonl /
# orders_independent2.jsonl: 78.3% / 73.8% / 61.0%, against 63.3% / 33.8% / 28.0% for the previous recipe (copy 0.5 +
# broad, 400 rows, 30 steps at lr 5e-4) and 56.7% / 7.5% / - for the plain one (--copy-share 0 --no-broad
# --rich-share 0 --replay-share 0 --train 400). 60 rows: +-6 points; 80: +-5; 100: +-5.
DEFAULT_COPY_SHARE = 0.4
DEFAULT_BROAD = True
DEFAULT_RICH_SHARE = 0.5
DEFAULT_TRAIN_ROWS = 800
DEFAULT_REPLAY_SHARE = 0.15
REPLAY_FILE = Path(__file__).resolve().parent / "data" / "general_replay.jsonl"


def generate(seed: int, n_train: int, n_eval: int, copy_share: float = DEFAULT_COPY_SHARE,
             broad: bool = DEFAULT_BROAD, compound_share: float = 0.0,
             rich_share: float = DEFAULT_RICH_SHARE) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) rows; no user sentence appears twice across both splits.

    `copy_share` of the train rows are copy-teaching orders (their own random stream, then shuffled in);
    `broad` widens phrasing and quantities of every row; `compound_share` of the made-up items are two words;
    `rich_share` of the train rows are real-vocabulary orders from the wide pools (RICH_*, own stream), and with
    it the copy-teaching rows take the rich form (_sample_copy_order). Eval rows are the first pools' orders only.
    """
    if not (0 <= copy_share <= 1 and 0 <= rich_share <= 1 and copy_share + rich_share <= 1):
        raise ValueError(f"copy_share={copy_share} and rich_share={rich_share} must lie in [0, 1] with a sum <= 1")
    rng = random.Random(seed)
    seen: set[str] = set()
    n_copy, n_rich = round(n_train * copy_share), round(n_train * rich_share)
    train = _draw_unique(rng, n_train - n_copy - n_rich, seen, held_out=False, broad=broad)
    n_held = round(n_eval * HELD_OUT_EVAL_FRACTION)
    eval_rows = _draw_unique(rng, n_held, seen, held_out=True, broad=broad)
    eval_rows += _draw_unique(rng, n_eval - n_held, seen, held_out=None, broad=broad)
    rng.shuffle(eval_rows)
    if n_copy:
        train += _draw_unique(random.Random(f"copy-{seed}"), n_copy, seen, held_out=None, broad=broad, copy=True,
                              compound_share=compound_share, rich=rich_share > 0)
    if n_rich:
        train += _draw_unique(random.Random(f"rich-{seed}"), n_rich, seen, held_out=None, rich=True)
    if n_copy or n_rich:
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


def mix_in_replay(train: list[dict], replay_file: Path, share: float, seed: int) -> list[dict]:
    """`train` plus replay rows (the base model's own replies to general prompts: examples/make_replay.py) making
    up `share` of the result, drawn without replacement and shuffled in; their own random stream.

    Training on the base's own answers keeps the adapter close to the base off-task (lower forgetting KL)."""
    if not 0 <= share < 1:
        raise ValueError(f"replay_share={share} must lie in [0, 1)")
    n_replay = round(len(train) * share / (1 - share))
    if not n_replay:
        return train
    replay = [json.loads(line) for line in replay_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n_replay > len(replay):
        raise ValueError(f"{replay_file}: {len(replay)} rows, {n_replay} needed for replay_share={share}; "
                         "lower the share or generate more rows")
    rng = random.Random(f"replay-{seed}")
    mixed = train + rng.sample(replay, n_replay)
    rng.shuffle(mixed)
    return mixed


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
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN_ROWS, help="number of order rows in train")
    parser.add_argument("--eval", type=int, default=60, help="number of evaluation rows")
    parser.add_argument("--ood", type=int, default=60, help="number of out-of-distribution evaluation rows")
    parser.add_argument("--copy-share", type=float, default=DEFAULT_COPY_SHARE,
                        help="share of train rows that order made-up items/colours/cities (copy-teaching)")
    parser.add_argument("--broad", action=argparse.BooleanOptionalAction, default=DEFAULT_BROAD,
                        help="more phrasings, casing, 'a'/'an' for one, quantities 100-999")
    parser.add_argument("--compound-share", type=float, default=0.0,
                        help="share of made-up items written as two words (ambiguous next to made-up colours)")
    parser.add_argument("--rich-share", type=float, default=DEFAULT_RICH_SHARE,
                        help="share of train rows from the wide real pools (compound items, idioms, chatter)")
    parser.add_argument("--replay-share", type=float, default=DEFAULT_REPLAY_SHARE,
                        help="share of the train file made of replay rows (the base model's own general replies)")
    parser.add_argument("--replay-file", type=Path, default=REPLAY_FILE, help="replay rows (examples/make_replay.py)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent,
        help="folder whose data/ subfolder receives the files (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    train, eval_rows = generate(args.seed, args.train, args.eval, args.copy_share, args.broad, args.compound_share,
                                args.rich_share)
    train = mix_in_replay(train, args.replay_file, args.replay_share, args.seed)
    data_dir = args.out_dir / "data"
    write_jsonl_atomic(data_dir / "orders_train.jsonl", train)
    write_jsonl_atomic(data_dir / "orders_eval.jsonl", eval_rows)
    ood_rows = generate_ood(args.seed, args.ood)
    write_jsonl_atomic(data_dir / "orders_ood.jsonl", ood_rows)
    print(f"wrote {len(train)} train, {len(eval_rows)} eval and {len(ood_rows)} out-of-distribution rows to {data_dir}")


if __name__ == "__main__":
    main()
