"""`--speculate lookahead`: lookahead decoding (Fu et al. 2024), as the split-inference-over-WAN
paper uses it to amortize round trips, in the chain form protocol v1 can verify.

Jacobi decoding guesses several future tokens at once and feeds them back: the model's
predictions at the guessed positions are the next, better guess. Lookahead decoding
keeps the n-grams that appear along these trajectories (a guessed (n-1)-gram followed
by the model's prediction after it) in a pool keyed by their first token, and verifies
pool n-grams that start with the last committed token.

Fu et al. run a 2-D window of W Jacobi guesses over N - 1 levels and G candidate
n-grams in one forward pass with a custom attention mask. Protocol v1's steps are
causal chains, so here the Jacobi guess and the verified candidate are one chain: every
verify step is also the Jacobi step. The draft is the pool's n-gram for the last token
(the one that agrees with the current guess first, else the newest), extended through
the pool, then by the Jacobi guess; the step's predictions at every drafted position
refill the pool and become the next guess. The committed output's own n-grams are
pooled too (fixed points of the iteration); the prompt's are not (that is `lookup`).
The full 2-D window needs the tree / custom-mask STEP of docs/speculative.md.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from lambdasplit.speculative.sources import Draft, Step


class LookaheadSource:
    name = "lookahead"

    def __init__(self, ngram: int = 4, per_key: int = 8):
        self.ngram, self.per_key = ngram, per_key
        self.pool: dict[int, OrderedDict] = {}  # first token -> the (n-1)-grams after it, newest last
        self.guess: list[int] = []  # the Jacobi iterate: guessed tokens after the committed sequence

    def _add(self, gram: tuple[int, ...]) -> None:
        if len(gram) < 2:
            return
        bucket = self.pool.setdefault(gram[0], OrderedDict())
        bucket.pop(gram[1:], None)
        bucket[gram[1:]] = None
        while len(bucket) > self.per_key:
            bucket.popitem(last=False)

    def _candidate(self, token: int, guess_next: int | None) -> list[int]:
        bucket = self.pool.get(token)
        if not bucket:
            return []
        grams = list(bucket)
        for gram in reversed(grams):
            if guess_next is not None and gram[0] == guess_next:
                return list(gram)
        return list(grams[-1])

    def propose(self, sequence: list[int], k: int) -> Draft:
        draft = self._candidate(sequence[-1], self.guess[0] if self.guess else None)
        while len(draft) < k:
            more = self._candidate(draft[-1], None) if draft else []
            if not more:
                break
            draft.extend(more)
        if len(draft) < k and len(self.guess) > len(draft):
            draft.extend(self.guess[len(draft):k])
        return Draft(draft[:k])

    def observe(self, sequence: list[int], step: Step) -> None:
        predictions = torch.argmax(step.logits, dim=-1).tolist()
        before = sequence[:len(sequence) - len(step.committed)]  # committed context the step saw
        chain = before + step.draft.tokens
        n = self.ngram
        for i, predicted in enumerate(predictions):  # row i predicts what follows chain[:len(before) + i]
            end = len(before) + i
            self._add(tuple(chain[max(0, end - n + 1):end]) + (predicted,))
        for end in range(len(before) + 1, len(sequence) + 1):  # the committed output's n-grams
            if end - n >= 0:
                self._add(tuple(sequence[end - n:end]))
        accepted = len(step.committed) - 1
        self.guess = predictions[accepted + 1:]  # conditioned on a rejected draft: the next Jacobi guess
