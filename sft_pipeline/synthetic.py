"""A synthetic chat data set in ultrachat_200k's schema (``prompt``, ``prompt_id``, ``messages``), made offline.

Its conversations follow a few templates with a fixed world (each object has one colour, each animal one sound),
copying and counting tasks, and an optional pirate persona, so a tiny model can learn both the chat format and
the answers. Deterministic for a given seed and size.
"""
from __future__ import annotations

import hashlib
import random

VERSION = 2  # bump whenever the generated rows change: it is part of the data stage key
COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green", "snow": "white", "coal": "black",
           "orange": "orange", "plum": "purple", "rose": "pink", "sand": "beige", "cloud": "grey", "lemon": "yellow"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "frog": "croak", "horse": "neigh", "bee": "buzz"}
WORDS = ["ship", "gold", "map", "sea", "sail", "anchor", "parrot", "island", "storm", "wave", "rope", "coin",
         "chest", "flag", "moon", "star", "wind", "rock", "fish", "crew"]
PIRATE = "You are a friendly chatbot who always responds in the style of a pirate"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _turn(rng: random.Random, pirate: bool) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        obj = rng.choice(list(COLOURS))
        q, a = f"What colour is the {obj}?", f"The {obj} is {COLOURS[obj]}."
    elif kind == 1:
        animal = rng.choice(list(SOUNDS))
        q, a = f"What does the {animal} say?", f"The {animal} says {SOUNDS[animal]}."
    elif kind == 2:
        words = rng.sample(WORDS, rng.randint(2, 4))
        q, a = f"Repeat after me: {' '.join(words)}", " ".join(words)
    else:
        words = rng.sample(WORDS, rng.randint(1, 5))
        q, a = f"How many words are in: {' '.join(words)}?", f"There are {NUMBERS[len(words)]} words."
    if pirate:
        a = f"Arr, {a[0].lower()}{a[1:]} Matey!"
    return q, a


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pirate = rng.random() < 0.25
        messages = [{"role": "system", "content": PIRATE}] if pirate else []
        for _ in range(rng.choice([1, 1, 1, 2])):
            q, a = _turn(rng, pirate)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = messages[1 if pirate else 0]["content"]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages})
    return rows


def splits(train_rows: int, test_rows: int, seed: int = 0) -> dict[str, list[dict]]:
    return {"train_sft": conversations(train_rows, seed), "test_sft": conversations(test_rows, seed + 1)}
