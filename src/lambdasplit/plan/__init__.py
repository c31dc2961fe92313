"""The planner (`lambdasplit plan`): choose split, codec and drafting from measured profiles.

    profile.py   what is measured: per-layer compute on the device (in this process), the
                 server's compute per step (from the RESULT frames of real sessions), the
                 per-exchange protocol cost and bytes per codec, codec agreement, draft
                 acceptance per source; cached under $LAMBDASPLIT_CACHE/plan/
    predict.py   the cost model: tokens/s, time to first token, device memory, bytes per
                 token for each (split, codec, speculation source) on a given link; leakage
                 per split from an audit report
    pareto.py    the Pareto front (latency, traffic, leakage, device memory) and the
                 recommendation under the constraints
    commands.py  the CLI: profile, predict, print the front, measure the recommendation and a
                 few other points over a real loopback server, report predicted vs measured

docs/planner.md describes the model and what it achieves.
"""
