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


# ---- the "diverse" prompt set: many more distinct prompts, for shorter answers ----
# The templated set above is small enough for the head to memorize (scripts/draft_head_gap.py:
# 84% one-step acceptance on prompts it was trained on, 26% on the evaluation's). This set spreads
# the same generation budget over several times as many prompts: English words of the tokenizer's
# own vocabulary as topics, countries, Python's standard library (its names and docstrings, which
# ship with every Python), composed programming tasks, and passages to summarize.

WORD_TEMPLATES = [
    "What does the word '{t}' mean? Give an example sentence.", "Tell me something interesting about {t}.",
    "Write two sentences that use the word '{t}'.", "How would you explain '{t}' to a friend?",
    "Give me a short definition of {t}.", "Why do people talk about {t}?",
]
COUNTRIES = [
    "Germany", "Italy", "Spain", "Portugal", "Japan", "Canada", "Brazil", "Argentina", "Kenya", "Egypt", "India",
    "China", "Australia", "Mexico", "Peru", "Chile", "Norway", "Sweden", "Finland", "Poland", "Greece", "Turkey",
    "Thailand", "Vietnam", "Nigeria", "Ghana", "Morocco", "Ireland", "Austria", "Hungary", "Denmark", "Iceland",
    "New Zealand", "Colombia", "Indonesia", "the Philippines", "South Korea", "Belgium", "the Netherlands", "Cuba",
]
COUNTRY_TEMPLATES = ["What is the capital of {t}?", "Name three famous foods from {t}.",
                     "What language do people speak in {t}?", "Give two facts about the history of {t}."]
CODE_VERBS = ["counts", "sorts", "filters", "reverses", "groups", "validates", "finds the longest of",
              "removes the empty entries of", "sums", "prints", "shuffles", "deduplicates"]
CODE_OBJECTS = ["a list of numbers", "the words in a sentence", "a dictionary of scores", "a list of dates",
                "the lines of a text file", "a list of names", "the characters of a string", "a list of tuples",
                "the keys of a dictionary", "a matrix given as a list of lists"]
CODE_LANGUAGES = ["Python", "Python", "JavaScript", "C"]
STDLIB_MODULES = ["os", "os.path", "json", "re", "collections", "itertools", "functools", "math", "random",
                  "datetime", "pathlib", "statistics", "string", "textwrap", "shutil", "csv", "heapq", "bisect",
                  "time", "calendar", "fractions", "decimal", "operator", "glob", "difflib", "base64", "hashlib"]


def _vocabulary_words(count: int, seed: int) -> list[str]:
    """English words from the default model's tokenizer vocabulary (whole-word tokens, 5-12 letters)."""
    from transformers import AutoTokenizer

    from lambdasplit.zoo import resolve

    vocab = AutoTokenizer.from_pretrained(resolve("zoo:smollm2")).get_vocab()
    words = sorted({t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()
                    and 5 <= len(t) - 1 <= 12})
    random.Random(seed).shuffle(words)
    return words[:count]


def _stdlib_names(seed: int) -> tuple[list[str], list[str]]:
    """(public function names as module.name, docstring paragraphs of 200-600 characters) of STDLIB_MODULES."""
    import importlib
    import inspect

    names, paragraphs = [], []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            value = getattr(module, name)
            if name.startswith("_") or not callable(value):
                continue
            names.append(f"{module_name}.{name}")
            doc = inspect.getdoc(value) or ""
            for paragraph in doc.split("\n\n"):
                paragraph = " ".join(paragraph.split())
                if 200 <= len(paragraph) <= 600 and ">>>" not in paragraph:
                    paragraphs.append(paragraph)
    paragraphs = sorted(set(paragraphs))
    random.Random(seed).shuffle(names)
    random.Random(seed).shuffle(paragraphs)
    return names, paragraphs


def diverse_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of the diverse set, in a seeded order (the same count and seed give the same list)."""
    rng = random.Random(seed)
    prompts = [rng.choice(WORD_TEMPLATES).format(t=w) for w in _vocabulary_words(1500, seed)]
    prompts += [t.format(t=c) for t, c in itertools.product(COUNTRY_TEMPLATES, COUNTRIES)]
    prompts += [f"Write a {lang} function that {verb} {obj}." for verb, obj in itertools.product(CODE_VERBS, CODE_OBJECTS)
                for lang in [rng.choice(CODE_LANGUAGES)]]
    names, paragraphs = _stdlib_names(seed)
    prompts += [f"How do I use {name} in Python? Show a short example." for name in names[:400]]
    summaries = ["Give a one-sentence summary of this passage: {p}", "Summarize in your own words:\n\n{p}",
                 "What is the main point of the following text?\n\n{p}"]
    prompts += [rng.choice(summaries).format(p=p) for p in paragraphs[:300] + _passages()[:150]]
    prompts += [t.format(t=topic) for t, topic in itertools.product(TEMPLATES[:4], TOPICS)]
    prompts = sorted(set(prompts))
    random.Random(seed).shuffle(prompts)
    assert_disjoint(prompts)
    return prompts[:count]


def prompt_set(name: str, count: int, seed: int = 0) -> list[str]:
    """The named training prompt set: `templates` (training_prompts) or `diverse` (diverse_prompts)."""
    sets = {"templates": training_prompts, "diverse": diverse_prompts}
    if name not in sets:
        raise ValueError(f"unknown prompt set {name!r}: templates or diverse")
    return sets[name](count, seed)
