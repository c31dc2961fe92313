"""The Λ-split of causal LMs: head [0, X) + body [X, Y) + tail [Y, N).

    families.py    how each transformers family is assembled around its layer stack
    checkpoint.py  selective safetensors loading and the model fingerprint
    segments.py    Head, Body and Tail: layer ranges with their own KV caches
    check.py       `lambdasplit check`: does a split reproduce the unsplit model? (commands.py: the CLI)
"""

from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.families import SUPPORTED_FAMILIES, family_for
from lambdasplit.llm.segments import Body, Head, Tail, load_body, load_head, load_tail, parse_split

__all__ = [
    "Checkpoint", "SUPPORTED_FAMILIES", "family_for",
    "Head", "Body", "Tail", "load_head", "load_body", "load_tail", "parse_split",
]
