"""`lambdasplit check`: verify that a split reproduces the unsplit model before trusting it."""

from __future__ import annotations

import json
import sys


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("check", help="verify that splitting a model reproduces the unsplit model")
    p.add_argument("--model", required=True, help="Hub id, local folder or zoo:NAME")
    p.add_argument("--split", action="append", metavar="X:Y",
                   help="split to check (repeat; default: 0:N/2, N/3:2N/3, N/2:N/2 and N/2:N)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-weights", action="store_true",
                   help="check the config with seeded random weights (no weights needed, only config.json)")
    p.add_argument("--as-family", metavar="ADAPTER",
                   help="try an existing adapter (e.g. llama) on a family lambdasplit does not know")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per input")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids (and random weights)")
    p.add_argument("--atol", type=float, help="tolerance on logits (default 1e-4 in float32, 0 in half precision)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.set_defaults(func=check_command)


def check_command(args) -> int:
    from lambdasplit.llm.check import run_check

    report = run_check(args.model, args.split, args.dtype, random_weights=args.random_weights,
                       as_family=args.as_family, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                       seed=args.seed, atol=args.atol)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0 if report["exact"] else 1


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']}: {report['model_type']} through the {report['adapter']} adapter, "
                        f"{report['layers']} layers, {report['dtype']} (tolerance {report['tolerance']:g})")
    for column in ("split", "inputs", "max |Δ logit|", "first diverging token", "verdict"):
        table.add_column(column, justify="right" if column.startswith(("max", "first")) else "left")
    for r in report["results"]:
        diverging = "none" if r["first_diverging_token"] is None else f"{r['first_diverging_token']} of {r['new_tokens']}"
        table.add_row(r["split"], r["inputs"], f"{r['max_logit_diff']:.3g}", diverging,
                      "exact" if r["exact"] else "[bold red]NOT EXACT[/]")
    console = Console(file=sys.stdout, width=max(100, Console().width))
    console.print(table)
    console.print("exact: the split reproduces this model" if report["exact"]
                  else "[bold red]not exact: do not trust this split[/]")
    if report.get("recorded"):
        console.print(f"recorded in {report['recorded']}: serve, generate and gateway now accept "
                      f"{report['model_type']} models of this architecture through the {report['adapter']} adapter")
