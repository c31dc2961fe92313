"""Attacks on a captured session, from the weakest attacker to the strongest.

    eavesdropper (no model)   `visible_text`, `visible_token_runs`: is the text, or are the
                              token ids, sitting in the captured bytes?
    public weights            `HeadInversion`: exact inversion of the uplink, position by
                              position, by pushing candidate tokens through the public head
                              layers (decoder LMs are injective: only the true token
                              reproduces the observed state); `logit_lens` and `public_tail`
                              on the downlink (the public final norm + LM head, or the
                              public tail layers too, applied to what the cloud sends back);
                              the linear probe (`fit_probe` + `nearest_embeddings`): learned
                              on public text, but it ranks the public embedding table
    auxiliary data            learned inverters (MLP, GRU) in audit/inverters.py: trained on
                              hidden states of public text, no weights needed at attack time
"""

from __future__ import annotations

import copy
import time

import torch
from transformers.cache_utils import DummyLayer

from lambdasplit.llm.segments import Head, Tail

# ---------------------------------------------------------------- eavesdropper without the model


def visible_text(stream: bytes, text: str, min_chars: int = 4) -> dict:
    """Which characters of `text` appear in `stream` inside a UTF-8 substring of >= min_chars.

    Returns coverage (fraction of characters covered), the longest visible substring, and
    whether the whole text is there verbatim.
    """
    covered = [False] * len(text)
    longest = ""
    for i in range(len(text) - min_chars + 1):
        length = min_chars
        if text[i:i + length].encode() not in stream:
            continue
        while i + length < len(text) and text[i:i + length + 1].encode() in stream:
            length += 1
        for j in range(i, i + length):
            covered[j] = True
        if length > len(longest):
            longest = text[i:i + length]
    return {
        "coverage": sum(covered) / len(text) if text else 0.0,
        "longest": longest,
        "verbatim": bool(text) and text.encode() in stream,
    }


def visible_token_runs(stream: bytes, runs: list[bytes]) -> float:
    """Fraction of the given byte patterns (token-id runs, see capture.int_runs) present in the stream."""
    return sum(run in stream for run in runs) / len(runs) if runs else 0.0


# ---------------------------------------------------------------- public weights: head inversion


def nearest_embeddings(embed_weight: torch.Tensor, hidden: torch.Tensor, k: int, probe: torch.Tensor | None = None) -> torch.Tensor:
    """[T, k] token ids whose input embedding is closest in cosine to each hidden state.

    With `probe` (a [D + 1, D] linear map fitted on public text, see `fit_probe`), the state
    is first mapped back towards its input embedding: after even one layer a few outlier
    dimensions dominate the raw cosine, so the raw state ranks the true token poorly.
    """
    table = torch.nn.functional.normalize(embed_weight.float(), dim=-1)
    query = hidden.float()
    if probe is not None:
        query = apply_affine(query, probe)
    query = torch.nn.functional.normalize(query, dim=-1)
    return (query @ table.T).topk(k, dim=-1).indices


def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Ridge least squares [D_x + 1, D_y] map (last row: bias) from x to y."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y.double()).float()


def apply_affine(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.float(), torch.ones(*x.shape[:-1], 1)], dim=-1) @ a


def fit_probe(features: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Linear map from hidden states back to the tokens' input embeddings, fitted on public text."""
    return fit_affine(features, embed_weight.float()[tokens], ridge)


class HeadInversion:
    """Recover the token at each uplink position by matching it through the public head.

    At position p, with the tokens before p already recovered (their KV cache computed
    once), each candidate token is pushed through the public layers [0, X) at position p
    in one batch; the candidate whose state is nearest to the observed one wins. Cheap
    rankers propose candidates first; where the best is not a clear, near-exact match, the
    whole vocabulary is swept in chunks (while the time budget lasts).
    """

    def __init__(self, head: Head, vocab_size: int, *, public=None, chunk: int = 512,
                 sweep_budget_s: float = 60.0, tolerance: float = 0.1):
        self.head, self.vocab_size = head, vocab_size
        self.public = public or (lambda h: h)  # the defense's deterministic part, applied to candidates
        self.chunk, self.sweep_budget_s, self.tolerance = chunk, sweep_budget_s, tolerance
        self.sweeps = 0
        self.sweep_seconds = 0.0

    def _candidates_at(self, prefix: Head, candidates: torch.Tensor, position: int) -> torch.Tensor:
        """Head outputs [K, D] for each candidate token at `position` after the recovered prefix."""
        k = len(candidates)
        stack = prefix.stack.fork()
        if position > 0:
            cache = copy.copy(prefix.stack.cache)
            cache.layers = [copy.copy(layer) for layer in cache.layers]
            for layer in cache.layers:
                if not isinstance(layer, DummyLayer) and getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys.expand(k, *layer.keys.shape[1:])
                    layer.values = layer.values.expand(k, *layer.values.shape[1:])
            stack.cache, stack.length = cache, position
        batch_head = Head(prefix.embed, prefix.position_embed, stack)
        return batch_head.forward(candidates[:, None], position)[:, 0].float()

    def _distances(self, prefix: Head, candidates: torch.Tensor, position: int, target: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(candidates), self.chunk):
            states = self.public(self._candidates_at(prefix, candidates[i:i + self.chunk], position))
            out.append((states - target).norm(dim=-1))
        return torch.cat(out)

    @torch.inference_mode()
    def invert(self, observed: torch.Tensor, proposals: torch.Tensor) -> dict:
        """observed [T, D] uplink states; proposals [T, K] candidate ids per position.

        Returns top1 [T], top5 [T, 5] and `verified` [T] (a clear near-exact match).
        """
        prefix = self.head.fork()
        all_ids = torch.arange(self.vocab_size)
        top1, top5, verified = [], [], []
        for p in range(observed.shape[0]):
            target = observed[p].float()
            candidates = torch.unique(proposals[p])
            dists = self._distances(prefix, candidates, p, target)
            ok = self._clear(dists, target)
            if not ok and self.sweep_seconds < self.sweep_budget_s:
                began = time.perf_counter()
                candidates, dists = all_ids, self._distances(prefix, all_ids, p, target)
                self.sweep_seconds += time.perf_counter() - began
                self.sweeps += 1
                ok = self._clear(dists, target)
            order = dists.argsort()[:5]
            best = candidates[order]
            top5.append(torch.nn.functional.pad(best, (0, 5 - len(best)), value=-1))
            top1.append(int(best[0]))
            verified.append(ok)
            prefix.forward(torch.tensor([[int(best[0])]]), p)  # extend the recovered prefix's cache
        return {"top1": torch.tensor(top1), "top5": torch.stack(top5), "verified": torch.tensor(verified)}

    def _clear(self, dists: torch.Tensor, target: torch.Tensor) -> bool:
        """Near-exact (within the codec's error) and well separated from the runner-up."""
        values = dists.sort().values
        near = bool(values[0] <= self.tolerance * target.norm().clamp_min(1e-6))
        separated = len(values) == 1 or bool(values[0] < 0.5 * values[1])
        return near and separated


# ---------------------------------------------------------------- public weights: the downlink


@torch.inference_mode()
def logit_lens(tail: Tail, hidden: torch.Tensor) -> torch.Tensor:
    """Public final norm + LM head applied directly to the downlink states: [T, vocab] logits."""
    return tail.family.logits(tail.config, tail.lm_head(tail.norm(hidden.float()[None])))[0]


@torch.inference_mode()
def tuned_lens(tail: Tail, hidden: torch.Tensor, translator: torch.Tensor) -> torch.Tensor:
    """The logit lens after an affine translator from layer Y to the last layer, fitted on public
    text (a linear 'tuned lens'): it needs no tail layers, so it also reads a private tail's input."""
    return logit_lens(tail, apply_affine(hidden, translator))


@torch.inference_mode()
def public_tail(tail: Tail, hidden: torch.Tensor) -> torch.Tensor:
    """The public tail layers + norm + LM head on the downlink states: [T, vocab] logits."""
    return tail.fork().forward(hidden.float()[None], 0, last_only=False)[0]
