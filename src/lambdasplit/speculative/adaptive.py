"""How many tokens to draft: a fixed k, or `auto`, chosen each step from measurements.

A step of n positions costs w(n) = w0 + w1 * n seconds of wall time (head, body with
its round trip and the link's serialization, tail), fitted online by least squares
over the steps so far (the prompt's long step pins the slope early); each drafted
token costs the source d seconds to propose; each draft is accepted with probability
alpha (measured, with a weak prior of 0.5). A step drafting k tokens commits
E(k) = 1 + alpha + ... + alpha^k tokens on average, so `auto` picks the k in [0, K]
that maximizes E(k) / (w(k + 1) + d * k). k = 0 is plain decoding: on a fast link where
an extra position costs more than it is expected to save, speculation switches itself off, except for one probe of 3 drafts after every 8 plain steps (so a
source whose acceptance improves, or that learns only while drafting, can come back).
"""

from __future__ import annotations

from lambdasplit.errors import UsageError

MAX_AUTO_TOKENS = 8
DECAY = 0.97  # older steps weigh less: acceptance and costs drift with the text and the load
WARMUP_TOKENS = 3  # drafted on the first steps, before there is anything to fit
PROBE_EVERY = 8  # after this many plain steps in a row, draft WARMUP_TOKENS once: acceptance drifts, and
# stateful sources (lookahead's Jacobi guess and n-gram pool) only learn from the steps they draft in


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
        self.sums = [0.0] * 5  # weighted: 1, n, n^2, w, n*w
        self.slope: float | None = None
        self.draft_seconds, self.draft_count = 0.0, 0.0
        self.observed = 0
        self.plain_streak = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted

    def cost(self) -> tuple[float, float]:
        """(w0, w1) of the fitted step time."""
        s1, sn, snn, sw, snw = self.sums
        mean_n, mean_w = sn / s1, sw / s1
        var = snn / s1 - mean_n ** 2
        if var > 0.25:
            self.slope = max(0.0, (snw / s1 - mean_n * mean_w) / var)
        slope = self.slope if self.slope is not None else 0.0
        return max(0.0, mean_w - slope * mean_n), slope

    def choose(self, limit: int) -> int:
        """Tokens to draft now; never more than `limit` (the room left before max_new_tokens)."""
        if self.setting != "auto":
            return max(0, min(self.setting, limit))
        if self.observed < 2:
            return max(0, min(WARMUP_TOKENS, limit))
        w0, w1 = self.cost()
        d = self.draft_seconds / self.draft_count if self.draft_count else 0.0
        alpha = min(self.acceptance, 0.999)
        best, best_rate = 0, 0.0
        expected = 0.0
        for k in range(0, min(self.max_tokens, limit) + 1):
            expected += alpha ** k
            rate = expected / max(1e-9, w0 + w1 * (k + 1) + d * k)
            if rate > best_rate:
                best, best_rate = k, rate
        self.plain_streak = self.plain_streak + 1 if best == 0 else 0
        if self.plain_streak > PROBE_EVERY:
            self.plain_streak = 0
            return max(0, min(WARMUP_TOKENS, limit))
        return best

    def update(self, positions: int, step_seconds: float, drafted: int, accepted: int, draft_seconds: float) -> None:
        self.observed += 1
        self.sums = [v * DECAY for v in self.sums]
        for i, value in enumerate((1.0, positions, positions ** 2, step_seconds, positions * step_seconds)):
            self.sums[i] += value
        if drafted:
            # Drafts after the first rejection are never tested: the trials are the accepted drafts
            # plus that rejection (the maximum-likelihood estimate of a per-draft acceptance rate).
            self.drafted = self.drafted * DECAY + accepted + (1 if accepted < drafted else 0)
            self.accepted = self.accepted * DECAY + accepted
            self.draft_seconds = self.draft_seconds * DECAY + draft_seconds
            self.draft_count = self.draft_count * DECAY + drafted
