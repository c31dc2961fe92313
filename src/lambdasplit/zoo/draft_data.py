"""Training data for the EAGLE draft head: generated offline, disjoint from the evaluation prompts.

The head learns to predict the target's next features on the kind of text the target
writes, so the data is the target's own greedy answers (self-distillation, as Medusa-2 and
EAGLE-2 recommend) to prompts built here from templates and topic lists: questions,
explanations, lists, summaries of passages of the shipped King James slice, and small
programming tasks. Nothing is downloaded. `assert_disjoint` checks that no training
prompt is one of `bench wan`'s evaluation prompts (nor contains its summarization text).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

TOPICS = [
    "photosynthesis", "volcanoes", "the water cycle", "black holes", "the immune system", "electric cars",
    "the printing press", "honey bees", "glaciers", "the Roman Empire", "vaccines", "solar panels", "coral reefs",
    "the internet", "earthquakes", "the human heart", "rainbows", "tides", "recycling", "the moon landing",
    "dinosaurs", "batteries", "clouds", "democracy", "the stock market", "chess", "coffee", "the Great Wall of China",
    "magnets", "bread baking", "jazz music", "the Olympic Games", "penguins", "deserts", "wind turbines", "maps",
    "bicycles", "the telephone", "forests", "spiders", "tea", "gravity", "sleep", "rivers", "bridges", "trains",
    "the Moon", "hurricanes", "the Sahara", "octopuses", "the Renaissance", "nuclear power", "microscopes", "bees",
    "the French Revolution", "rain forests", "the periodic table", "fungi", "lightning", "airplanes", "compost",
    "the solar system", "whales", "the ancient Egyptians", "cheese making", "the piano", "robots", "soil",
    "satellites", "the Amazon river", "meditation", "elephants", "gardening", "the brain", "origami", "the Vikings",
    "photography", "wolves", "steam engines", "the ocean floor", "kites", "libraries", "money", "volcanic islands",
    "the alphabet", "fireworks", "owls", "public transport", "mountains", "the human skeleton", "clocks", "pizza",
]
TEMPLATES = [
    "Explain {t} in simple terms.", "Give three facts about {t}.", "Why is {t} important?",
    "Write a short paragraph about {t}.", "What are the main ideas behind {t}?", "Describe {t} to a child.",
    "List the pros and cons of {t}.", "Tell me a short story that involves {t}.",
    "What is a common misconception about {t}?", "How would you teach a class about {t}?",
    "Write a haiku about {t}.", "What questions do scientists still ask about {t}?",
]
PAIRS = [("a cat", "a dog"), ("tea", "coffee"), ("a lake", "a sea"), ("weather", "climate"), ("a virus", "bacteria"),
         ("a planet", "a star"), ("speed", "velocity"), ("a city", "a village"), ("RAM", "a hard disk"),
         ("a poem", "a song"), ("a list", "a tuple in Python"), ("HTTP", "HTTPS")]
CODE_TASKS = [
    "reverses a list", "counts the vowels in a string", "returns the largest of three numbers",
    "computes the n-th Fibonacci number", "checks whether a number is prime", "sorts a list of words by length",
    "removes duplicates from a list", "converts Celsius to Fahrenheit", "sums the digits of an integer",
    "finds the most common element of a list", "merges two sorted lists", "counts words in a sentence",
    "returns the second smallest number in a list", "capitalizes every word of a string",
    "computes the greatest common divisor of two numbers", "flattens a nested list",
    "checks whether two strings are anagrams", "returns the mean and median of a list",
    "counts how often each letter occurs in a text", "checks whether a year is a leap year",
    "returns the squares of the even numbers in a list", "reads a file and prints its longest line",
    "converts a binary string to an integer", "splits a list into chunks of size n",
]
CODE_TEMPLATES = ["Write a Python function that {t}.", "Write a short Python program that {t}, with a comment.",
                  "Show me JavaScript code that {t}."]


def _passages() -> list[str]:
    text = (Path(__file__).parent / "data" / "kjv_slice.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [" ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts, in a seeded order (the same count and seed give the same list)."""
    prompts = [t.format(t=topic) for t, topic in itertools.product(TEMPLATES, TOPICS)]
    prompts += [f"What is the difference between {a} and {b}?" for a, b in PAIRS]
    prompts += [t.format(t=task) for t, task in itertools.product(CODE_TEMPLATES, CODE_TASKS)]
    prompts += [f"Summarize the following passage in two sentences.\n\n{p}" for p in _passages()]
    random.Random(seed).shuffle(prompts)
    assert_disjoint(prompts)
    return prompts[:count]


def assert_disjoint(prompts: list[str]) -> None:
    from lambdasplit.bench.wan import PROMPTS, SUMMARY_TEXT

    evaluation = {p for _, p in PROMPTS}
    for prompt in prompts:
        if prompt in evaluation or SUMMARY_TEXT[:80] in prompt:
            raise AssertionError(f"training prompt {prompt[:60]!r} is an evaluation prompt")
