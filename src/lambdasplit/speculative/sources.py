"""Draft sources: what proposes the tokens a verify step checks.

One small interface. `propose(sequence, k)` returns up to k tokens that might follow the
committed `sequence` (fewer, or none, when the source has nothing worth a position);
`observe(step)` is told after every step what was sent, the target's logits and
last-layer features for it, and how much was accepted, so stateful sources (a draft
model's cache, the lookahead n-gram pool, the EAGLE head's cache) can follow.

    lookup     prompt lookup: the tokens that followed the latest earlier occurrence of
               the sequence's last n-gram (n = 3, 2, 1), in the prompt or the output
    lookahead  Jacobi iteration with an n-gram pool (lookahead.py)
    draft      a small causal LM sharing the tokenizer (draft_model.py, --draft-model)
    eagle      the feature-level draft head (eagle.py, --draft-model or the bundled one): a greedy chain
    eagle-tree the same head drafting EAGLE-2's tree on the device, verified whole (greedy)
    eagle+lookup  eagle-tree's tree with prompt lookup's continuation grafted on as one more path
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lambdasplit.errors import UsageError

if TYPE_CHECKING:  # torch only in annotations: the CLI reads SOURCES without importing it
    import torch

SOURCES = ("none", "lookup", "lookahead", "draft", "eagle", "eagle-tree", "eagle+lookup")
DRAFT_MODEL_SOURCES = ("draft", "eagle", "eagle-tree", "eagle+lookup")  # the ones --draft-model is for
TREE = (4, 4)  # eagle-tree: width (nodes expanded per level) x branch (children per node)


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [len(tokens), V]: the distribution each token was drawn from, if sampled


@dataclass
class Step:
    """What one verify step did, for `DraftSource.observe`."""

    start: int  # position of inputs[0]
    inputs: list[int]  # tokens sent: the not-yet-processed committed ones, then the drafts
    draft: Draft
    logits: torch.Tensor  # [len(draft.tokens) + 1, V]: row i predicts what follows inputs[-(k + 1) + i]
    features: torch.Tensor  # [len(inputs), D]: every input's last-layer features (before the final norm)
    committed: list[int]  # tokens committed by this step (accepted drafts, then the target's own)


class DraftSource(Protocol):
    name: str

    def propose(self, sequence: list[int], k: int) -> Draft: ...

    def observe(self, sequence: list[int], step: Step) -> None: ...


class LookupSource:
    """Prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`)."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, sequence: list[int], k: int) -> Draft:
        return Draft(lookup_continuation(sequence, k, self.max_ngram))

    def observe(self, sequence: list[int], step: Step) -> None:
        pass


def lookup_continuation(sequence: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """The k tokens after the latest earlier occurrence of the last n tokens (longest n first)."""
    if k <= 0:
        return []
    end = len(sequence)
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = sequence[end - n:]
        for start in range(end - n - 1, -1, -1):  # latest match first: recent text predicts best
            if sequence[start:start + n] == tail:
                return sequence[start + n:start + n + k]
    return []


def make_source(name: str, device=None, *, draft_model: str | None = None, sampling=None) -> DraftSource | None:
    """The draft source called `name` (None for "none") for a DeviceModel `device`."""
    if name in (None, "", "none"):
        if draft_model:
            raise UsageError("--draft-model needs --speculate draft or eagle")
        return None
    if name not in SOURCES:
        raise UsageError(f"unknown --speculate source {name!r}; expected one of {', '.join(SOURCES)}")
    if name in ("lookup", "lookahead") and draft_model:
        raise UsageError(f"--speculate {name} takes no --draft-model")
    if name == "lookup":
        return LookupSource()
    if name == "lookahead":
        from lambdasplit.speculative.lookahead import LookaheadSource

        return LookaheadSource()
    if name == "draft":
        from lambdasplit.speculative.draft_model import DraftModelSource

        if not draft_model:
            raise UsageError("--speculate draft needs --draft-model (a causal LM sharing the model's tokenizer)")
        return DraftModelSource.load(draft_model, device, sampling=sampling)
    from lambdasplit.speculative.eagle import EagleSource

    width, branch = TREE if name in ("eagle-tree", "eagle+lookup") else (1, 1)
    return EagleSource.load(draft_model, device, width=width, branch=branch, lookup=name == "eagle+lookup")
