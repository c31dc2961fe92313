"""How many tokens to draft: a fixed k, or `auto`, chosen each round from measurements.

`auto` compares expected committed tokens per second with and without drafting, from
what this generation has measured so far (the old rule fitted the step time with the
prompt's long step in the fit: batched prefill pinned the per-position cost far below
what one more decode position costs, and the source's cost outside `propose` was never
counted, so on a fast link it kept drafting at 0.7-0.8x of plain decoding):

- a: the wall time of a plain round (one position: head, body with its round trip and
  the link's serialization, tail, sampling), and s: the extra wall time per drafted
  position outside drafting (server time per position, bytes on the wire, verifying),
  fitted by least squares over the decode rounds only (never the prompt's) on
  round seconds - drafting seconds = a + s * k;
- d: the device's drafting seconds per drafted token, measured around `propose` as it
  runs (a source's catch-up work after plain rounds included);
- alpha: the acceptance of a draft (measured, prior 0.5 worth two drafts).

A round drafting k tokens commits E(k) = 1 + alpha + ... + alpha^k tokens on average in
a + (s + d) * k seconds; `auto` picks the k in [0, K] maximizing that rate, k = 0 being
plain decoding (1 / a). Until both a plain and a drafting decode round have been timed,
it drafts WARMUP_TOKENS once, then steps plainly once. When plain wins, it re-probes with
WARMUP_TOKENS drafts after PROBE_EVERY plain rounds, doubling that gap after each probe
that does not pay (up to MAX_PROBE_EVERY), so a slow link, a source whose acceptance
improves, or one that learns only while drafting (lookahead) switches back on, while a
fast link pays for few probes.
"""

from __future__ import annotations

from lambdasplit.errors import UsageError

MAX_AUTO_TOKENS = 8
DECAY = 0.97  # older rounds weigh less: acceptance and costs drift with the text and the load
WARMUP_TOKENS = 3  # drafted on the first drafting round and on each probe
PROBE_EVERY = 8  # plain rounds before the first re-probe; doubled after each probe that does not pay
MAX_PROBE_EVERY = 64


def parse_draft_tokens(value) -> int | str:
    if value in (None, "auto"):
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--draft-tokens must be an integer >= 0 or 'auto', got {value!r}") from None
    if k < 0:
        raise UsageError(f"--draft-tokens must be >= 0, got {k}")
    return k


class DraftLength:
    def __init__(self, setting: int | str = "auto", max_tokens: int = MAX_AUTO_TOKENS):
        self.setting = parse_draft_tokens(setting)
        self.max_tokens = max_tokens
        self.drafted, self.accepted = 2.0, 1.0  # trials and successes; prior alpha = 0.5, worth two drafts
        self.sums = [0.0] * 5  # decode rounds, weighted: 1, k, k^2, r, k*r (r = round - drafting seconds)
        self.slope: float | None = None
        self.draft_seconds, self.draft_count = 0.0, 0.0
        self.observed = 0
        self.plain_rounds = self.drafting_rounds = 0  # decode rounds timed, by whether they drafted
        self.plain_streak = 0
        self.probe_every = PROBE_EVERY

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted

    def cost(self) -> tuple[float, float, float]:
        """(a, s, d): seconds of a plain round, extra seconds per drafted position, drafting seconds per token."""
        s1, sk, skk, sr, skr = self.sums
        mean_k, mean_r = sk / s1, sr / s1
        var = skk / s1 - mean_k ** 2
        if var > 0.25:
            self.slope = max(0.0, (skr / s1 - mean_k * mean_r) / var)
        slope = self.slope if self.slope is not None else 0.0
        d = self.draft_seconds / self.draft_count if self.draft_count else 0.0
        return max(1e-9, mean_r - slope * mean_k), slope, d

    def rates(self, limit: int) -> list[float]:
        """Expected committed tokens per second for k = 0 .. min(K, limit) drafts."""
        a, s, d = self.cost()
        alpha = min(self.acceptance, 0.999)
        rates, expected = [], 0.0
        for k in range(0, min(self.max_tokens, limit) + 1):
            expected += alpha ** k
            rates.append(expected / (a + (s + d) * k))
        return rates

    def choose(self, limit: int) -> int:
        """Tokens to draft now; never more than `limit` (the room left before max_new_tokens)."""
        if self.setting != "auto":
            return max(0, min(self.setting, limit))
        warm = max(0, min(WARMUP_TOKENS, limit))
        if not self.drafting_rounds:
            return warm
        if not self.plain_rounds:
            return 0
        rates = self.rates(limit)
        best = max(range(len(rates)), key=rates.__getitem__)
        if best:
            self.plain_streak, self.probe_every = 0, PROBE_EVERY
            return best
        self.plain_streak += 1
        if self.plain_streak > self.probe_every:
            self.plain_streak = 0
            self.probe_every = min(MAX_PROBE_EVERY, self.probe_every * 2)
            return warm
        return 0

    def update(self, positions: int, step_seconds: float, drafted: int, accepted: int, draft_seconds: float,
               round_seconds: float | None = None) -> None:
        """One round: its step's positions and seconds, drafts and accepted drafts, drafting seconds, and
        the round's whole wall time (drafting, step, verifying, the source's bookkeeping); without it,
        step + drafting seconds."""
        self.observed += 1
        if round_seconds is None:
            round_seconds = step_seconds + draft_seconds
        if drafted:
            # Drafts after the first rejection are never tested: the trials are the accepted drafts
            # plus that rejection (the maximum-likelihood estimate of a per-draft acceptance rate).
            self.drafted = self.drafted * DECAY + accepted + (1 if accepted < drafted else 0)
            self.accepted = self.accepted * DECAY + accepted
        if draft_seconds or drafted:
            self.draft_seconds = self.draft_seconds * DECAY + draft_seconds
            self.draft_count = self.draft_count * DECAY + drafted
        if self.observed == 1:
            return  # the prompt's round: batched prefill says nothing about one more decode position
        if drafted:
            self.drafting_rounds += 1
        else:
            self.plain_rounds += 1
        rest = max(0.0, round_seconds - draft_seconds)
        self.sums = [v * DECAY for v in self.sums]
        for i, value in enumerate((1.0, drafted, drafted ** 2, rest, drafted * rest)):
            self.sums[i] += value
