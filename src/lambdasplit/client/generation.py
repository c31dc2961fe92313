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
        if self.greedy:
            return int(torch.argmax(logits.float()))
        return self.draw(self.probs(logits))

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `__call__` samples from (one-hot at the argmax when greedy)."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(torch.argmax(logits), logits.numel()).float()
        s = self.sampling
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
        return torch.softmax(logits, dim=-1)

    def uniform(self) -> float:
        """One U[0, 1) draw from this sampler's generator (speculative acceptance tests)."""
        return float(torch.rand(1, generator=self.generator))

    def draw(self, probs: torch.Tensor) -> int:
        """One token from an already processed distribution, with this sampler's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))


class BodyLink(Protocol):
    """Where the body runs: in this process, or behind a network session."""

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor: ...


class StepModel:
    """The one step API over head -> body -> tail, for every decoding strategy.

    `step(start, token_ids)` runs n positions from `start` and returns their logits
    (`last=m`: only the last m rows, so the LM head skips the rest of a long prompt);
    `features` keeps the last decoder layer's output (before the final norm) of all n
    rows, which a feature-level draft head reads. A step that starts before the cached
    length cuts every cache back to `start` first: the device's head and tail here, the
    body's on the server when it receives the step (protocol v1 has no separate
    cut-back frame; the step's position is the cut-back). `cut_back(length)` cuts the
    device's caches at once and leaves the body's to the next step.

    The near-tie guard (`refine_gap`, a lossy codec's): when a step's caller needs only its last
    row (plain decoding) and that row's top-2 logit gap is below `refine_gap`, the body is asked
    for that row again in fp16 (REFINE, one more round trip) and the tail reruns it: a coded
    downlink then cannot flip a token its error could not have flipped at fp16. It does nothing
    for the uplink's error, which sits in the body's cache (docs/benchmarks.md).
    """

    def __init__(self, head, body: BodyLink | None, tail, refine_gap: float = 0.0):
        self.head, self.body, self.tail = head, body, tail
        self.refine_gap = refine_gap if body is not None and getattr(body, "can_refine", False) else 0.0
        self.refined = 0  # steps whose last row was refined
        self.local_seconds = 0.0  # head + tail on the device
        self.body_seconds = 0.0  # waiting for the body (compute + communication)
        self.steps = 0
        self.positions = 0  # positions sent through the body, rejected ones included
        self.features: torch.Tensor | None = None
        self.last_start = 0  # where the last step started: a `keep` refers to it

    @property
    def tree_steps(self) -> bool:
        """Whether `step` may carry a tree: always in local mode, else if the body's server takes them."""
        return self.body is None or bool(getattr(self.body, "tree_steps", False))

    @torch.inference_mode()
    def step(self, start: int, token_ids: list[int], last: int | None = None, parents: list[int] | None = None,
             keep: list[int] | None = None) -> torch.Tensor:
        """`parents`: a tree step (llm/tree.py; rows in flattened order). `keep`: the offsets of the previous
        step to keep first (its accepted path), in every cache: here, and the body's on the server."""
        t0 = time.perf_counter()
        if keep is not None:
            for stack in (self.head.stack, self.tail.stack):
                stack.compact(self.last_start, keep)
        tree = {} if parents is None else {"parents": parents}  # chains call every part exactly as before
        hidden = self.head.forward(torch.tensor([token_ids]), start, **tree)
        t1 = time.perf_counter()
        if self.body is not None:
            tree_fields = {} if parents is None and keep is None else {"parents": parents, "keep": keep}
            hidden = self.body.forward(hidden, start, **tree_fields)
        t2 = time.perf_counter()
        tail = self.tail
        self.last_start = start
        self.features = tail.stack.forward(hidden, start, **tree)[0]  # every row: a draft head may need the prompt's
        rows = self.features[-last:] if last is not None else self.features
        logits = tail.family.logits(tail.config, tail.lm_head(tail.norm(rows)))
        waited = 0.0  # a refinement's round trip
        if last == 1 and parents is None and self.refine_gap > 0 and top2_gap(logits[-1]) < self.refine_gap:
            t3 = time.perf_counter()
            row = self.body.refine().to(hidden.dtype)
            waited = time.perf_counter() - t3
            position = start + len(token_ids) - 1
            tail.stack.truncate(position)
            self.features[-1] = tail.stack.forward(row, position)[0, 0]
            logits = tail.family.logits(tail.config, tail.lm_head(tail.norm(self.features[-1:])))
            self.refined += 1
        self.local_seconds += (t1 - t0) + (time.perf_counter() - t2) - waited
        self.body_seconds += t2 - t1 + waited
        self.steps += 1
        self.positions += len(token_ids)
        return logits

    def cut_back(self, length: int) -> None:
        for stack in (self.head.stack, self.tail.stack):
            if stack.length > length:
                stack.truncate(length)


def top2_gap(logits: torch.Tensor) -> float:
    """The gap between the two largest logits of one row."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def mask_eos(logits: torch.Tensor, eos_ids: set[int], ignore_eos: bool) -> torch.Tensor:
    """With ignore_eos the EOS logits are -inf (as `generate(min_new_tokens=N)` does)."""
    if not ignore_eos:
        return logits
    logits = logits.clone()
    logits[..., list(eos_ids)] = float("-inf")
    return logits


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_ids: list[int]
    seconds: float = 0.0  # wall time of the generation (model loading excluded)
    local_seconds: float = 0.0  # head + tail + sampling on the device
    body_seconds: float = 0.0  # wall time spent waiting for the body (compute + communication)
    logits: list[torch.Tensor] = field(default_factory=list)
    text: str = ""
    steps: int = 0  # head -> body -> tail steps, the prompt's included (= body round trips in split mode)
    first_step_tokens: int = 0  # tokens committed by the prompt's step
    drafted: int = 0  # speculative positions drafted and sent for verification
    accepted: int = 0  # of those, accepted
    speculate: str = "none"
    rounds: list[dict] = field(default_factory=list)  # speculative runs: one record per round (adaptive.py)
    refined: int = 0  # steps whose last row came again in fp16 (the near-tie guard: REFINE)

    @property
    def accepted_per_step(self) -> float:
        """Tokens committed per step after the prompt's (1.0 for plain decoding)."""
        later = self.steps - 1
        return (len(self.token_ids) - self.first_step_tokens) / later if later > 0 else float(len(self.token_ids) > 0)


def generate_ids(head, body: BodyLink | None, tail, prompt_ids: list[int], *, max_new_tokens: int,
                 sampler: Sampler, eos_ids: set[int], ignore_eos: bool = False, cache: str = "kv",
                 on_token: Callable[[int], None] | None = None, keep_logits: bool = False,
                 speculate=None, draft_tokens: int | str = "auto", refine_gap: float = 0.0) -> GenerationResult:
    """Run head -> body -> tail -> sample, one step per generated token.

    With cache="kv" the prompt is one step and every later step carries one new position.
    With cache="none" every step restarts at position 0 and carries the whole sequence
    (the paper's baseline without caching). With `speculate` (a draft source, see
    lambdasplit.speculative) each step also verifies drafted tokens. `refine_gap`: the near-tie
    guard of a lossy codec (StepModel; plain decoding only).
    """
    if cache not in ("kv", "none"):
        raise UsageError("cache must be 'kv' or 'none'")
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model = StepModel(head, body, tail, refine_gap=refine_gap)
    began = time.perf_counter()
    if speculate is not None:
        if cache != "kv":
            raise UsageError("speculative decoding needs --cache kv (it verifies drafts against the caches)")
        from lambdasplit.speculative.decode import speculative_generate

        result = speculative_generate(model, speculate, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler,
                                      eos_ids=eos_ids, ignore_eos=ignore_eos, draft_tokens=draft_tokens,
                                      on_token=on_token, keep_logits=keep_logits)
    else:
        result = _plain_generate(model, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, cache,
                                 on_token, keep_logits)
    result.seconds = time.perf_counter() - began
    result.local_seconds, result.body_seconds, result.steps = model.local_seconds, model.body_seconds, model.steps
    result.refined = model.refined
    return result


def _plain_generate(model: StepModel, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, cache,
                    on_token, keep_logits) -> GenerationResult:
    result = GenerationResult(token_ids=[], prompt_ids=list(prompt_ids), first_step_tokens=min(1, max_new_tokens))
    sequence = list(prompt_ids)
    start, new = 0, list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = mask_eos(model.step(start, new, last=1)[-1], eos_ids, ignore_eos)
        t0 = time.perf_counter()
        token = sampler(logits)
        model.local_seconds += time.perf_counter() - t0
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
    return result
