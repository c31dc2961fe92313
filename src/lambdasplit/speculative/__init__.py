"""Speculative and lookahead decoding across the split: several tokens per body round trip.

A draft source on the device proposes k tokens; one ordinary step of k + 1 positions
(the pending token and the drafts) goes head -> body -> tail; the tail's logits verify
the drafts; the accepted ones are committed and the next step's start cuts the rejected
positions from every cache, the server's included (see client.generation.StepModel).

    sources.py     the DraftSource interface and `make_source`; lookup (prompt lookup)
    lookahead.py   lookahead decoding: Jacobi iteration with an n-gram pool (chain form)
    draft_model.py a small Hugging Face causal LM on the device sharing the tokenizer
    eagle.py       the EAGLE-style feature-level draft head (model, source, loading; chain or EAGLE-2 tree)
    acceptance.py  verification: greedy, and the speculative-sampling acceptance rule
    adaptive.py    the draft length chosen from measured acceptance and step costs
    decode.py      the speculative generation loop over the one step API
"""

from lambdasplit.speculative.sources import SOURCES, Draft, DraftSource, make_source

__all__ = ["SOURCES", "Draft", "DraftSource", "make_source"]
