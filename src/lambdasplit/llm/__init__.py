"""The Λ-split of causal LMs: head [0, X) + body [X, Y) + tail [Y, N).

    families.py    how each transformers family is assembled around its layer stack
    checkpoint.py  selective safetensors loading and the model fingerprint
    segments.py    Head, Body and Tail: layer ranges with their own KV caches
    tree.py        tree steps: tree positions and attention masks, cache compaction to the kept path
    check.py       `lambdasplit check`: does a split reproduce the unsplit model? (commands.py: the CLI)
"""

import importlib

# Imported on first use, so that `lambdasplit --help` and usage errors need neither torch nor transformers.
_EXPORTS = {
    "Checkpoint": "lambdasplit.llm.checkpoint",
    "SUPPORTED_FAMILIES": "lambdasplit.llm.families",
    "family_for": "lambdasplit.llm.families",
    "Head": "lambdasplit.llm.segments",
    "Body": "lambdasplit.llm.segments",
    "Tail": "lambdasplit.llm.segments",
    "load_head": "lambdasplit.llm.segments",
    "load_body": "lambdasplit.llm.segments",
    "load_tail": "lambdasplit.llm.segments",
    "parse_split": "lambdasplit.llm.segments",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
