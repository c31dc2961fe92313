"""`--draft-tokens auto`'s cost model, fed the measured costs of simulated links and sources.

Each round costs plain + (position + drafting) * k seconds; a draft is accepted with
probability alpha. The prompt's round is a batched prefill: cheap per position, which
the old rule's fit took as the cost of one more decode position (issue #12).
"""

import random

from lambdasplit.speculative.adaptive import DraftLength


def drive(length, rounds, *, plain, position, drafting, alpha, seed=0, prompt=(30, 0.030), outside=0.0, catch_up=0.0):
    """Rounds through `length`; returns the k chosen each round. `prompt` is (positions, seconds) or None;
    `outside`: seconds per drafted token spent in the round outside the step and `propose` (verify, observe);
    `catch_up`: seconds the first drafting round's `propose` spends reading the prompt (reported as such)."""
    rng = random.Random(seed)
    if prompt is not None:
        length.update(prompt[0], prompt[1], 0, 0, 0.0, round_seconds=prompt[1])
    chosen = []
    for _ in range(rounds):
        k = length.choose(100)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        step = plain + position * k
        once, catch_up = (catch_up, 0.0) if k else (0.0, catch_up)
        length.update(k + 1, step, k, accepted, drafting * k + once, round_seconds=step + (drafting + outside) * k + once,
                      catch_up=once)
        chosen.append(k)
    return chosen


def committed_per_second(plain, position, drafting, alpha, k):
    expected = sum(alpha ** i for i in range(k + 1))
    return expected / (plain + (position + drafting) * k)


FAST = dict(plain=0.050, position=0.015, drafting=0.007, alpha=0.35)  # 5 ms link: drafting loses
SLOW = dict(plain=0.200, position=0.015, drafting=0.007, alpha=0.35)  # long WAN: drafting pays


def test_the_scenarios_are_what_they_say():
    assert max(committed_per_second(**FAST, k=k) for k in range(1, 9)) < committed_per_second(**FAST, k=0)
    assert max(committed_per_second(**SLOW, k=k) for k in range(1, 9)) > 1.1 * committed_per_second(**SLOW, k=0)


def test_a_fast_link_decodes_plainly_despite_the_cheap_prompt():
    # The old rule fitted w(n) with the prompt's 30 positions at 1 ms each and drafted on every round here.
    chosen = drive(DraftLength("auto"), 120, **FAST)
    late = chosen[20:]
    assert sum(k > 0 for k in late) <= 5, late  # plain rounds, but for a few probes with growing gaps
    gaps = [i for i, k in enumerate(late) if k > 0]
    assert all(b - a >= 16 for a, b in zip(gaps, gaps[1:])), gaps


def test_drafting_pays_on_a_long_link_and_comes_back_when_the_link_slows():
    assert min(drive(DraftLength("auto"), 60, **SLOW)[-20:]) >= 1
    length = DraftLength("auto")
    drive(length, 60, **FAST)
    back = drive(length, 120, **SLOW, prompt=None, seed=1)
    assert sum(k > 0 for k in back[-40:]) >= 30, back  # a probe turned it back on; noise in alpha may flicker


def test_the_drafting_cost_is_the_measured_one():
    # Same link, a source twice as slow to draft: the chosen k falls, then drafting stops.
    link = dict(plain=0.200, position=0.005, alpha=0.6)
    cheap = drive(DraftLength("auto"), 60, **link, drafting=0.005)[-20:]
    dear = drive(DraftLength("auto"), 60, **link, drafting=0.150)[-20:]
    assert sum(cheap) / 20 >= 2 and sum(k > 0 for k in dear) <= 2, (cheap, dear)


def test_the_catch_up_over_the_prompt_is_not_a_drafted_tokens_price():
    # EAGLE's head reads a long prompt once (0.3 s) in the first drafting round: drafting still pays on a long link.
    assert min(drive(DraftLength("auto"), 60, **SLOW, catch_up=0.300)[-20:]) >= 1


def test_the_whole_round_is_counted():
    # Step and propose look cheap, but each drafted token costs 40 ms more elsewhere in the round.
    link = dict(plain=0.100, position=0.002, drafting=0.002, alpha=0.3)
    assert max(drive(DraftLength("auto"), 60, **link)[-20:]) >= 1
    assert sum(k > 0 for k in drive(DraftLength("auto"), 60, **link, outside=0.040)[-20:]) <= 2


def test_a_fixed_k_is_fixed_and_capped():
    fixed = DraftLength(3)
    assert fixed.choose(10) == 3 and fixed.choose(1) == 1 and fixed.choose(0) == 0


def primed(plain, per_token, alpha, rounds=12):
    """A DraftLength that has timed `rounds` plain and drafting decode rounds at exactly these costs
    (`per_token`: the extra seconds a drafted position costs, drafting + verifying), acceptance `alpha`."""
    length = DraftLength("auto")
    length.update(30, 0.03, 0, 0, 0.0, round_seconds=0.03)  # the prompt's round
    for _ in range(rounds):
        length.update(1, plain, 0, 0, 0.0, round_seconds=plain)
        length.update(3, plain, 2, 1, per_token, round_seconds=plain + 2 * per_token)  # half of it drafting
    length.drafted, length.accepted = 1.0, alpha
    return length


def test_the_rule_decodes_plainly_exactly_when_drafting_costs_more_than_it_saves():
    # Exact costs, no noise: k = 0 iff no k commits more tokens per second than plain decoding (by MARGIN).
    from lambdasplit.speculative.adaptive import MARGIN

    checked = {"plain": 0, "draft": 0}
    for plain in (0.03, 0.07, 0.15, 0.30):
        for per_token in (0.002, 0.01, 0.03, 0.08):
            for alpha in (0.05, 0.2, 0.35, 0.6, 0.85):
                length = primed(plain, per_token, alpha)
                a, s, d = length.cost()
                assert abs(a - plain) < 1e-9 and abs(s + d - per_token) < 1e-9, (a, s, d)
                rates = [committed_per_second(plain, per_token, 0.0, alpha, k) for k in range(9)]
                best = max(range(1, 9), key=rates.__getitem__)
                k = length.choose(100)
                if rates[best] > MARGIN * rates[0]:
                    assert k == best, (plain, per_token, alpha, k, best)
                    checked["draft"] += 1
                else:
                    assert k == 0, (plain, per_token, alpha, k)  # drafting + verifying would not pay
                    checked["plain"] += 1
    assert min(checked.values()) >= 20, checked  # both sides of the rule are exercised


def test_one_stalled_round_does_not_flip_the_decision():
    # A loaded machine stalls a round now and then (0.5 s for a 70 ms round): the costs are medians.
    length = primed(0.070, 0.030, 0.2)
    assert length.choose(100) == 0
    length.update(1, 0.5, 0, 0, 0.0, round_seconds=0.5)
    assert length.choose(100) == 0
    length = primed(0.070, 0.030, 0.2)
    length.update(3, 0.07, 2, 0, 0.06, round_seconds=0.07 + 2 * 0.2)  # a stalled drafting round
    a, s, d = length.cost()
    assert s + d < 0.06, (a, s, d)


def test_probes_are_cheap_on_a_fast_link():
    # When plain wins, a probe drafts what the model would (1 here), not a fixed warm-up length.
    chosen = drive(DraftLength("auto"), 200, **FAST)
    assert max(chosen[10:]) == 1 and sum(chosen[10:]) <= 5, chosen


def drive_tree(length, rounds, *, plain, per_node, accepted_by_k, seed=0, catch_up=0.0):
    """Rounds of a tree source: a k-node tree accepts `accepted_by_k(k)` tokens on average (not a chain's
    alpha^k: siblings cover the draft's other guesses) and costs `per_node` seconds per node; the first
    drafting decode round also pays `catch_up` (the head reading the prompt). Returns the k chosen."""
    rng = random.Random(seed)
    length.update(30, 0.03, 0, 0, 0.0, round_seconds=0.03)  # the prompt's round: no features yet, no tree
    chosen, drafted_before = [], False
    for _ in range(rounds):
        k = length.choose(100)
        mean = accepted_by_k(k) if k else 0.0
        accepted = min(k, int(mean) + (rng.random() < mean - int(mean)))
        once = catch_up if k and not drafted_before else 0.0
        drafted_before = drafted_before or k > 0
        length.update(k + 1, plain + per_node * k, k, accepted, once, round_seconds=plain + per_node * k + once,
                      chosen=k, catch_up=once)
        chosen.append(k)
    return chosen


def tree_acceptance(k):
    return {1: 0.25, 2: 0.45}.get(k, 0.9 if k >= 5 else 0.6)  # a 5-node tree: 0.9 accepted per round


def test_a_tree_source_drafts_whole_trees_where_the_chain_model_would_not():
    # 40 ms link: a plain round 150 ms, 12 ms per node; a 5-node tree commits 1.9 tokens in 210 ms (1.36x).
    from lambdasplit.speculative.adaptive import TREE_BUDGET

    slow = dict(plain=0.150, per_node=0.012, accepted_by_k=tree_acceptance, catch_up=0.060)
    chosen = drive_tree(DraftLength("auto", tree=True), 60, **slow)
    assert sum(k == TREE_BUDGET for k in chosen[-30:]) >= 27, chosen
    # the chain rule extrapolates from small trees (alpha 0.25 at k = 1) and drafts little and small
    chain = drive_tree(DraftLength("auto"), 60, **slow)
    assert sum(chain[-30:]) < sum(chosen[-30:]) / 2, chain


def test_a_tree_source_decodes_plainly_on_a_fast_link_and_probes_with_whole_trees():
    # 5 ms link: a plain round 60 ms; a 5-node tree costs 120 ms for 1.9 tokens (0.95x): plain, with probes.
    from lambdasplit.speculative.adaptive import TREE_BUDGET

    fast = dict(plain=0.060, per_node=0.012, accepted_by_k=tree_acceptance)
    chosen = drive_tree(DraftLength("auto", tree=True), 120, **fast)
    late = [k for k in chosen[10:] if k]
    assert late and len(late) <= 5 and set(late) == {TREE_BUDGET}, chosen


def test_a_tree_sources_first_drafting_round_does_not_price_its_trees():
    # The head's catch-up over a long prompt (0.3 s once) must not switch drafting off at 40 ms.
    slow = dict(plain=0.150, per_node=0.012, accepted_by_k=tree_acceptance, catch_up=0.300)
    chosen = drive_tree(DraftLength("auto", tree=True), 40, **slow)
    assert sum(k > 0 for k in chosen[-30:]) >= 27, chosen


def test_trace_rounds_records_every_round(tiny_model_dir):
    # generate --json --trace-rounds: per round the k chosen, why, the fitted costs and what it measured
    from lambdasplit.client.run import run_generation

    record = run_generation(model=str(tiny_model_dir("llama")), mode="local", prompt="the quick brown fox the quick",
                            max_new_tokens=12, ignore_eos=True, speculate="lookup", trace_rounds=True)
    rounds = record["rounds"]
    assert len(rounds) == record["steps"] and rounds[0]["why"] == "warm-up" and rounds[1]["k"] == 0
    assert sum(r["drafted"] for r in rounds) == record["drafted_positions"]
    assert all(r["round_s"] >= r["draft_s"] >= 0 for r in rounds)
    assert {r["why"] for r in rounds} <= {"warm-up", "model", "probe"}
    assert all({"a", "s", "d", "alpha"} <= set(r) for r in rounds if r["why"] != "warm-up")  # the fitted costs
    assert "rounds" not in run_generation(model=str(tiny_model_dir("llama")), mode="local", prompt="x y z",
                                          max_new_tokens=3, speculate="lookup")
