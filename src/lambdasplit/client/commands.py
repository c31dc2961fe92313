"""`lambdasplit generate` and `lambdasplit demo`."""

from __future__ import annotations

import json
import sys

from lambdasplit.zoo.registry import DEFAULT_LLM


# Imported when a command runs, not when the parser is built: usage errors answer before torch loads.
def Sampling(**options):  # noqa: N802 (stands for the class)
    from lambdasplit.client.generation import Sampling

    return Sampling(**options)


def run_generation(**options) -> dict:
    from lambdasplit.client.run import run_generation

    return run_generation(**options)


def add_session_options(p) -> None:
    """Options every client command shares: auth, TLS, link emulation."""
    import os

    p.add_argument("--token", default=os.environ.get("LAMBDASPLIT_TOKEN"), help="bearer token (env LAMBDASPLIT_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("LAMBDASPLIT_TLS_CA"),
                   help="CA file to verify the server's TLS certificate (env LAMBDASPLIT_TLS_CA); enables TLS")
    p.add_argument("--link", help="emulate a link, e.g. up=81mbit,down=340mbit,delay=40ms or paper|5g|wan")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the server to connect or answer (default %(default)s)")
    p.add_argument("--insecure", action="store_true",
                   help="allow sending the token without TLS to a non-loopback server")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text (split, local or cloud mode)")
    p.add_argument("--model", default=DEFAULT_LLM, help="Hub id, local folder or zoo:NAME (default %(default)s)")
    p.add_argument("--mode", choices=["split", "local", "cloud"], default="split")
    p.add_argument("--split", metavar="X:Y", help="head holds layers [0, X), tail [Y, N)")
    p.add_argument("--server", metavar="HOST:PORT")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache", choices=["kv", "none"], default="kv", help="none: resend and recompute everything each step")
    p.add_argument("--codec", default="fp32", help="fp32, fp16, bf16 or int8 (per-token affine)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="never stop at EOS (EOS logits masked, like min_new_tokens)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.add_argument("--defense", default="none", help="split mode: none | gaussian:sigma=S,clip=C | "
                   "dpquant:bits=B,epsilon=E,clip=C on the uplink (see docs/privacy.md); needs --cache kv")
    p.add_argument("--defense-seed", type=int, default=None,
                   help="for experiments only: makes the defense noise reproducible and so removable "
                        "(default: a fresh seed from secrets.randbits(63))")
    p.add_argument("--speculate", default="none", choices=["none", "lookup", "lookahead", "draft", "eagle", "eagle-tree"],
                   help="draft tokens on the device and verify several per round trip (docs/speculative.md)")
    p.add_argument("--draft-model", help="--speculate draft: a causal LM sharing the tokenizer; eagle: a draft head folder")
    p.add_argument("--draft-tokens", default="auto", help="tokens drafted per step, or auto (default: chosen from "
                   "the measured acceptance and step costs)")
    add_session_options(p)
    p.set_defaults(func=generate_command)

    d = subparsers.add_parser("demo", help="split generation with the bundled model over a loopback server")
    d.add_argument("--model", default=DEFAULT_LLM)
    d.add_argument("--split", default=None, help="default: 2:N-2")
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.set_defaults(func=demo_command)


def generate_command(args) -> int:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    record = run_generation(
        model=args.model, mode=args.mode, prompt=args.prompt, max_new_tokens=args.max_new_tokens, split=args.split,
        server=args.server, cache=args.cache, codec=args.codec, sampling=sampling, dtype=args.dtype,
        token=args.token, tls_ca=args.tls_ca, link=args.link, ignore_eos=args.ignore_eos,
        chat=False if args.no_chat else None, on_text=None if args.json else stream,
        defense=_defense(args.defense, args.defense_seed, args.mode),
        timeout=args.timeout, insecure=args.insecure,
        speculate=args.speculate, draft_model=args.draft_model, draft_tokens=_draft_tokens(args.draft_tokens),
    )
    if args.json:
        print(json.dumps(record))
    else:
        print()
        print(f"[{record['mode']}: {record['new_tokens']} tokens in {record['seconds']:.2f} s, "
              f"{record['bytes_up']} B up, {record['bytes_down']} B down, {plural(record['round_trips'], 'round trip')}]",
              file=sys.stderr)
    return 0


def _draft_tokens(value: str):
    from lambdasplit.speculative.adaptive import parse_draft_tokens

    return parse_draft_tokens(value)


def _defense(spec: str, seed: int | None, mode: str):
    """The uplink defense; its noise seed comes from `secrets` unless --defense-seed is given (never --seed)."""
    if spec in (None, "", "none"):
        return None
    from lambdasplit.audit.defenses import parse_defense
    from lambdasplit.errors import LambdaSplitError

    if mode != "split":  # local mode sends nothing; cloud mode sends the text itself
        raise LambdaSplitError(f"--defense acts on the hidden states of split mode; it does nothing in {mode} mode")

    return parse_defense(spec, seed=seed)


def demo_command(args) -> int:
    from lambdasplit.client.demo import run_demo

    return run_demo(args)


def plural(count: int, noun: str) -> str:
    """'1 round trip', '2 round trips'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
