"""The speculative generation loop: draft, verify in one step, commit, cut back.

Each round is one ordinary step of the step API (client.generation.StepModel): the
committed tokens the caches have not seen (the whole prompt in the first round, then
the one pending token) followed by k drafted tokens. Row i of the returned logits
predicts the token after input i, so the last k + 1 rows verify the drafts
(acceptance.verify). The next round starts at the committed length, which cuts the
rejected positions from the head's and the tail's caches here and from the body's on
the server. EOS and max_new_tokens are applied token by token inside an accepted block,
exactly where plain decoding would stop.

With a tree source (eagle-tree) and greedy decoding, a round sends the pending token and
a whole draft tree as one tree step (llm/tree.py: every node attends to the prefix and
its ancestors), `verify_tree` walks the target's own tokens down the tree, and the next
step's `keep` names the accepted path, which every cache compacts to before it runs.
"""

from __future__ import annotations

import time

import torch

from lambdasplit.client.generation import GenerationResult, StepModel, mask_eos
from lambdasplit.speculative.acceptance import verify
from lambdasplit.speculative.adaptive import DraftLength
from lambdasplit.speculative.sources import Draft, Step


def speculative_generate(model: StepModel, source, prompt_ids: list[int], *, max_new_tokens: int, sampler,
                         eos_ids: set[int], ignore_eos: bool = False, draft_tokens: int | str = "auto",
                         on_token=None, keep_logits: bool = False) -> GenerationResult:
    result = GenerationResult(token_ids=[], prompt_ids=list(prompt_ids), speculate=source.name)
    # Whole-tree verification (a source with `propose_tree`, eagle-tree): greedy only, since the
    # speculative-sampling rule here is the chain's; with sampling such a source drafts its best path.
    trees = bool(getattr(source, "verify_trees", False) and sampler.greedy and model.tree_steps)
    length = DraftLength(draft_tokens, tree=trees)
    length.trace = result.rounds = []  # per round: the k chosen, why, the fitted costs, what it measured
    sequence = list(prompt_ids)
    processed = 0  # positions every cache holds that are committed
    keep = None  # after a tree step: its offsets to keep (the accepted path), sent with the next step
    done = max_new_tokens == 0
    while not done:
        room = max_new_tokens - len(result.token_ids)
        t0 = time.perf_counter()
        k = length.choose(room - 1)  # k drafts commit at most k + 1 tokens
        tree = source.propose_tree(sequence, k) if trees and k > 0 else None
        if tree is not None and tree.tokens:
            draft = Draft(list(tree.tokens))
        else:
            tree = None
            draft = source.propose(sequence, k) if k > 0 and not trees else Draft()
            draft.tokens = draft.tokens[:k]
        draft_seconds = time.perf_counter() - t0
        catch_up = getattr(source, "catch_up_seconds", 0.0) if k > 0 else 0.0
        model.local_seconds += draft_seconds
        start, pending = processed, sequence[processed:]
        inputs = pending + draft.tokens
        parents = None
        if tree is not None:  # the pending tokens are a chain; the tree's roots hang off its last one
            c = len(pending)
            parents = list(range(-1, c - 1)) + [p + c if p >= 0 else c - 1 for p in tree.parents]
        t1 = time.perf_counter()
        logits = mask_eos(model.step(start, inputs, last=len(draft.tokens) + 1, parents=parents, keep=keep),
                          eos_ids, ignore_eos)
        t2 = time.perf_counter()
        if tree is not None:
            verified, rows = verify_tree(logits, tree, sampler)
        else:
            verified = verify(logits, draft.tokens, sampler, draft.probs)
            rows = list(range(len(verified)))
        model.local_seconds += time.perf_counter() - t2
        accepted = len(verified) - 1  # every verified token but the last is an accepted draft
        committed = []
        for token, row in zip(verified, rows):
            if keep_logits:
                result.logits.append(logits[row])
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
        step = Step(start=start, inputs=inputs, draft=draft, logits=logits, features=model.features,
                    committed=committed)
        keep = None
        if tree is not None:
            # the caches keep the pending tokens and the accepted path: the next step says so (`keep`)
            path = rows[1:len(committed)] if len(committed) > 1 else []  # rows 1.. are tree nodes 0..
            keep = list(range(len(pending))) + [len(pending) + row - 1 for row in path]
            kept_rows = torch.tensor(keep)
            step = Step(start=start, inputs=[inputs[i] for i in keep], draft=Draft([tree.tokens[r - 1] for r in path]),
                        logits=logits[[0] + path], features=model.features[kept_rows], committed=committed)
        source.observe(sequence, step)
        # the whole round's wall time: what a drafted position really costs includes verifying and observing
        length.update(len(inputs), t2 - t1, len(draft.tokens), accepted, draft_seconds,
                      round_seconds=time.perf_counter() - t0, chosen=k, catch_up=catch_up)
    return result


def verify_tree(logits: torch.Tensor, tree, sampler) -> tuple[list[int], list[int]]:
    """Greedy verification of a whole tree: logits row 0 predicts after the pending token, row 1 + j after
    tree node j. Walks from the root along the target's own tokens while a node drafted them. Returns the
    tokens to commit (the accepted path, then the target's next token) and the row each was read from."""
    children = tree.children()
    tokens, rows, node, row = [], [], -1, 0
    while True:
        token = sampler(logits[row])
        tokens.append(token)
        rows.append(row)
        child = children.get(node, {}).get(token)
        if child is None:
            return tokens, rows
        node, row = child, child + 1
