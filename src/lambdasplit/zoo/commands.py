"""`lambdasplit zoo ...`: list the bundled models, measure a model's quality, train the digits model.

    lambdasplit zoo list                                   # default models, sizes, measured figures
    lambdasplit zoo eval --model zoo:smollm2 [--text FILE] # perplexity of any causal LM on any text
    lambdasplit zoo eval --model zoo:digits                # diffusion: delegated to zoo/digits.py
    lambdasplit zoo train digits                           # retrain the shipped digits model
    lambdasplit zoo train smollm2-draft                    # train the EAGLE draft head (speculative decoding)

Heavy modules (torch, transformers, the digits model) are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lambdasplit.errors import LambdaSplitError

SLICE = Path(__file__).parent / "data" / "kjv_slice.txt"


def add_commands(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="bundled default models: list, evaluate, train")
    actions = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="show the default models with sizes and measured quality")
    listing.add_argument("--json", action="store_true", help="print the raw descriptions as JSON")
    listing.set_defaults(func=list_command)

    evaluate = actions.add_parser("eval", help="perplexity of a language model on a text (or a diffusion model's score)")
    evaluate.add_argument("--model", default="zoo:smollm2",
                          help="Hub id, local folder, or zoo:NAME (default zoo:smollm2)")
    evaluate.add_argument("--text", type=Path, default=SLICE,
                          help="UTF-8 text file to score (default: the shipped KJV Genesis slice)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    evaluate.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default 1024)")
    evaluate.add_argument("--stride", type=int, default=512, help="tokens the window advances (default 512)")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON line")
    evaluate.set_defaults(func=eval_command)

    train = actions.add_parser("train", help="train a bundled model from scratch")
    models = train.add_subparsers(dest="train_model", required=True, metavar="MODEL")
    digits_parser = models.add_parser("digits", help="the digits text-to-image diffusion model")
    try:  # its options live with the model; the import stays optional so the rest of the CLI always works
        from lambdasplit.zoo import digits
    except ImportError as error:
        digits_parser.set_defaults(func=lambda args, error=error: _missing_digits(error))
    else:
        digits.add_train_arguments(digits_parser)
        digits_parser.set_defaults(func=digits.train_command)
    draft_parser = models.add_parser("smollm2-draft", help="the EAGLE-style draft head for zoo:smollm2 "
                                     "(--speculate eagle; about an hour on an idle 2-core machine)")
    from lambdasplit.zoo import draft_train

    draft_train.add_train_arguments(draft_parser)


def _missing_digits(error: ImportError) -> int:
    raise LambdaSplitError(f"the digits model is not available: {error}")


def _is_diffusion(model: str) -> bool:
    from lambdasplit.zoo.registry import ZOO

    if model.startswith("zoo:"):
        entry = ZOO.get(model[len("zoo:"):])
        return entry is not None and entry.kind == "diffusion"
    return (Path(model) / "model_index.json").is_file()  # diffusers pipelines have one, LMs do not


def eval_command(args) -> int:
    if _is_diffusion(args.model):
        from lambdasplit.zoo import digits

        return digits.evaluate_command(args)

    from lambdasplit.zoo.perplexity import perplexity

    try:
        text = args.text.read_text(encoding="utf-8")
    except OSError as error:
        raise LambdaSplitError(f"cannot read --text {args.text}: {error.strerror}") from None
    result = perplexity(args.model, text, max_tokens=args.max_tokens, window=args.window, stride=args.stride)
    result["text"] = str(args.text)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {args.text}: perplexity {result['ppl']:.3f} "
              f"({result['tokens']} tokens scored, mean NLL {result['nll']:.4f} nats, "
              f"window {result['window']}, stride {result['stride']}, {result['seconds']:.1f} s)")
    return 0


def _human(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes") and isinstance(value, int):
        return f"{value / 1e6:.1f} MB"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    return str(value)


def list_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from lambdasplit.zoo.registry import ZOO, describe

    descriptions = {}
    for name in ZOO:
        try:
            descriptions[name] = describe(name)
        except ImportError as error:  # a model whose module is missing still gets a row
            descriptions[name] = {"name": name, "kind": ZOO[name].kind, "error": str(error)}
    if args.json:
        print(json.dumps(descriptions, indent=2, default=str))
        return 0

    # The entries describe themselves with different fields, so each gets a field/value table.
    console = Console()
    for name, info in descriptions.items():
        table = Table(title=f"zoo:{name}", title_justify="left", show_header=False, min_width=60)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in info.items():
            table.add_row(key, _human(key, value))
        console.print(table)
    return 0
