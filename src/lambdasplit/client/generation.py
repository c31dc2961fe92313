"""The one generation loop and the one sampler, shared by every mode.

local, split and cloud differ only in where the body runs (nowhere / a server / the
server runs this same loop over the whole model), so the same seed gives the same
tokens in every mode.

EOS rule: generation stops after emitting an EOS token (which is kept, as transformers'
`generate` does). With `ignore_eos=True` the EOS logits are set to -inf before sampling,
which is what `generate(min_new_tokens=N)` does; benchmarks use it to get exactly N tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from lambdasplit.errors import UsageError


@dataclass
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


class Sampler:
    """Temperature, then top-k, then top-p (the order transformers applies them), with a seeded generator."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float()
        s = self.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class BodyLink(Protocol):
    """Where the body runs: in this process, or behind a network session."""

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor: ...


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_ids: list[int]
    seconds: float = 0.0  # wall time of the generation (model loading excluded)
    local_seconds: float = 0.0  # head + tail + sampling on the device
    body_seconds: float = 0.0  # wall time spent waiting for the body (compute + communication)
    logits: list[torch.Tensor] = field(default_factory=list)
    text: str = ""


def generate_ids(head, body: BodyLink | None, tail, prompt_ids: list[int], *, max_new_tokens: int,
                 sampler: Sampler, eos_ids: set[int], ignore_eos: bool = False, cache: str = "kv",
                 on_token: Callable[[int], None] | None = None, keep_logits: bool = False) -> GenerationResult:
    """Run head -> body -> tail -> sample, one step per generated token.

    With cache="kv" the prompt is one step and every later step carries one new position.
    With cache="none" every step restarts at position 0 and carries the whole sequence
    (the paper's baseline without caching).
    """
    if cache not in ("kv", "none"):
        raise UsageError("cache must be 'kv' or 'none'")
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    result = GenerationResult(token_ids=[], prompt_ids=list(prompt_ids))
    sequence = list(prompt_ids)
    start, new = 0, list(prompt_ids)
    began = time.perf_counter()
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        hidden = head.forward(torch.tensor([new]), start)
        t1 = time.perf_counter()
        if body is not None:
            hidden = body.forward(hidden, start)
        t2 = time.perf_counter()
        logits = tail.forward(hidden, start)[0, -1]
        if ignore_eos:
            logits = logits.clone()
            logits[list(eos_ids)] = float("-inf")
        token = sampler(logits)
        t3 = time.perf_counter()
        result.local_seconds += (t1 - t0) + (t3 - t2)
        result.body_seconds += t2 - t1
        if keep_logits:
            result.logits.append(logits)
        result.token_ids.append(token)
        sequence.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids and not ignore_eos:
            break
        if cache == "kv":
            start, new = len(sequence) - 1, [token]
        else:
            start, new = 0, list(sequence)
    result.seconds = time.perf_counter() - began
    return result
