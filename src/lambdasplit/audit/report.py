"""Audit reports: report.json (every figure), report.md (tables), PNG charts, a rich console table."""

from __future__ import annotations

import json
import math
from pathlib import Path

ATTACK_ORDER = ["utf8-substrings", "token-id-runs", "exact-inversion", "linear-probe", "mlp-inverter",
                "gru-inverter", "inverter-vocabulary-ceiling", "logit-lens", "tuned-lens", "public-tail", "unigram-baseline"]
# Rows that are reference levels, not attacks: an upper bound of the inverters and a guessing baseline.
NOT_ATTACKS = {"inverter-vocabulary-ceiling", "unigram-baseline"}


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _split_key(split: str) -> tuple:
    return (0, 0) if split == "cloud" else tuple(int(v) for v in split.split(":"))


def _eps(accounting: dict) -> str:
    value = accounting.get("epsilon_per_vector")
    if isinstance(value, (int, float)):
        return "∞ (no guarantee)" if math.isinf(value) else f"{value:.3g} per vector (δ={accounting.get('delta')})"
    per = accounting.get("epsilon_per_coordinate")
    return f"{per:g} per coordinate (pure), D×{per:g} per vector" if per is not None else "—"


def recovery_table(results: list[dict], defense: str = "none") -> tuple[list[str], list[list[str]]]:
    """Rows: direction / positions / attack; columns: each split, `top1 / top5 / exact`."""
    rows = [r for r in results if r["defense"] == defense]
    splits = sorted({r["split"] for r in rows}, key=_split_key)
    header = ["direction", "positions", "attack", "threat model"] + splits
    index = {(r["direction"], r["positions"], r["attack"], r["split"]): r for r in rows}
    lines = []
    for direction in ("uplink", "downlink"):
        for positions in ("prompt", "generated"):
            for attack in ATTACK_ORDER:
                cells = [index.get((direction, positions, attack, s)) for s in splits]
                if not any(cells):
                    continue
                threat = next(c for c in cells if c)["threat_model"]
                lines.append([direction, positions, attack, threat] + [
                    f"{_pct(c['top1'])} / {_pct(c['top5'])} / {_pct(c['exact_match'])}" if c else "" for c in cells])
    return header, lines


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def defense_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["defense", "DP accounting", "greedy agreement", "perplexity (change)", "exact inversion (prompt)",
              "MLP (prompt)", "GRU (prompt)", "logit lens (generated)"]
    lines = []
    results = report["results"]
    for u in report.get("utility", []):
        def top1(attack, direction="uplink", positions="prompt"):
            r = next((r for r in results if r["defense"] == u["defense"] and r["split"] == u["split"]
                      and r["attack"] == attack and r["direction"] == direction and r["positions"] == positions), None)
            return _pct(r["top1"]) if r else "—"

        lines.append([u["defense"], _eps(u["accounting"]), _pct(u["greedy_agreement"]),
                      f"{u['perplexity']:.2f} ({100 * u['perplexity_change']:+.1f}%)", top1("exact-inversion"),
                      top1("mlp-inverter"), top1("gru-inverter"), top1("logit-lens", "downlink", "generated")])
    return header, lines


def write_report(report: dict, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"command": command, **report}, indent=1, default=str))
    charts = [p for p in (recovery_chart(report, out / "recovery.png"), defense_chart(report, out / "defenses.png")) if p]
    meta = report["meta"]
    text = [f"# Privacy audit: {meta['model']}", "",
            f"Command: `{command}`", "",
            f"Machine: {meta.get('machine')}; wall time {meta.get('seconds')} s.", "",
            f"{meta['prompts']} prompts (audit/data/prompts.json), {meta['max_new_tokens']} greedy tokens each, "
            f"codec {meta['codec']}, TLS off (the eavesdropper's worst case). Learned inverters trained on "
            f"{meta.get('training_positions')} positions of {meta.get('training_text')}; output vocabulary "
            f"{meta.get('inverter_vocab')} token ids (those in the text plus the 4096 lowest ids).", "",
            "Each cell: top-1 / top-5 token recovery / exact match of the whole span of a session. "
            "Prompt positions = the user's own text (the chat template is public and not counted). "
            "Eavesdropper rows: fraction of characters inside a visible UTF-8 substring of ≥ 4 characters, "
            "or of 3-token id runs found as int32/int64.", ""]
    header, lines = recovery_table(report["results"])
    text += ["## Recovery without defense", "", _markdown_table(header, lines), ""]
    if report.get("utility"):
        header, lines = defense_table(report)
        text += ["## Defenses: privacy and utility", "", _markdown_table(header, lines), ""]
        notes = meta.get("defenses") or {}
        if notes:
            text += [f"Noise seed: {notes['noise_seed']}. Exact-inversion sweep budget under defenses: "
                     f"{notes['exact_inversion_sweep_budget_s']} s ({notes['note']}).", ""]
    for name, value in (meta.get("exact_inversion") or {}).items():
        text.append(f"- exact inversion at {name}: {value['full_vocabulary_sweeps']} full-vocabulary sweeps "
                    f"({value['sweep_seconds']} s)")
    text += [""] + [f"![{p.stem}]({p.name})" for p in charts]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return [out / "report.json", out / "report.md", *charts]


def recovery_chart(report: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["defense"] == "none" and r["split"] != "cloud"]
    if not rows:
        return None
    panels = [("uplink", "prompt"), ("uplink", "generated"), ("downlink", "generated")]
    colors = {attack: plt.get_cmap("tab10")(i % 10) for i, attack in enumerate(ATTACK_ORDER)}  # one colour per attack
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), sharey=True)
    handles = {}
    for ax, (direction, positions) in zip(axes, panels):
        for attack in ATTACK_ORDER:
            points = sorted(((_split_key(r["split"])[0], r["top1"]) for r in rows if r["attack"] == attack
                             and r["direction"] == direction and r["positions"] == positions))
            if points:
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[attack],
                                  linestyle="--" if attack in ("unigram-baseline", "inverter-vocabulary-ceiling") else "-")
                handles[attack] = line
        ax.set_title(f"{direction}, {positions} positions")
        ax.set_xlabel("head depth X (tail depth X)")
        ax.set_xscale("log", base=2)
        depths = sorted({_split_key(r["split"])[0] for r in rows})
        ax.set_xticks(depths, labels=[str(d) for d in depths])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 token recovery")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=6, fontsize=8)
    fig.subplots_adjust(bottom=0.28)
    fig.suptitle(f"{report['meta']['model']}: what a captured session gives away ({report['meta'].get('machine', '')})",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_uplink_attack(results: list[dict], defense: str, split: str) -> float:
    """Best top-1 prompt-token recovery by a real attack on the uplink (0 if none).

    Reference rows (NOT_ATTACKS) are left out, and so are the eavesdropper rows, whose
    figure is a share of characters, not of tokens.
    """
    values = [r["top1"] for r in results if r["defense"] == defense and r["split"] == split
              and r["direction"] == "uplink" and r["positions"] == "prompt" and r["attack"] not in NOT_ATTACKS
              and r["threat_model"] not in ("baseline", "eavesdropper")]
    return max(values) if values else 0.0


def defense_chart(report: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utility = report.get("utility") or []
    if len(utility) < 2:
        return None
    results = report["results"]

    def best_uplink(defense, split):
        return best_uplink_attack(results, defense, split)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family in ("none", "gaussian", "dpquant"):
        points = [u for u in utility if u["defense"].split(":")[0] == family]
        if not points:
            continue
        axes[0].plot([u["greedy_agreement"] for u in points], [best_uplink(u["defense"], u["split"]) for u in points],
                     marker="o", label=family)
        axes[1].plot([u["perplexity"] for u in points], [best_uplink(u["defense"], u["split"]) for u in points],
                     marker="o", label=family)
    axes[0].set_xlabel("greedy agreement with the undefended output")
    axes[1].set_xlabel("perplexity on held-out text")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("best attack, top-1 prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"privacy-utility of uplink defenses at {utility[0]['split']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(Console(stderr=True).width, 150))
    header, lines = recovery_table(report["results"])
    table = Table(title="token recovery without defense: top-1 / top-5 / exact", show_lines=False)
    for name in header:
        table.add_column(name)
    for line in lines:
        table.add_row(*line)
    console.print(table)
    if report.get("utility"):
        header, lines = defense_table(report)
        table = Table(title="defenses")
        for name in header:
            table.add_column(name)
        for line in lines:
            table.add_row(*line)
        console.print(table)
