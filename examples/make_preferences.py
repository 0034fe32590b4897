"""Generate the DPO example's preference set: answer in ONE short sentence.

SmolLM2-135M-Instruct answers a plain question with several sentences (an opener, the answer, a list of
details, a closing offer to help). Each row pairs a question with a chosen one-sentence answer and a rejected
answer in that long style: `{"prompt": question, "chosen": one sentence, "rejected": several sentences}` (TRL's
standard format). Questions cover facts, definitions, how-tos, advice, explanations and comparisons, written
here as templates and values (no download). The held-out file asks about subjects the training file never
mentions. Output is deterministic for a given --seed.

    python examples/make_preferences.py --seed 0 --train 400 --eval 60

`one_sentence` is the behaviour measure for the evaluation (evaluation.measure): 1 for a reply that is a
single short sentence, else 0; the trainer reports its mean (the one-sentence share) with its standard error.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from lorafit.fileio import write_text_atomic

MAX_WORDS = 30  # a "short" sentence
# . ! ? (and closing quotes or brackets) before a capital, a digit or the end: "e.g. this" stays one sentence
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[A-Z0-9\"'(]|\s*$)")

# country: (capital, continent, language, a detail)
COUNTRIES = {
    "France": ("Paris", "Europe", "French", "The Eiffel Tower stands there."),
    "Japan": ("Tokyo", "Asia", "Japanese", "It is one of the largest cities in the world."),
    "Brazil": ("Brasília", "South America", "Portuguese", "The city was built in the 1950s."),
    "Canada": ("Ottawa", "North America", "English and French", "The city lies on the Ottawa River."),
    "Egypt": ("Cairo", "Africa", "Arabic", "The pyramids of Giza are close by."),
    "Australia": ("Canberra", "Oceania", "English", "It was chosen as a compromise between Sydney and Melbourne."),
    "Germany": ("Berlin", "Europe", "German", "The Brandenburg Gate is its best-known landmark."),
    "Kenya": ("Nairobi", "Africa", "Swahili and English", "A national park lies at the edge of the city."),
    "Peru": ("Lima", "South America", "Spanish", "The city sits on the Pacific coast."),
    "India": ("New Delhi", "Asia", "Hindi and English", "It is part of the larger city of Delhi."),
    "Italy": ("Rome", "Europe", "Italian", "The Colosseum is one of its famous sights."),
    "Mexico": ("Mexico City", "North America", "Spanish", "It was built on the site of the Aztec city Tenochtitlan."),
    "Norway": ("Oslo", "Europe", "Norwegian", "The city sits at the end of a long fjord."),
    "Argentina": ("Buenos Aires", "South America", "Spanish", "It is known for the tango."),
    "Thailand": ("Bangkok", "Asia", "Thai", "The Chao Phraya River runs through it."),
    "Spain": ("Madrid", "Europe", "Spanish", "The Prado museum is there."),
    "Nigeria": ("Abuja", "Africa", "English", "It replaced Lagos as the capital in 1991."),
    "Chile": ("Santiago", "South America", "Spanish", "The Andes rise right behind the city."),
    "Sweden": ("Stockholm", "Europe", "Swedish", "The city is spread over fourteen islands."),
    "Vietnam": ("Hanoi", "Asia", "Vietnamese", "The city is more than a thousand years old."),
    "Portugal": ("Lisbon", "Europe", "Portuguese", "It is built on seven hills."),
    "Morocco": ("Rabat", "Africa", "Arabic and Berber", "It lies on the Atlantic coast."),
    "Greece": ("Athens", "Europe", "Greek", "The Acropolis overlooks the city."),
    "South Korea": ("Seoul", "Asia", "Korean", "Almost half of the country's people live in its metropolitan area."),
    "Poland": ("Warsaw", "Europe", "Polish", "Its old town was rebuilt after the Second World War."),
    "Colombia": ("Bogotá", "South America", "Spanish", "It lies high in the Andes."),
    "Turkey": ("Ankara", "Asia", "Turkish", "It became the capital in 1923."),
    "Ireland": ("Dublin", "Europe", "English and Irish", "The River Liffey divides the city."),
    "New Zealand": ("Wellington", "Oceania", "English and Maori", "It is known as a windy city."),
    "Ghana": ("Accra", "Africa", "English", "It lies on the Gulf of Guinea."),
}
COUNTRY_QUESTIONS = {
    "capital": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                "Tell me the capital of {country}.", "Do you know what the capital of {country} is?"],
    "language": ["What language do people speak in {country}?", "Which language is spoken in {country}?",
                 "What is the main language of {country}?"],
    "continent": ["On which continent is {country}?", "Where in the world is {country}?",
                  "Which continent is {country} part of?"],
}

# (kind, question, one-sentence answer, details for the long answer)
TOPICS = [
    ("definition", "What is photosynthesis?",
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
     ["It takes place in the chloroplasts of plant cells.", "The green pigment chlorophyll absorbs the light.",
      "The oxygen we breathe is released as a by-product."]),
    ("definition", "What is inflation?",
     "Inflation is the general rise of prices over time, which lowers what money can buy.",
     ["It is usually measured with a consumer price index.", "Central banks often aim for about two percent a year.",
      "High inflation makes savings lose value quickly."]),
    ("definition", "What is a black hole?",
     "A black hole is a region of space where gravity is so strong that not even light can escape.",
     ["Most form when very large stars collapse.", "The boundary around it is called the event horizon.",
      "Astronomers found them by watching stars orbit around nothing visible."]),
    ("definition", "What is an algorithm?",
     "An algorithm is a precise sequence of steps for solving a problem.",
     ["Computers run algorithms to do every task.", "A cooking recipe is an everyday example.",
      "Good algorithms solve problems quickly and correctly."]),
    ("definition", "What is democracy?",
     "Democracy is a system of government in which citizens choose their leaders by voting.",
     ["The word comes from Greek and means rule by the people.", "Ancient Athens is an early example.",
      "Free elections and free speech are central to it."]),
    ("definition", "What is a vaccine?",
     "A vaccine trains the immune system to recognise a germ so the body can fight it off later.",
     ["It often contains a weakened or harmless part of the germ.", "Vaccines have nearly wiped out several diseases.",
      "Some need booster doses to keep working."]),
    ("definition", "What is gravity?",
     "Gravity is the force that pulls objects with mass toward each other.",
     ["It keeps the planets in orbit around the Sun.", "Isaac Newton described it with a famous law.",
      "Einstein later explained it as the bending of space and time."]),
    ("definition", "What is a haiku?",
     "A haiku is a short Japanese poem of three lines with five, seven and five syllables.",
     ["It often describes nature or a season.", "Matsuo Basho is its most famous master.",
      "Many schools teach children to write them."]),
    ("definition", "What is compound interest?",
     "Compound interest is interest earned on both the original money and the interest already added.",
     ["It makes savings grow faster over time.", "It also makes debts grow faster.",
      "The longer the time, the stronger the effect."]),
    ("definition", "What is a noun?",
     "A noun is a word that names a person, place, thing or idea.",
     ["Examples are teacher, city, book and freedom.", "Nouns can be singular or plural.",
      "They often act as the subject of a sentence."]),
    ("definition", "What is DNA?",
     "DNA is the molecule that carries the genetic instructions of living things.",
     ["It has the shape of a double helix.", "It is made of four chemical bases.",
      "Children inherit half of their DNA from each parent."]),
    ("definition", "What is a volcano?",
     "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape.",
     ["Many volcanoes form where tectonic plates meet.", "The molten rock is called lava once it reaches the surface.",
      "Some volcanoes have not erupted for thousands of years."]),
    ("definition", "What is machine learning?",
     "Machine learning is a way of building computer programs that learn patterns from data instead of "
     "following hand-written rules.",
     ["It powers spam filters and voice assistants.", "Models improve as they see more examples.",
      "Neural networks are one popular kind of model."]),
    ("definition", "What is a metaphor?",
     "A metaphor describes one thing as if it were another to suggest a likeness.",
     ["Saying time is money is a metaphor.", "Poets and writers use them constantly.",
      "Unlike a simile, it does not use like or as."]),
    ("definition", "What is erosion?",
     "Erosion is the slow wearing away of rock and soil by water, wind or ice.",
     ["Rivers carve valleys through it.", "It can take millions of years to shape a landscape.",
      "Planting trees helps protect soil from it."]),
    ("definition", "What is a budget?",
     "A budget is a plan for how much money you will earn and spend over a period.",
     ["It helps you avoid spending more than you earn.", "Many people review theirs every month.",
      "Apps and spreadsheets make it easier to keep one."]),
    ("definition", "What is a galaxy?",
     "A galaxy is a huge system of stars, gas and dust held together by gravity.",
     ["Our galaxy is called the Milky Way.", "It contains hundreds of billions of stars.",
      "There are billions of galaxies in the universe."]),
    ("definition", "What is an allergy?",
     "An allergy is when the immune system overreacts to a normally harmless substance such as pollen.",
     ["Common symptoms are sneezing, itching and rashes.", "Some allergies can be dangerous.",
      "Antihistamines often ease the symptoms."]),
    ("howto", "How do I boil an egg?",
     "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
     ["Place the egg in a pot and cover it with water.", "Bring the water to a boil over medium heat.",
      "Cook it for nine to twelve minutes.", "Move it to a bowl of cold water before peeling."]),
    ("howto", "How do I make a cup of tea?",
     "Pour freshly boiled water over a tea bag and let it steep for three to five minutes.",
     ["Boil fresh water in a kettle.", "Put a tea bag in your cup.", "Pour the water over it and wait a few minutes.",
      "Remove the bag and add milk or sugar if you like."]),
    ("howto", "How do I reset my router?",
     "Unplug the router, wait thirty seconds, and plug it back in.",
     ["Find the power cable at the back of the router.", "Unplug it and wait about thirty seconds.",
      "Plug it back in and wait for the lights to settle.", "Check that your devices reconnect."]),
    ("howto", "How do I tie a tie?",
     "Cross the wide end over the narrow end, wrap it around, pull it up through the neck loop and down "
     "through the front knot.",
     ["Drape the tie around your neck with the wide end longer.", "Cross the wide end over the narrow end.",
      "Bring it up through the loop around your neck.", "Pull it down through the knot in front and tighten it."]),
    ("howto", "How do I plant a tree?",
     "Dig a hole twice as wide as the root ball, set the tree in at the same depth, fill it with soil and water "
     "it well.",
     ["Choose a sunny spot with enough space.", "Dig a wide hole about as deep as the root ball.",
      "Set the tree in and fill the hole with soil.", "Water it deeply and add mulch around the base."]),
    ("howto", "How do I change a flat tire?",
     "Loosen the nuts, jack up the car, swap the wheel for the spare and tighten the nuts again.",
     ["Park on flat ground and turn on your hazard lights.", "Loosen the lug nuts slightly.",
      "Lift the car with the jack and remove the flat tire.",
      "Mount the spare and tighten the nuts in a star pattern."]),
    ("howto", "How do I take a screenshot on Windows?",
     "Press the Windows key, Shift and S together, then select the area you want to capture.",
     ["Press Windows, Shift and S at the same time.", "Drag to select the area of the screen.",
      "The picture is copied to the clipboard.", "Paste it into any document or image editor."]),
    ("howto", "How do I cook rice?",
     "Simmer one cup of rinsed rice in two cups of water, covered, for about eighteen minutes.",
     ["Rinse the rice until the water runs clear.", "Add it to a pot with twice as much water.",
      "Bring it to a boil, then cover and simmer.", "Let it rest for five minutes before serving."]),
    ("howto", "How do I write a cover letter?",
     "Write one page that says which job you want, why you fit it and how you can help the company.",
     ["Address the letter to a named person if you can.", "Open with the position you are applying for.",
      "Give two or three examples of relevant achievements.", "Close by asking for an interview."]),
    ("howto", "How do I clean a cast iron pan?",
     "Scrub it with hot water and a brush, dry it fully and rub in a thin layer of oil.",
     ["Let the pan cool a little.", "Scrub it under hot water without soap.", "Dry it completely on the stove.",
      "Rub a few drops of oil over the surface."]),
    ("howto", "How do I back up my phone?",
     "Turn on the cloud backup in your phone's settings and let it run while the phone charges on Wi-Fi.",
     ["Open the settings app.", "Find the backup section under your account.", "Turn on automatic backup.",
      "Connect to Wi-Fi and a charger so it can finish."]),
    ("howto", "How do I remove a coffee stain?",
     "Blot the stain, rinse it with cold water and treat it with a little dish soap before washing.",
     ["Blot up as much coffee as you can.", "Rinse the back of the fabric with cold water.",
      "Rub in a drop of dish soap.", "Wash the item as usual."]),
    ("howto", "How do I start running?",
     "Begin with short run-walk sessions three times a week and add a little running time each week.",
     ["Get a pair of comfortable running shoes.", "Alternate one minute of running with two of walking.",
      "Go out three times a week.", "Increase the running time slowly over a few weeks."]),
    ("advice", "How can I sleep better?",
     "Go to bed at the same time every night and keep screens out of the bedroom.",
     ["Keep a regular schedule, even at weekends.", "Avoid caffeine in the afternoon.",
      "Keep your bedroom cool, dark and quiet.", "Put your phone away an hour before bed."]),
    ("advice", "How can I save money on groceries?",
     "Plan your meals for the week and buy only what is on your list.",
     ["Plan meals before you shop.", "Make a list and stick to it.", "Compare unit prices.",
      "Buy store brands and seasonal produce."]),
    ("advice", "How can I be more productive?",
     "Do your most important task first, before you check messages.",
     ["Write a short list of priorities each morning.", "Work in focused blocks of time.",
      "Turn off notifications.", "Take short breaks to recharge."]),
    ("advice", "How do I prepare for a job interview?",
     "Research the company and practise short answers about your own experience.",
     ["Read about the company and its products.", "Prepare examples of your achievements.",
      "Practise answering common questions out loud.", "Prepare a few questions to ask them."]),
    ("advice", "How can I learn a new language faster?",
     "Practise a little every day and speak with native speakers as early as you can.",
     ["Study for a short time every day.", "Learn the most common words first.",
      "Listen to podcasts and watch shows in the language.", "Find a conversation partner."]),
    ("advice", "How can I reduce stress?",
     "Take a short walk or breathe slowly for a few minutes whenever stress builds up.",
     ["Exercise regularly.", "Practise slow, deep breathing.", "Talk to friends or family.",
      "Get enough sleep."]),
    ("advice", "What should I do if I can't sleep?",
     "Get up, do something calm in dim light, and go back to bed when you feel sleepy.",
     ["Do not stay in bed tossing and turning.", "Read a book in dim light.", "Avoid looking at your phone.",
      "Return to bed when you feel drowsy."]),
    ("advice", "How can I make friends in a new city?",
     "Join a club or class around a hobby you enjoy and go to it regularly.",
     ["Join a sports team or a hobby club.", "Take a class at a community centre.",
      "Say yes to invitations from coworkers.", "Volunteer for a local cause."]),
    ("advice", "How can I stop procrastinating?",
     "Start with just five minutes of the task, since starting is usually the hardest part.",
     ["Break the task into small steps.", "Set a timer for a short session.", "Remove distractions.",
      "Reward yourself when you finish."]),
    ("advice", "How much water should I drink a day?",
     "Most adults do well with about two litres a day, more when it is hot or they exercise.",
     ["Your needs depend on your size and activity.", "Food also provides some water.",
      "Pale yellow urine is a sign you are drinking enough.", "Drink more in hot weather."]),
    ("advice", "How can I keep my houseplants alive?",
     "Water them only when the top of the soil is dry and give them plenty of indirect light.",
     ["Check the soil with your finger before watering.", "Place them near a bright window.",
      "Make sure the pots can drain.", "Feed them a little fertiliser in spring."]),
    ("advice", "How can I improve my writing?",
     "Read widely and cut every word your sentences do not need.",
     ["Read good writers every day.", "Write something every day.", "Use short, clear sentences.",
      "Ask someone you trust for feedback."]),
    ("explanation", "Why is the sky blue?",
     "Air scatters blue sunlight more than red light, so blue light reaches our eyes from all over the sky.",
     ["Sunlight contains all colours.", "Short blue wavelengths scatter the most.",
      "This effect is called Rayleigh scattering.", "At sunset the light travels further and looks red."]),
    ("explanation", "Why do we have seasons?",
     "The Earth's axis is tilted, so each half of the planet gets more direct sunlight for part of the year.",
     ["The tilt is about 23 degrees.", "Summer comes when your half leans toward the Sun.",
      "The distance to the Sun matters very little.", "The seasons are reversed in the other hemisphere."]),
    ("explanation", "Why do leaves change color in autumn?",
     "As days shorten, trees stop making green chlorophyll and the yellow and red pigments show through.",
     ["Chlorophyll gives leaves their green colour.", "Trees stop producing it when days get shorter.",
      "Yellow and orange pigments were there all along.", "Red colours come from new pigments made in autumn."]),
    ("explanation", "Why does ice float?",
     "Water expands when it freezes, so ice is less dense than liquid water and floats on it.",
     ["Most substances shrink when they freeze.", "Water molecules form an open crystal in ice.",
      "This is why lakes freeze from the top down.", "Fish can survive under the ice."]),
    ("explanation", "Why do cats purr?",
     "Cats purr mostly when they are content, but also to calm themselves when stressed or hurt.",
     ["The sound comes from muscles in the voice box.", "Kittens purr when they are nursing.",
      "Purring may even help bones heal.", "Some big cats cannot purr."]),
    ("explanation", "Why is the ocean salty?",
     "Rivers carry dissolved minerals from rocks into the sea, and the salt stays behind when water evaporates.",
     ["Rain slowly breaks down rocks on land.", "Rivers carry the minerals to the ocean.",
      "Evaporation removes water but not salt.", "This has gone on for millions of years."]),
    ("explanation", "Why do we yawn?",
     "Yawning probably helps cool the brain and keep us alert when we are tired or bored.",
     ["Everyone yawns, even babies before birth.", "Yawns are contagious between people.",
      "Scientists still debate the exact reason.", "Many animals yawn too."]),
    ("explanation", "Why do onions make you cry?",
     "Cutting an onion releases a gas that irritates your eyes, which then make tears to wash it away.",
     ["Cutting breaks the onion's cells.", "A chemical reaction produces an irritating gas.",
      "The gas reaches your eyes.", "Chilling the onion first helps."]),
    ("explanation", "Why do planes leave white trails?",
     "Hot, humid engine exhaust freezes into ice crystals in the cold air, forming the white trails.",
     ["They are called contrails.", "Engine exhaust contains water vapour.",
      "At high altitude the air is far below freezing.", "In dry air the trails vanish quickly."]),
    ("explanation", "Why does bread go stale?",
     "Bread goes stale because its starch slowly recrystallises and pushes water out, making it hard.",
     ["Fresh bread has soft, swollen starch.", "Over time the starch hardens again.",
      "It happens faster in the fridge.", "Warming stale bread softens it briefly."]),
    ("explanation", "Why do we need sleep?",
     "Sleep lets the body repair itself and the brain store memories and clear out waste.",
     ["Muscles recover during deep sleep.", "The brain sorts the day's memories.",
      "Waste products are cleared from the brain.", "Lack of sleep harms mood and focus."]),
    ("comparison", "What is the difference between weather and climate?",
     "Weather is the state of the air on a given day, while climate is the average weather over many years.",
     ["Weather can change from hour to hour.", "Climate describes long-term patterns.",
      "A cold day does not change the climate.", "Scientists use thirty-year averages."]),
    ("comparison", "What is the difference between a virus and a bacterium?",
     "A bacterium is a living single cell, while a virus is much smaller and can only reproduce inside a host's "
     "cells.",
     ["Bacteria can live on their own.", "Viruses need a host cell to copy themselves.",
      "Antibiotics work on bacteria but not on viruses.", "Many bacteria are harmless or useful."]),
    ("comparison", "What is the difference between speed and velocity?",
     "Speed is how fast something moves, while velocity is speed in a given direction.",
     ["Speed is a scalar.", "Velocity is a vector.", "A car driving in a circle at constant speed changes velocity.",
      "Both are measured in metres per second."]),
    ("comparison", "What is the difference between a crocodile and an alligator?",
     "Alligators have a wide U-shaped snout, while crocodiles have a narrower V-shaped one.",
     ["Crocodiles often show their lower teeth.", "Alligators prefer fresh water.",
      "Crocodiles can live in salt water.", "Both are large reptiles."]),
    ("comparison", "What is the difference between RAM and storage?",
     "RAM holds the data a computer is using right now, while storage keeps files even when the power is off.",
     ["RAM is much faster than storage.", "RAM is cleared when the computer turns off.",
      "Storage is usually much larger.", "Both are measured in gigabytes."]),
    ("comparison", "What is the difference between baking soda and baking powder?",
     "Baking soda needs an acid in the recipe to rise, while baking powder already contains its own acid.",
     ["Baking soda is pure sodium bicarbonate.", "Baking powder adds a dry acid to it.",
      "Recipes with buttermilk often use baking soda.", "They cannot always be swapped one for one."]),
    ("comparison", "What is the difference between a lake and a pond?",
     "A lake is larger and deeper than a pond, deep enough that sunlight does not reach all of its bottom.",
     ["Ponds are usually shallow.", "Plants can grow across a whole pond.",
      "Lakes have layers of different temperatures.", "There is no strict size rule."]),
    ("comparison", "What is the difference between a simile and a metaphor?",
     "A simile compares two things using like or as, while a metaphor says one thing is another.",
     ["Brave as a lion is a simile.", "He is a lion in battle is a metaphor.",
      "Both are figures of speech.", "Writers use them to create images."]),
]

QUESTION_PREFIXES = ["", "Quick question: ", "I was wondering, ", "Can you help me? ", "Hi! "]
# "" = no opener: the base model often starts straight with a restatement of the question
OPENERS = ["", "", "Certainly!", "Great question!", "Sure, I'd be happy to help.", "Of course!"]
LIST_INTROS = {"howto": "Here is a step-by-step guide:", "advice": "Here are some tips that can help:"}
CLOSERS = ["I hope this helps! Let me know if you have any other questions.",
           "Let me know if you would like more details.",
           "Feel free to ask if you want to know more!",
           "I hope this information is useful to you."]
FILLERS = {
    "definition": "It is an important idea to understand.",
    "explanation": "It is a fascinating topic that scientists have studied for a long time.",
    "comparison": "Understanding the difference helps avoid common confusion.",
    "howto": "With a little practice, it becomes easy.",
    "advice": "Small changes can make a big difference over time.",
    "fact": "It is a fascinating place with a rich history and culture.",
}


def country_entries() -> list[tuple[str, list[str], str, list[str]]]:
    """(subject, question phrasings, one-sentence answer, details) for each country x attribute."""
    entries = []
    for country, (capital, continent, language, detail) in COUNTRIES.items():
        answers = {"capital": f"The capital of {country} is {capital}.",
                   "language": f"People in {country} mainly speak {language}.",
                   "continent": f"{country} is in {continent}."}
        details = [f"{capital} is its capital and largest political centre.", detail,
                   f"The country is located in {continent}.", f"The main language is {language}."]
        for key, phrasings in COUNTRY_QUESTIONS.items():
            entries.append((country, [p.format(country=country) for p in phrasings], answers[key], details))
    return entries


def topic_entries() -> list[tuple[str, list[str], str, list[str]]]:
    def ask(prefix: str, question: str) -> str:
        return prefix + (question[0].lower() + question[1:] if prefix.endswith(", ") else question)

    return [(question, [ask(prefix, question) for prefix in QUESTION_PREFIXES], answer, details)
            for _, question, answer, details in TOPICS]


def long_answer(rng: random.Random, kind: str, answer: str, details: list[str]) -> str:
    """The verbose style the base model shows: an opener, the answer, details (a numbered list for how-tos and
    advice), a filler remark and a closing offer."""
    parts = [rng.choice(OPENERS), answer]
    if kind in LIST_INTROS:
        steps = "\n".join(f"{i}. {step}" for i, step in enumerate(details, start=1))
        parts.append(f"{LIST_INTROS[kind]}\n\n{steps}\n")
    else:
        parts.append(" ".join(rng.sample(details, k=min(3, len(details)))))
    parts += [FILLERS[kind], rng.choice(CLOSERS)]
    return " ".join(part for part in parts if part).replace("\n ", "\n")


def generate(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows; held-out subjects (a country, a topic) never appear in the training rows."""
    rng = random.Random(seed)
    kinds = {question: kind for kind, question, _, _ in TOPICS}
    entries = [(kinds.get(entry[0], "fact"), *entry) for entry in country_entries() + topic_entries()]
    subjects = sorted({entry[1] for entry in entries})
    rng.shuffle(subjects)
    held_out = set(subjects[: max(1, len(subjects) // 5)])
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for kind, subject, phrasings, answer, details in entries:
        for question in phrasings:
            rows[subject in held_out].append(
                {"prompt": question, "chosen": answer, "rejected": long_answer(rng, kind, answer, details)})
    train, evaluation = rows[False], rows[True]
    if n_train > len(train) or n_eval > len(evaluation):
        raise SystemExit(f"at most {len(train)} train and {len(evaluation)} eval rows can be made without "
                         f"repeating a question (asked for {n_train} and {n_eval}).")
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train[:n_train], evaluation[:n_eval]


def sentences(reply: str) -> list[str]:
    """The sentences of a reply: text up to . ! or ? followed by a capital, a digit or the end; a line break
    ends one too (so each item of a list counts)."""
    pieces = []
    for line in reply.strip().splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            pieces.append(line[start : match.end()])
            start = match.end()
        pieces.append(line[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def is_one_sentence(reply: str, max_words: int = MAX_WORDS) -> bool:
    """One short sentence: a single sentence of at most `max_words` words."""
    found = sentences(reply)
    return len(found) == 1 and len(found[0].split()) <= max_words


def one_sentence(prompts: list[str], completions: list[str], **fields: object) -> list[float]:
    """The behaviour measure (evaluation.measure, called like a reward function): 1.0 for each reply that is one
    short sentence, else 0.0; its mean over the held-out replies is their one-sentence share."""
    return [float(is_one_sentence(reply)) for reply in completions]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400, help="number of training pairs")
    parser.add_argument("--eval", type=int, default=60, help="number of held-out pairs")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder whose data/ subfolder receives the files (default: this script's folder)")
    args = parser.parse_args(argv)
    train, evaluation = generate(args.seed, args.train, args.eval)
    data_dir = args.out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "short_answers_train.jsonl", train)
    write_jsonl(data_dir / "short_answers_eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} held-out preference pairs to {data_dir}")


if __name__ == "__main__":
    main()
