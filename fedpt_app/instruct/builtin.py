"""The built-in, offline instruction dataset and the pre-training corpus of the tiny preset.

Both are generated deterministically from one small "world" of facts (capitals, animal sounds, antonyms,
colours) and rules (arithmetic, parity, counting, ordering). The pre-training corpus states the facts as plain
sentences; the instruction dataset asks about them in the prompt template, so instruction tuning has to teach
the format while pre-training supplies the knowledge, as with real base models.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

CAPITALS = {
    "france": "paris",
    "germany": "berlin",
    "italy": "rome",
    "spain": "madrid",
    "portugal": "lisbon",
    "greece": "athens",
    "poland": "warsaw",
    "austria": "vienna",
    "sweden": "stockholm",
    "norway": "oslo",
    "finland": "helsinki",
    "denmark": "copenhagen",
    "ireland": "dublin",
    "belgium": "brussels",
    "hungary": "budapest",
    "egypt": "cairo",
    "kenya": "nairobi",
    "japan": "tokyo",
    "china": "beijing",
    "india": "delhi",
    "russia": "moscow",
    "canada": "ottawa",
    "mexico": "mexico city",
    "peru": "lima",
    "chile": "santiago",
    "cuba": "havana",
    "iran": "tehran",
    "iraq": "baghdad",
    "turkey": "ankara",
    "thailand": "bangkok",
    "vietnam": "hanoi",
    "nepal": "kathmandu",
    "ghana": "accra",
    "morocco": "rabat",
    "argentina": "buenos aires",
    "colombia": "bogota",
    "australia": "canberra",
    "brazil": "brasilia",
}
ANIMAL_SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "lion": "roar",
    "owl": "hoot",
    "frog": "croak",
    "snake": "hiss",
    "bee": "buzz",
    "mouse": "squeak",
    "goat": "bleat",
    "wolf": "howl",
    "crow": "caw",
    "donkey": "bray",
    "bird": "tweet",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "up": "down",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "new": "old",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "young": "old",
    "loud": "quiet",
    "clean": "dirty",
    "thick": "thin",
    "heavy": "light",
    "near": "far",
    "inside": "outside",
    "day": "night",
    "first": "last",
    "win": "lose",
    "push": "pull",
    "give": "take",
    "love": "hate",
    "true": "false",
    "left": "right",
    "north": "south",
    "east": "west",
    "buy": "sell",
    "begin": "end",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
    "the sea": "blue",
    "milk": "white",
    "a carrot": "orange",
    "a leaf": "green",
    "blood": "red",
    "chocolate": "brown",
    "an eggplant": "purple",
    "the sun": "yellow",
    "a strawberry": "red",
    "soil": "brown",
    "ink": "black",
    "a lime": "green",
}
NAMES = [
    "anna",
    "ben",
    "carla",
    "david",
    "emma",
    "felix",
    "grace",
    "henry",
    "ivy",
    "jack",
    "kate",
    "leo",
    "mia",
    "noah",
    "olga",
    "paul",
    "rosa",
    "sam",
    "tina",
    "victor",
]
ITEMS = ["apples", "pears", "books", "coins", "pens", "cards", "shells", "stones", "cups", "hats"]
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "tree",
    "river",
    "stone",
    "cloud",
    "house",
    "bread",
    "lamp",
    "chair",
    "moon",
    "star",
    "road",
    "ship",
    "door",
    "bell",
    "rain",
]
NUMBER_RANGE = 20

CATEGORIES = ("capital", "animal_sound", "antonym", "color", "arithmetic", "parity", "counting", "largest", "reverse")


@dataclass(frozen=True)
class Example:
    instruction: str
    context: str
    response: str
    category: str

    def as_row(self) -> dict[str, str]:
        return {
            "instruction": self.instruction,
            "context": self.context,
            "response": self.response,
            "category": self.category,
        }


# Knowledge questions of each split ask about disjoint entities (all facts are in the pre-training corpus), so
# a test question never appears in instruction form in training: the model must bring the fact from pre-training.
SPLIT_SHARES = {"test": (0.0, 0.25), "server": (0.25, 0.45), "train": (0.45, 1.0)}


def _entities(table: dict[str, str], split: str) -> list[str]:
    names = sorted(table)
    random.Random("entity-pools").shuffle(names)
    low, high = SPLIT_SHARES[split]
    return names[int(low * len(names)) : int(high * len(names))]


def _capital(rng: random.Random, split: str) -> Example:
    country = rng.choice(_entities(CAPITALS, split))
    return Example(
        f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}.", "capital"
    )


def _animal_sound(rng: random.Random, split: str) -> Example:
    animal = rng.choice(_entities(ANIMAL_SOUNDS, split))
    return Example(f"What sound does a {animal} make?", "", f"A {animal} says {ANIMAL_SOUNDS[animal]}.", "animal_sound")


def _antonym(rng: random.Random, split: str) -> Example:
    word = rng.choice(_entities(ANTONYMS, split))
    return Example(f"What is the opposite of {word}?", "", f"The opposite of {word} is {ANTONYMS[word]}.", "antonym")


def _color(rng: random.Random, split: str) -> Example:
    thing = rng.choice(_entities(COLORS, split))
    return Example(f"What color is {thing}?", "", f"{thing[0].upper()}{thing[1:]} is {COLORS[thing]}.", "color")


def _arithmetic(rng: random.Random, split: str) -> Example:
    a, b = rng.randint(0, NUMBER_RANGE), rng.randint(0, NUMBER_RANGE)
    if rng.random() < 0.5:
        return Example(f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}.", "arithmetic")
    a, b = max(a, b), min(a, b)
    return Example(f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}.", "arithmetic")


def _parity(rng: random.Random, split: str) -> Example:
    n = rng.randint(0, 99)
    return Example(f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}.", "parity")


def _counting(rng: random.Random, split: str) -> Example:
    first, second = rng.sample(NAMES, 2)
    item_a, item_b = rng.sample(ITEMS, 2)
    count_a, count_b = rng.randint(1, 9), rng.randint(1, 9)
    context = f"{first} has {count_a} {item_a}. {second} has {count_b} {item_b}."
    if rng.random() < 0.5:
        return Example(f"How many {item_a} does {first} have?", context, f"{first} has {count_a} {item_a}.", "counting")
    return Example(f"How many {item_b} does {second} have?", context, f"{second} has {count_b} {item_b}.", "counting")


def _largest(rng: random.Random, split: str) -> Example:
    numbers = rng.sample(range(1, 50), 3)
    listed = ", ".join(str(n) for n in numbers)
    return Example(f"Which number is the largest: {listed}?", "", f"The largest number is {max(numbers)}.", "largest")


def _reverse(rng: random.Random, split: str) -> Example:
    words = rng.sample(WORDS, 3)
    return Example("Reverse the order of these words.", " ".join(words), " ".join(reversed(words)), "reverse")


GENERATORS = {
    "capital": _capital,
    "animal_sound": _animal_sound,
    "antonym": _antonym,
    "color": _color,
    "arithmetic": _arithmetic,
    "parity": _parity,
    "counting": _counting,
    "largest": _largest,
    "reverse": _reverse,
}
assert tuple(GENERATORS) == CATEGORIES

BUILTIN_SPLITS = {"test": 270, "server": 450, "train": 2700}  # generated in this order


@functools.cache
def _all_splits(seed: int) -> dict[str, tuple[Example, ...]]:
    """Balanced categories; a question asked in one split is never asked in a later one."""
    asked_before: set[tuple[str, str]] = set()
    splits = {}
    for split, size in BUILTIN_SPLITS.items():
        rng = random.Random(f"builtin-{split}-{seed}")
        examples = []
        for category in CATEGORIES:
            for _ in range(size // len(CATEGORIES)):
                example = GENERATORS[category](rng, split)
                while (example.instruction, example.context) in asked_before:
                    example = GENERATORS[category](rng, split)
                examples.append(example)
        rng.shuffle(examples)
        asked_before |= {(example.instruction, example.context) for example in examples}
        splits[split] = tuple(examples)
    return splits


def builtin_instruction_split(split: str, seed: int = 0) -> list[dict[str, str]]:
    """Rows of one split of the built-in instruction set: the same rows for the same split and seed."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"Unknown split {split!r} of the built-in dataset; choose one of {sorted(BUILTIN_SPLITS)}")
    return [example.as_row() for example in _all_splits(seed)[split]]


# --- pre-training corpus: the same world as plain sentences, never in the instruction format -------------


def _fact_sentences(rng: random.Random) -> list[str]:
    country = rng.choice(sorted(CAPITALS))
    animal = rng.choice(sorted(ANIMAL_SOUNDS))
    word = rng.choice(sorted(ANTONYMS))
    thing = rng.choice(sorted(COLORS))
    a, b = rng.randint(0, NUMBER_RANGE), rng.randint(0, NUMBER_RANGE)
    n = rng.randint(0, 99)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count = rng.randint(1, 9)
    numbers = rng.sample(range(1, 50), 3)
    words = rng.sample(WORDS, 3)
    return [
        rng.choice(
            [f"the capital of {country} is {CAPITALS[country]}.", f"{CAPITALS[country]} is the capital of {country}."]
        ),
        rng.choice(
            [f"a {animal} says {ANIMAL_SOUNDS[animal]}.", f"the {animal} makes the sound {ANIMAL_SOUNDS[animal]}."]
        ),
        rng.choice([f"the opposite of {word} is {ANTONYMS[word]}.", f"{word} and {ANTONYMS[word]} are opposites."]),
        f"{thing} is {COLORS[thing]}.",
        f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{max(a, b)} minus {min(a, b)} is {abs(a - b)}.",
        f"{n} is {'even' if n % 2 == 0 else 'odd'}.",
        f"{name} has {count} {item}.",
        f"of {numbers[0]}, {numbers[1]} and {numbers[2]} the largest number is {max(numbers)}.",
        f"{' '.join(words)} backwards is {' '.join(reversed(words))}.",
    ]


def pretraining_corpus(num_documents: int, seed: int) -> list[str]:
    """Documents of a few shuffled fact sentences each; different seeds give disjoint-looking text."""
    rng = random.Random(f"corpus-{seed}")
    documents = []
    for _ in range(num_documents):
        sentences = _fact_sentences(rng)
        rng.shuffle(sentences)
        kept = sentences[: rng.randint(4, len(sentences))]
        documents.append(" ".join(sentence[0].upper() + sentence[1:] for sentence in kept))
    return documents
