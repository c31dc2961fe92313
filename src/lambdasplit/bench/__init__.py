"""Benchmarks: every figure in the docs comes from one of these commands.

    llm.py       `bench llm`: the Λ-Split paper's Table I (cloud / split without and with
                 caching / local), measured against a real server process, on any link
    overhead.py  `bench overhead`: split over loopback vs the same split in one process
                 vs local-only, and bytes per token vs 2 x D x bytes per element
    report.py    table writers shared by all benchmarks (rich, md, csv, json)
    commands.py  the `lambdasplit bench ...` sub-commands (`bench diffusion` is
                 lambdasplit.diffusion.bench, imported only when it runs)
"""
