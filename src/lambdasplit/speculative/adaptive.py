"""How many tokens to draft: a fixed k, or `auto`, chosen each round from measurements.

`auto` compares expected committed tokens per second with and without drafting, from
what this generation has measured so far:

- a: the wall time of a plain round (one position: head, body with its round trip and
  the link's serialization, tail, sampling): the median of the latest plain decode rounds;
- s: the extra wall time per drafted position outside drafting (server time per position,
  bytes on the wire, the tail's LM head over one more row, verifying, the source's
  `observe`): per drafting round, (round - drafting seconds - a) / k, and the median of
  the latest such rounds;
- d: the device's drafting seconds per drafted token, measured around `propose` as it
  runs (a source's catch-up work after plain rounds included, its first one over the prompt not);
- alpha: the acceptance of a draft (measured, prior 0.5 worth two drafts).

A round drafting k tokens commits E(k) = 1 + alpha + ... + alpha^k tokens on average in
a + (s + d) * k seconds; `auto` drafts the best k in [1, K] only when its rate beats plain
decoding's (1 / a) by MARGIN. The prompt's round drafts WARMUP_TOKENS (it is never timed),
the first decode round is plain, the second drafts WARMUP_TOKENS. When plain wins, it
probes after PROBE_EVERY plain rounds with the k the model would draft (1 when drafting
looks poor: the cheapest round that still measures acceptance and cost), doubling the gap
after each probe (up to MAX_PROBE_EVERY), so a slow link, a source whose acceptance
improves, or one that learns only while drafting (lookahead) switches back on, while a
fast link pays for few, cheap probes.

A tree source (eagle-tree, eagle+lookup: a whole draft tree verified in one step) gets a
different rule, since a k-node tree accepts more than the chain model predicts from its
acceptance at another k (siblings cover the head's second and third guesses: measured at
40 ms, the chain model's `auto` drafted on 26% of a code prompt's rounds where a 5-node
tree committed 2.24 tokens per round trip). There the choice is between two arms, plain
and a TREE_BUDGET-node tree (the tree adapts its own shape within the budget), each priced
by what its own rounds measured: E = 1 + the tree rounds' mean accepted length (a prior of
one round at alpha 0.5), cost = the median extra wall time of the latest tree rounds over a
plain round, drafting included; it drafts when E / (a + cost) beats 1 / a by MARGIN, and
probes with a whole tree.

Either rule leaves the source's first catch-up out of its prices (`catch_up`: EAGLE's head
reading the whole prompt, once per generation, up to 0.3 s on a long prompt here; priced as a
round it switched tree drafting off on both summaries, and in d it would weigh on the chain's
price for dozens of rounds).

Why this rule (issue #12): the previous one fitted round - drafting = a + s * k by least
squares over all decode rounds. When plain rounds dominate, a drifts (the link, the load)
and the few drafting rounds are confounded with that drift, so the slope swung from 0 to
several times the real cost; its probes drafted 3 tokens at 20-30 ms each on this CPU
(the LM head over 49k tokens is ~17 ms per row here under load). Medians of recent rounds
are robust to one stalled round on a loaded machine and track a changed link within a
few rounds (tests/test_speculative_adaptive.py).
"""

from __future__ import annotations

from statistics import median

from lambdasplit.errors import UsageError

MAX_AUTO_TOKENS = 8
DECAY = 0.97  # older rounds weigh less: acceptance and costs drift with the text and the load
WARMUP_TOKENS = 2  # drafted on the first drafting round
MARGIN = 1.05  # draft only when the model expects it to beat plain decoding by 5%: a marginal gain is within
# the noise of the fitted costs, while a wrong "draft" costs every round until the fit corrects it
PROBE_EVERY = 8  # plain rounds before the first re-probe; doubled after each probe that does not pay
MAX_PROBE_EVERY = 64
TREE_BUDGET = 5  # nodes of an auto tree: at 40 ms, 5 gave 1.25x plain and 8 1.15x (docs/benchmarks.md, eagle+lookup)
RECENT = 9  # costs are the median of the latest rounds: one stalled round (a loaded machine) moves nothing,
# and a link that slows is tracked within a few rounds


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
    def __init__(self, setting: int | str = "auto", max_tokens: int = MAX_AUTO_TOKENS, tree: bool = False):
        self.setting = parse_draft_tokens(setting)
        self.max_tokens = max_tokens
        self.tree_budget = min(TREE_BUDGET, max_tokens) if tree else 0  # > 0: the two-arm rule of a tree source
        prior = sum(0.5 ** i for i in range(1, self.tree_budget + 1))
        self.tree_accepted, self.tree_count = prior, 1.0  # decayed accepted length of full tree rounds
        self.tree_extra: list[float] = []  # round - a of the latest full tree rounds, drafting included
        self.caught_up = False  # whether the source's first catch-up (over the prompt) has been seen
        self.drafted, self.accepted = 2.0, 1.0  # trials and successes; prior alpha = 0.5, worth two drafts
        self.plain: list[float] = []  # round - drafting seconds of the latest plain decode rounds
        self.extra: list[float] = []  # extra seconds per drafted position of the latest drafting rounds
        self.draft_seconds, self.draft_count = 0.0, 0.0
        self.observed = 0
        self.plain_rounds = self.drafting_rounds = 0  # decode rounds timed, by whether they drafted
        self.plain_streak = 0
        self.probe_every = PROBE_EVERY
        self.trace: list[dict] | None = None  # set to [] to record every round (generate --trace-rounds)
        self._last_choice: dict = {}

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted

    def cost(self) -> tuple[float, float, float]:
        """(a, s, d): seconds of a plain round, extra seconds per drafted position, drafting seconds per token."""
        a = median(self.plain) if self.plain else 0.0
        s = median(self.extra) if self.extra else 0.0
        d = self.draft_seconds / self.draft_count if self.draft_count else 0.0
        return max(1e-9, a), s, d

    def rates(self, limit: int) -> list[float]:
        """Expected committed tokens per second for k = 0 .. min(K, limit) drafts."""
        a, s, d = self.cost()
        alpha = min(self.acceptance, 0.999)
        rates, expected = [], 0.0
        for k in range(0, min(self.max_tokens, limit) + 1):
            expected += alpha ** k
            rates.append(expected / (a + (s + d) * k))
        return rates

    def tree_rates(self) -> tuple[float, float]:
        """Expected committed tokens per second: (plain, a TREE_BUDGET-node tree round)."""
        a, s, d = self.cost()
        extra = median(self.tree_extra) if self.tree_extra else (s + d) * self.tree_budget
        expected = 1.0 + self.tree_accepted / self.tree_count
        return 1.0 / a, expected / (a + extra)

    def choose(self, limit: int) -> int:
        """Tokens to draft now; never more than `limit` (the room left before max_new_tokens)."""
        k, why = self._choose(limit)
        if self.trace is not None:
            self._last_choice = {"k": k, "why": why}
            if self.plain_rounds and self.drafting_rounds:
                a, s, d = self.cost()
                self._last_choice.update(a=a, s=s, d=d, alpha=self.acceptance)
                if self.tree_budget:
                    self._last_choice.update(tree_rate=self.tree_rates()[1], tree_accepted=self.tree_accepted / self.tree_count)
        return k

    def _choose(self, limit: int) -> tuple[int, str]:
        if self.setting != "auto":
            return max(0, min(self.setting, limit)), "fixed"
        warm = max(0, min(self.tree_budget or WARMUP_TOKENS, limit))
        if self.observed and not self.plain_rounds:
            return 0, "warm-up"  # the first decode round is plain: it prices a plain round
        if not self.drafting_rounds or (self.tree_budget and not self.tree_extra):
            return warm, "warm-up"  # the prompt's round, and the first drafting decode round (a tree source: a full tree)
        if self.tree_budget:
            plain, tree = self.tree_rates()
            return self._draft_or_probe(max(0, min(self.tree_budget, limit)), tree > MARGIN * plain)
        rates = self.rates(limit)
        # a probe drafts what the model would draft (1 when drafting looks poor): the cheapest round that
        # still measures the acceptance and the cost of a drafted position
        best = max(range(1, len(rates)), key=rates.__getitem__) if len(rates) > 1 else 0
        return self._draft_or_probe(best, rates[best] > MARGIN * rates[0])

    def _draft_or_probe(self, k: int, pays: bool) -> tuple[int, str]:
        """Draft k when the model says it pays; else plain, but for a probe of k after a growing gap."""
        if k and pays:
            self.plain_streak, self.probe_every = 0, PROBE_EVERY
            return k, "model"
        self.plain_streak += 1
        if k and self.plain_streak > self.probe_every:
            self.plain_streak = 0
            self.probe_every = min(MAX_PROBE_EVERY, self.probe_every * 2)
            return k, "probe"
        return 0, "model"

    def update(self, positions: int, step_seconds: float, drafted: int, accepted: int, draft_seconds: float,
               round_seconds: float | None = None, chosen: int | None = None, catch_up: float = 0.0) -> None:
        """One round: its step's positions and seconds, drafts and accepted drafts, drafting seconds, and
        the round's whole wall time (drafting, step, verifying, the source's bookkeeping); without it,
        step + drafting seconds. `chosen`: the k `choose` returned (a tree's node count may differ);
        `catch_up`: the source's seconds feeding what it had not seen (EAGLE's head), part of drafting."""
        self.observed += 1
        if round_seconds is None:
            round_seconds = step_seconds + draft_seconds
        if self.trace is not None:
            self.trace.append({**self._last_choice, "drafted": drafted, "accepted": accepted, "positions": positions,
                               "step_s": step_seconds, "draft_s": draft_seconds, "round_s": round_seconds})
            self._last_choice = {}
        # the source's first catch-up read the whole prompt: a once-only cost, not a drafted token's price
        once = catch_up if catch_up and not self.caught_up else 0.0
        self.caught_up = self.caught_up or catch_up > 0
        full_tree = self.tree_budget and drafted and (chosen if chosen is not None else drafted) == self.tree_budget
        if full_tree:
            self.tree_accepted = self.tree_accepted * DECAY + accepted
            self.tree_count = self.tree_count * DECAY + 1
        if drafted:
            # Drafts after the first rejection are never tested: the trials are the accepted drafts
            # plus that rejection (the maximum-likelihood estimate of a per-draft acceptance rate).
            self.drafted = self.drafted * DECAY + accepted + (1 if accepted < drafted else 0)
            self.accepted = self.accepted * DECAY + accepted
        if draft_seconds or drafted:
            self.draft_seconds = self.draft_seconds * DECAY + draft_seconds - once
            self.draft_count = self.draft_count * DECAY + drafted
        if self.observed == 1:
            return  # the prompt's round: batched prefill says nothing about one more decode position
        rest = max(0.0, round_seconds - draft_seconds)
        if drafted:
            self.drafting_rounds += 1
            # what each drafted position added over a plain round of now (not a least-squares slope
            # over all rounds: when the link's delay drifts, a drifting intercept biases that slope)
            a, _, _ = self.cost()
            self.extra = [*self.extra, max(0.0, rest - a) / drafted][-RECENT:]
            if full_tree:
                self.tree_extra = [*self.tree_extra, max(0.0, round_seconds - once - a)][-RECENT:]
        else:
            self.plain_rounds += 1
            self.plain = [*self.plain, rest][-RECENT:]
