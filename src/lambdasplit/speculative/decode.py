"""The speculative generation loop: draft, verify in one step, commit, cut back.

Each round is one ordinary step of the step API (client.generation.StepModel): the
committed tokens the caches have not seen (the whole prompt in the first round, then
the one pending token) followed by k drafted tokens. Row i of the returned logits
predicts the token after input i, so the last k + 1 rows verify the drafts
(acceptance.verify). The next round starts at the committed length, which cuts the
rejected positions from the head's and the tail's caches here and from the body's on
the server. EOS and max_new_tokens are applied token by token inside an accepted block,
exactly where plain decoding would stop.
"""

from __future__ import annotations

import time

from lambdasplit.client.generation import GenerationResult, StepModel, mask_eos
from lambdasplit.speculative.acceptance import verify
from lambdasplit.speculative.adaptive import DraftLength
from lambdasplit.speculative.sources import Draft, Step


def speculative_generate(model: StepModel, source, prompt_ids: list[int], *, max_new_tokens: int, sampler,
                         eos_ids: set[int], ignore_eos: bool = False, draft_tokens: int | str = "auto",
                         on_token=None, keep_logits: bool = False) -> GenerationResult:
    result = GenerationResult(token_ids=[], prompt_ids=list(prompt_ids), speculate=source.name)
    length = DraftLength(draft_tokens)
    length.trace = result.rounds = []  # per round: the k chosen, why, the fitted costs, what it measured
    sequence = list(prompt_ids)
    processed = 0  # positions every cache holds that are committed
    done = max_new_tokens == 0
    while not done:
        room = max_new_tokens - len(result.token_ids)
        t0 = time.perf_counter()
        k = length.choose(room - 1)  # k drafts commit at most k + 1 tokens
        draft = source.propose(sequence, k) if k > 0 else Draft()
        draft.tokens = draft.tokens[:k]
        draft_seconds = time.perf_counter() - t0
        model.local_seconds += draft_seconds
        start, inputs = processed, sequence[processed:] + draft.tokens
        t1 = time.perf_counter()
        logits = mask_eos(model.step(start, inputs, last=len(draft.tokens) + 1), eos_ids, ignore_eos)
        t2 = time.perf_counter()
        verified = verify(logits, draft.tokens, sampler, draft.probs)
        model.local_seconds += time.perf_counter() - t2
        accepted = len(verified) - 1  # every verified token but the last is an accepted draft
        committed = []
        for i, token in enumerate(verified):
            if keep_logits:
                result.logits.append(logits[i])
            committed.append(token)
            result.token_ids.append(token)
            sequence.append(token)
            if on_token is not None:
                on_token(token)
            if (token in eos_ids and not ignore_eos) or len(result.token_ids) >= max_new_tokens:
                done = True
                break
        if model.steps == 1:
            result.first_step_tokens = len(result.token_ids)
        result.drafted += len(draft.tokens)
        result.accepted += accepted
        processed = len(sequence) - 1  # the last committed token is not in the caches yet
        source.observe(sequence, Step(start=start, inputs=inputs, draft=draft, logits=logits,
                                      features=model.features, committed=committed))
        # the whole round's wall time: what a drafted position really costs includes verifying and observing
        length.update(len(inputs), t2 - t1, len(draft.tokens), accepted, draft_seconds,
                      round_seconds=time.perf_counter() - t0)
    return result
