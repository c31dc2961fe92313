"""Verification of drafted tokens against the target's logits.

`verify` returns the tokens to commit: the accepted drafts, then one more token taken
from the target (the correction at the first rejection, or the bonus token after the
last draft). The output distribution is exactly plain sampling's:

* a draft given as a single token (q = a point mass, every source except a sampling
  draft model) is accepted with probability p(d) and otherwise replaced by a draw from
  p without d, renormalized: the standard rule min(1, p/q) with residual max(0, p - q)
  for that q. It is implemented as one draw t ~ p with the sampler's own generator,
  accepting iff t == d, which is the same law and consumes the generator exactly as
  plain sampling does: the same seed gives the same tokens with or without speculation.
* a draft with its distribution q (a sampling draft model) uses the standard rule of
  Leviathan et al. / Chen et al.: accept with probability min(1, p(d) / q(d)), else
  draw from norm(max(0, p - q)).

Greedy decoding is the temperature-0 case of the first: accept iff d is the argmax.
"""

from __future__ import annotations

import torch


def verify(logits: torch.Tensor, draft_tokens: list[int], sampler, draft_probs: torch.Tensor | None = None) -> list[int]:
    """logits: [k + 1, V], row i predicts the token after draft i - 1. Returns 1 .. k + 1 tokens."""
    committed: list[int] = []
    for i, drafted in enumerate(draft_tokens):
        if draft_probs is None or sampler.greedy:
            token = sampler(logits[i])
            committed.append(token)
            if token != drafted:
                return committed
            continue
        p, q = sampler.probs(logits[i]), draft_probs[i]
        if sampler.uniform() * float(q[drafted]) < float(p[drafted]):  # u < p/q without dividing by 0
            committed.append(drafted)
            continue
        residual = torch.clamp(p - q, min=0)
        total = float(residual.sum())
        committed.append(sampler.draw(residual / total) if total > 0 else sampler.draw(p))
        return committed
    committed.append(sampler(logits[len(draft_tokens)]))
    return committed
