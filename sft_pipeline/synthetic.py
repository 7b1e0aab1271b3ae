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


def long_conversations(n: int, seed: int) -> list[dict]:
    """Conversations with ultrachat-like lengths (lognormal, mean ~1,300 tokens, long tail), for speed work."""
    rng = random.Random(seed)
    vocab = [a + b for a in WORDS for b in ("", "s", "ing", "ed", "er", "ly")] + list(COLOURS) + list(SOUNDS)
    rows = []
    for _ in range(n):
        target_words = max(40, min(3000, int(rng.lognormvariate(6.44, 0.55))))  # ~1.8 tokens per word
        messages, left = [], target_words
        while left > 0:
            q = " ".join(rng.choices(vocab, k=min(left, rng.randint(10, 60)))) + "?"
            a = " ".join(rng.choices(vocab, k=max(1, min(left, rng.randint(80, 400))))) + "."
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            left -= len(q.split()) + len(a.split())
        rows.append({"prompt": messages[0]["content"],
                     "prompt_id": hashlib.sha256(messages[0]["content"].encode()).hexdigest(), "messages": messages})
    return rows


def splits(train_rows: int, test_rows: int, seed: int = 0, style: str = "chat") -> dict[str, list[dict]]:
    make = long_conversations if style == "long" else conversations
    return {"train_sft": make(train_rows, seed), "test_sft": make(test_rows, seed + 1)}
