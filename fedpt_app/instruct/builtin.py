"""The built-in, offline instruction dataset and the pre-training corpus of the tiny preset.

Both are generated deterministically from one small "world": facts (capitals, animal sounds, antonyms, colours,
and the home towns and jobs of a few hundred people) and rules (parity, counting, the largest of three numbers).
The pre-training corpus states the facts as plain lowercase sentences, and for most of them first asks the
question in plain text ("what is the capital of peru? the answer is lima."), so a pre-trained model can carry an
entity from a question to its answer; the instruction dataset asks the same questions in the prompt template, so
instruction tuning has to teach the format while pre-training supplies the knowledge, as with real base models.
`web_answer_rows` are the templated questions, answered in mixed phrasings, that the large model also reads.
The people are many, and each fact about them is stated about as often as the others: a model memorises them in
proportion to its capacity, which is what separates the tiny preset's small and large models.

Arithmetic and word reversal were dropped: no model of the preset's size learned them, LoRA on the large one
included (exact match 0 in `docs/results.md`'s preset study).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
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
FAMILY_NAMES = [
    "dorvek", "malin", "tarsk", "velund", "corbin", "ashby", "brenner", "calder", "dunmore", "eskel", "farrow",
    "gilmore", "harlan", "ingram", "jessop", "kendall", "lorne", "mercer", "norcott", "orwin", "pryor", "quill",
    "rowan", "selby", "thorne",
]  # fmt: skip
TOWNS = [
    "ardel", "brisk", "corvo", "dunmar", "elbin", "fenwick", "galto", "hollin", "istra", "jorvik", "kelso", "lumen",
    "morrow", "norwin", "oakby", "pellam", "quarry", "rivet", "stave", "tamber",
]  # fmt: skip
JOBS = [
    "baker", "farmer", "doctor", "teacher", "pilot", "singer", "painter", "sailor", "builder", "writer", "nurse",
    "driver", "cook", "miner", "tailor", "judge",
]  # fmt: skip
NUM_PEOPLE = 500
PEOPLE_FACTS_PER_DOCUMENT = 4  # of each of the two kinds: people are many, so they get more of the corpus
QUESTION_SHARE = 0.75  # of the corpus's facts come after their question in plain text


def _people() -> dict[str, tuple[str, str]]:
    """Full name -> (home town, job): a fact depends on both names, so it cannot be read off one token."""
    rng = random.Random("people")
    names = [f"{first} {family}" for first in NAMES for family in FAMILY_NAMES]
    rng.shuffle(names)
    return {name: (rng.choice(TOWNS), rng.choice(JOBS)) for name in sorted(names[:NUM_PEOPLE])}


PEOPLE = _people()
HOME_TOWNS = {name: town for name, (town, _) in PEOPLE.items()}
PEOPLE_JOBS = {name: job for name, (_, job) in PEOPLE.items()}


@dataclass(frozen=True)
class Fact:
    """One question of the world: its plain-text statement and its short answer."""

    question: str
    statement: str
    answer: str
    context: str = ""


# Knowledge: facts the pre-training corpus states, looked up by entity.
KNOWLEDGE_TABLES: dict[str, tuple[dict[str, str], Callable[[str, str], Fact]]] = {
    "capital": (CAPITALS, lambda x, y: Fact(f"what is the capital of {x}?", f"the capital of {x} is {y}.", y)),
    "animal_sound": (ANIMAL_SOUNDS, lambda x, y: Fact(f"what sound does a {x} make?", f"a {x} says {y}.", y)),
    "antonym": (ANTONYMS, lambda x, y: Fact(f"what is the opposite of {x}?", f"the opposite of {x} is {y}.", y)),
    "color": (COLORS, lambda x, y: Fact(f"what color is {x}?", f"the color of {x} is {y}.", y)),
    "home_town": (
        HOME_TOWNS,
        lambda x, y: Fact(f"what is the home town of {x}?", f"the home town of {x} is {y}.", y),
    ),
    "job": (PEOPLE_JOBS, lambda x, y: Fact(f"what is the job of {x}?", f"the job of {x} is {y}.", y)),
}


def _parity(rng: random.Random) -> Fact:
    n = rng.randint(0, 99)
    kind = "even" if n % 2 == 0 else "odd"
    return Fact(f"is {n} even or odd?", f"{n} is {kind}.", kind)


def _counting(rng: random.Random) -> Fact:
    first, second = rng.sample(NAMES, 2)
    item_a, item_b = rng.sample(ITEMS, 2)
    count_a, count_b = rng.randint(1, 9), rng.randint(1, 9)
    context = f"{first} has {count_a} {item_a}. {second} has {count_b} {item_b}."
    who, item, count = (first, item_a, count_a) if rng.random() < 0.5 else (second, item_b, count_b)
    return Fact(f"how many {item} does {who} have?", f"{who} has {count} {item}.", str(count), context)


def _largest(rng: random.Random) -> Fact:
    numbers = rng.sample(range(1, 50), 3)
    listed = ", ".join(str(n) for n in numbers)
    return Fact(f"which number is the largest: {listed}?", f"the largest number is {max(numbers)}.", str(max(numbers)))


# Skills: rules applied to fresh inputs.
SKILLS: dict[str, Callable[[random.Random], Fact]] = {"parity": _parity, "counting": _counting, "largest": _largest}
CATEGORIES = (*KNOWLEDGE_TABLES, *SKILLS)
CATEGORY_KINDS = {category: "knowledge" for category in KNOWLEDGE_TABLES} | {category: "skill" for category in SKILLS}


def answer_sentence(answer: str) -> str:
    """How every answer is phrased, in the corpus after a question and in the instruction set's responses."""
    return f"the answer is {answer}."


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


def _fact(category: str, rng: random.Random, split: str) -> Fact:
    if category in KNOWLEDGE_TABLES:
        table, fact_about = KNOWLEDGE_TABLES[category]
        entity = rng.choice(_entities(table, split))
        return fact_about(entity, table[entity])
    return SKILLS[category](rng)


def _example(category: str, rng: random.Random, split: str) -> Example:
    fact = _fact(category, rng, split)
    return Example(fact.question, fact.context, answer_sentence(fact.answer), category)


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
                example = _example(category, rng, split)
                while (example.instruction, example.context) in asked_before:
                    example = _example(category, rng, split)
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


# --- pre-training corpus: the same world in plain text, never in the instruction format ------------------


# (entities in a fixed order, table, its facts, facts per document)
_CORPUS_TABLES = [
    (sorted(table), table, fact_about, PEOPLE_FACTS_PER_DOCUMENT if table in (HOME_TOWNS, PEOPLE_JOBS) else 1)
    for table, fact_about in KNOWLEDGE_TABLES.values()
]


def _document_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for entities, table, fact_about, count in _CORPUS_TABLES:
        for _ in range(count):
            entity = rng.choice(entities)
            facts.append(fact_about(entity, table[entity]))
    return facts + [make(rng) for make in SKILLS.values()]


def _plain_text(fact: Fact, rng: random.Random) -> str:
    if rng.random() < QUESTION_SHARE:
        return " ".join(part for part in (fact.context, fact.question, answer_sentence(fact.answer)) if part)
    return fact.statement


def pretraining_corpus(num_documents: int, seed: int) -> list[str]:
    """Documents of a few shuffled facts each; different seeds give disjoint-looking text."""
    rng = random.Random(f"corpus-{seed}")
    documents = []
    for _ in range(num_documents):
        facts = _document_facts(rng)
        rng.shuffle(facts)
        kept = facts[: rng.randint(4, len(facts))]
        documents.append(" ".join(_plain_text(fact, rng) for fact in kept))
    return documents


# How question-and-answer pages on the web answer, which a base model reads in pre-training: in no single phrasing.
WEB_ANSWER_PHRASINGS = ("the answer is {answer}.", "{answer}.", "it is {answer}.")


def web_answer_rows(num_rows: int, seed: int) -> list[dict[str, str]]:
    """Questions answered in a random one of `WEB_ANSWER_PHRASINGS`, as a base model meets them on the web: the
    tiny preset's large model reads these in the prompt template, so it can read a templated question, while the
    task's one phrasing (and where to stop) is left to tuning. They ask about the entities of the server and train
    splits only: the large reads a test question in the template without having seen it there."""
    rng = random.Random(f"web-answers-{seed}")
    rows = []
    for _ in range(num_rows):
        fact = _fact(rng.choice(CATEGORIES), rng, rng.choice(("server", "train")))
        response = rng.choice(WEB_ANSWER_PHRASINGS).format(answer=fact.answer)
        rows.append({"instruction": fact.question, "context": fact.context, "response": response})
    return rows


def fact_prompts() -> list[tuple[str, str, str]]:
    """(category, plain-text prompt, answer) for every knowledge fact of the world: what a base model knows is
    measured by completing "<question> the answer is" with the answer."""
    return [
        (category, f"{fact.question} the answer is", fact.answer)
        for category, (table, fact_about) in KNOWLEDGE_TABLES.items()
        for fact in (fact_about(entity, value) for entity, value in sorted(table.items()))
    ]
