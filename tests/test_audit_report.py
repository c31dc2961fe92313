"""Audit reports: the privacy-utility chart plots real attacks only."""

from __future__ import annotations

from lambdasplit.audit.report import best_uplink_attack, defense_chart


def _row(defense, attack, threat, top1, direction="uplink", positions="prompt"):
    return {"split": "2:28", "defense": defense, "direction": direction, "positions": positions, "attack": attack,
            "threat_model": threat, "top1": top1, "top5": top1, "exact_match": 0.0}


def _results():
    rows = []
    for defense, attack_top1 in (("none", 0.9), ("gaussian:sigma=1,clip=1", 0.3), ("gaussian:sigma=9,clip=1", 0.05)):
        rows += [
            _row(defense, "exact-inversion", "public-weights", attack_top1),
            _row(defense, "mlp-inverter", "auxiliary-data", attack_top1 / 2),
            # not attacks: the inverters' vocabulary ceiling (independent of the defense) and the baseline
            _row(defense, "inverter-vocabulary-ceiling", "auxiliary-data", 0.75),
            _row(defense, "unigram-baseline", "baseline", 0.02),
            # eavesdropper figures are shares of characters, not tokens
            _row(defense, "utf8-substrings", "eavesdropper", 0.95),
            _row(defense, "public-tail", "public-weights", 1.0, "downlink", "generated"),
        ]
    return rows


def test_best_uplink_attack_excludes_the_vocabulary_ceiling():
    results = _results()
    assert best_uplink_attack(results, "none", "2:28") == 0.9
    assert best_uplink_attack(results, "gaussian:sigma=1,clip=1", "2:28") == 0.3
    assert best_uplink_attack(results, "gaussian:sigma=9,clip=1", "2:28") == 0.05  # not floored at 0.75
    assert best_uplink_attack(results, "dpquant:bits=4,epsilon=2,clip=1", "2:28") == 0.0


def test_defense_chart_plots_the_attacks_not_the_ceiling(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    plotted = []
    original = Axes.plot

    def record(self, x, y, *args, **kwargs):
        plotted.append(list(y))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    utility = [{"defense": d, "split": "2:28", "greedy_agreement": g, "perplexity": p}
               for d, g, p in (("none", 1.0, 9.0), ("gaussian:sigma=1,clip=1", 0.5, 20.0),
                               ("gaussian:sigma=9,clip=1", 0.0, 900.0))]
    path = defense_chart({"results": _results(), "utility": utility}, tmp_path / "defenses.png")
    assert path.stat().st_size > 1000
    assert [0.3, 0.05] in plotted and [0.9] in plotted
    assert all(value != 0.75 for line in plotted for value in line)
