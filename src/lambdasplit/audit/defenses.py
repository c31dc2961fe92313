"""Defenses on the uplink: what the device does to hidden states before they leave it.

Each defense is an object with `apply(hidden) -> hidden` (what `RemoteBody(defense=...)`
calls on every uplink step), `public(hidden) -> hidden` (its deterministic part, which an
attacker who knows the mechanism applies to its own candidates), and `accounting()` (the
differential-privacy statement that applies, in plain words and numbers).

    gaussian:sigma=S,clip=C     clip each position's vector to L2 norm C, add N(0, S^2 I)
    dpquant:bits=B,epsilon=E,clip=C
                                clip each coordinate to [-C, C], quantize it stochastically
                                to k = 2^B levels, then k-ary (2^B-ary) randomized response
                                with budget E per coordinate; the device sends the debiased
                                estimate

Noise seeds: by default each defense seeds its generator from `secrets.randbits(63)`, so
nobody can regenerate the noise from public values and subtract it. `seed=` (CLI
`--defense-seed`) is for experiments only: it makes the noise reproducible and so
removable. torch's CPU generator (Mersenne Twister) is not a cryptographic generator; we
claim only that the seed is not public or guessable, nothing stronger.

What the numbers mean (and do not mean) is in `accounting()` and docs/privacy.md: the
guarantee is about one transmitted vector (gaussian) or one coordinate (dpquant); a prompt
is many vectors and every vector after a token depends on it, so sequence-level budgets
compose and grow quickly. The audit measures what attacks actually recover.
"""

from __future__ import annotations

import math
import secrets

import torch

from lambdasplit.errors import LambdaSplitError

DELTA = 1e-5  # the delta used for every (epsilon, delta) figure the audit prints


def gaussian_epsilon(sensitivity: float, sigma: float, delta: float = DELTA) -> float:
    """Smallest epsilon for which N(0, sigma^2) on an L2-sensitivity query is (epsilon, delta)-DP.

    The analytic Gaussian mechanism (Balle & Wang 2018): delta(eps) = Phi(D/2s - eps s/D)
    - e^eps Phi(-D/2s - eps s/D); exact for every epsilon, unlike the classic bound that
    needs epsilon < 1. Evaluated in log space (large epsilons overflow e^eps) and solved
    by bisection.
    """
    from scipy.special import log_ndtr, ndtr

    if sigma <= 0:
        return math.inf
    a = sensitivity / sigma

    def delta_of(eps: float) -> float:
        return float(ndtr(a / 2 - eps / a) - math.exp(min(eps + log_ndtr(-a / 2 - eps / a), 0.0)))

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
        if high > 1e12:
            return math.inf
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def _generator(seed: int | None) -> torch.Generator:
    """A generator seeded from `secrets` unless an explicit (reproducible, hence removable) seed is given."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


def _seed_note(seeded: bool) -> str:
    return "fixed seed: reproducible, so removable (experiments only)" if seeded else "secrets.randbits(63)"


def zcdp_epsilon(rho: float, delta: float = DELTA) -> float:
    """(epsilon, delta) implied by rho-zCDP (Bun & Steinke 2016): rho + 2 sqrt(rho ln(1/delta))."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


class NoDefense:
    name = "none"

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def public(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def accounting(self, positions: int = 1) -> dict:
        return {"mechanism": "none", "epsilon_per_vector": math.inf}


class GaussianDefense:
    """L2 clipping per position, then isotropic Gaussian noise: the Gaussian mechanism per vector."""

    def __init__(self, sigma: float, clip: float, seed: int | None = None):
        if sigma < 0 or clip <= 0:
            raise LambdaSplitError("gaussian defense needs sigma >= 0 and clip > 0")
        self.sigma, self.clip = float(sigma), float(clip)
        self.generator = _generator(seed)  # seed=None: unpredictable; an int: reproducible (experiments only)
        self.seeded = seed is not None
        self.name = f"gaussian:sigma={self.sigma:g},clip={self.clip:g}"

    def public(self, hidden: torch.Tensor) -> torch.Tensor:
        norms = hidden.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (hidden.float() * (self.clip / norms).clamp(max=1.0)).to(hidden.dtype)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        clipped = self.public(hidden).float()
        noise = torch.randn(clipped.shape, generator=self.generator) * self.sigma
        return (clipped + noise).to(hidden.dtype)

    def accounting(self, positions: int = 1) -> dict:
        # Two clipped vectors differ by at most 2C in L2 norm (replace one input by any other).
        sensitivity = 2 * self.clip
        rho = sensitivity**2 / (2 * self.sigma**2) if self.sigma > 0 else math.inf
        return {
            "mechanism": "Gaussian mechanism on each transmitted vector (L2 clip C, sensitivity 2C)",
            "delta": DELTA,
            "epsilon_per_vector": gaussian_epsilon(sensitivity, self.sigma),
            "rho_zcdp_per_vector": rho,
            "positions": positions,
            "epsilon_all_positions": zcdp_epsilon(rho * positions) if math.isfinite(rho) else math.inf,
            "noise_seed": _seed_note(self.seeded),
        }


class DPQuantDefense:
    """Differentially private stochastic B-bit quantization (our reading of DEL's abstract).

    Per coordinate: clip to [-C, C]; stochastic rounding to one of k = 2^B evenly spaced
    levels (unbiased); k-ary randomized response (keep the level with probability
    e^E / (e^E + k - 1), else any other level uniformly), which is E-local-DP for that
    coordinate whatever its value; then the unbiased estimate of the level is sent.
    DEL also learns an embedding projection and a server-side soft prompt; we do neither.
    """

    def __init__(self, bits: int, epsilon: float, clip: float, seed: int | None = None):
        if not 1 <= bits <= 8 or epsilon <= 0 or clip <= 0:
            raise LambdaSplitError("dpquant defense needs 1 <= bits <= 8, epsilon > 0 and clip > 0")
        self.bits, self.epsilon, self.clip = int(bits), float(epsilon), float(clip)
        self.generator = _generator(seed)  # seed=None: unpredictable; an int: reproducible (experiments only)
        self.seeded = seed is not None
        self.name = f"dpquant:bits={self.bits},epsilon={self.epsilon:g},clip={self.clip:g}"
        k = 2**self.bits
        self.keep = math.exp(self.epsilon) / (math.exp(self.epsilon) + k - 1)
        self.other = (1 - self.keep) / (k - 1)
        self.levels = torch.linspace(-self.clip, self.clip, k)

    def public(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float().clamp(-self.clip, self.clip).to(hidden.dtype)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        k = len(self.levels)
        x = self.public(hidden).float()
        position = (x + self.clip) / (2 * self.clip) * (k - 1)  # in [0, k-1]
        low = position.floor()
        up = torch.rand(x.shape, generator=self.generator) < (position - low)
        level = (low + up.float()).clamp(0, k - 1).long()
        # Randomized response: with probability 1 - keep, move to one of the k - 1 other levels.
        flip = torch.rand(x.shape, generator=self.generator) >= self.keep
        shift = torch.randint(1, k, x.shape, generator=self.generator)
        level = torch.where(flip, (level + shift) % k, level)
        values = self.levels[level]
        # E[values] = keep * v + other * (sum(levels) - v): invert that to stay unbiased.
        debiased = (values - self.other * self.levels.sum()) / (self.keep - self.other)
        return debiased.to(hidden.dtype)

    def accounting(self, positions: int = 1) -> dict:
        return {
            "mechanism": f"stochastic quantization + {2 ** self.bits}-ary (2^B-ary) randomized response per "
                         "coordinate (pure local DP)",
            "epsilon_per_coordinate": self.epsilon,
            "epsilon_per_vector": "D x epsilon by basic composition over the D coordinates",
            "positions": positions,
            "noise_seed": _seed_note(self.seeded),
        }


def parse_defense(spec: str | None, seed: int | None = None):
    """`none`, `gaussian:sigma=S,clip=C` or `dpquant:bits=B,epsilon=E,clip=C` -> a defense object.

    `seed=None` (the default) draws the noise seed from `secrets`; an explicit seed is for
    experiments only: it makes the noise reproducible and so removable.
    """
    if spec is None or spec in ("", "none"):
        return NoDefense()
    kind, _, rest = spec.partition(":")
    try:
        params = dict(item.split("=", 1) for item in rest.split(",") if item)
        values = {key: float(value) for key, value in params.items()}
    except ValueError:
        raise LambdaSplitError(f"cannot parse defense {spec!r}: write e.g. gaussian:sigma=2,clip=20") from None
    try:
        if kind == "gaussian":
            if values.keys() - {"sigma", "clip"}:
                _extra(spec)
            return GaussianDefense(values["sigma"], values["clip"], seed=seed)
        if kind == "dpquant":
            if values.keys() - {"bits", "epsilon", "clip"}:
                _extra(spec)
            return DPQuantDefense(int(values["bits"]), values["epsilon"], values.get("clip", 4.0), seed=seed)
    except KeyError as missing:
        raise LambdaSplitError(f"defense {spec!r} is missing {missing}") from None
    raise LambdaSplitError(f"unknown defense {spec!r}: use none, gaussian:sigma=S,clip=C or dpquant:bits=B,epsilon=E,clip=C")


def _extra(spec: str):
    raise LambdaSplitError(f"defense {spec!r} has unknown parameters")
