"""Privacy audit: what an eavesdropper or a curious cloud recovers from a split session.

    capture.py     real sessions over a loopback server; the captured bytes, parsed into frames
    attacks.py     eavesdropper search, exact head inversion, linear probe, logit / tuned lens, public tail
    inverters.py   learned inverters trained on public text (MLP, GRU)
    defenses.py    uplink defenses (clip + Gaussian noise, DP stochastic quantization) and their accounting
    llm.py         `audit llm`: sessions at several split depths, every attack, defenses with utility
    diffusion.py   `audit diffusion`: replay, x0 previews, U-Net completion, prompt recovery
    report.py      report.md / report.json / PNG charts / rich tables
    commands.py    the CLI
    data/          public-domain text (KJV) for the attacker and held-out utility, invented test prompts

docs/privacy.md states the threat models and the measured figures.
"""
