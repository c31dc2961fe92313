"""The Pareto front over (seconds per token, bytes per token, leakage, device memory), all
minimised, and the recommendation under the user's constraints.

A leakage that no audit measured counts as the worst (1.0) in the front: nothing is
claimed for it, and a `--max-leak` constraint refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdasplit.plan.predict import Candidate

LOSSLESS = {"fp32"}  # codecs whose output equals the unsplit model's by construction


def objectives(candidate: Candidate, figures: dict | None = None) -> tuple[float, float, float, float]:
    """The four minimised figures; `figures` (a measured record) overrides the predicted ones."""
    seconds = 1.0 / figures["tokens_per_s"] if figures else candidate.seconds_per_token
    nbytes = figures["bytes_per_token"] if figures else candidate.bytes_per_token
    memory = figures.get("device_memory", candidate.device_memory) if figures else candidate.device_memory
    leak = 1.0 if candidate.leakage is None else candidate.leakage
    return seconds, nbytes, leak, memory


def dominates(a: tuple, b: tuple, speed_tie: float = 0.0) -> bool:
    """a is no worse than b everywhere and better somewhere; seconds per token (the first figure)
    within `speed_tie` (relative) of each other count as equal (measured speeds are noisy)."""
    (a_speed, *a_rest), (b_speed, *b_rest) = a, b
    if a_speed > b_speed * (1 + speed_tie):
        return False
    faster = a_speed < b_speed * (1 - speed_tie)
    return all(x <= y for x, y in zip(a_rest, b_rest)) and (faster or any(x < y for x, y in zip(a_rest, b_rest)))


def front(candidates: list[Candidate], measured: bool = False, speed_tie: float = 0.0) -> list[Candidate]:
    """The non-dominated candidates (by predicted figures, or by measured ones)."""
    points = [(c, objectives(c, c.measured if measured else None)) for c in candidates]
    return [c for c, obj in points if not any(dominates(other, obj, speed_tie) for _, other in points)]


@dataclass(frozen=True)
class Constraints:
    device_memory: int | None = None  # bytes
    max_leak: float | None = None  # fraction of prompt tokens recovered (top-1)
    min_agreement: float = 0.99  # quick greedy agreement with the unsplit model

    def reasons(self, candidate: Candidate) -> list[str]:
        """Why a candidate is refused (empty: it is allowed)."""
        out = []
        if self.device_memory is not None and candidate.device_memory > self.device_memory:
            out.append("device memory")
        if self.max_leak is not None and (candidate.leakage is None or candidate.leakage > self.max_leak):
            out.append("leakage " + ("unknown" if candidate.leakage is None else "too high"))
        exact = candidate.codec in LOSSLESS and candidate.device_weights == "float"
        if not exact and (candidate.agreement is None or candidate.agreement < self.min_agreement):
            out.append("agreement " + ("unknown" if candidate.agreement is None else "too low"))
        return out


SPEED_TIE = 0.03  # predicted speeds this close count as equal: the prediction is not finer than that


def recommend(candidates: list[Candidate], constraints: Constraints, speed_tie: float = SPEED_TIE) -> Candidate | None:
    """Among the allowed candidates within `speed_tie` of the fastest, the one with the fewest bytes
    per token (then the least leakage, then the least device memory); None if none is allowed.

    Picking by speed alone would choose between near-equal speeds by noise and land off the
    front the measurement finds (the same speed with more bytes)."""
    allowed = [c for c in candidates if not constraints.reasons(c)]
    if not allowed:
        return None
    fastest = min(c.seconds_per_token for c in allowed)
    near = [c for c in allowed if c.seconds_per_token <= fastest * (1 + speed_tie)]
    return min(near, key=lambda c: (c.bytes_per_token, 1.0 if c.leakage is None else c.leakage, c.device_memory,
                                    c.seconds_per_token))
