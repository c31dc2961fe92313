"""`lambdasplit generate` and `lambdasplit demo`."""

from __future__ import annotations

import json
import sys

from lambdasplit.speculative.sources import SOURCES
from lambdasplit.zoo.registry import DEFAULT_LLM


# Imported when a command runs, not when the parser is built: usage errors answer before torch loads.
def Sampling(**options):  # noqa: N802 (stands for the class)
    from lambdasplit.client.generation import Sampling

    return Sampling(**options)


def run_generation(**options) -> dict:
    from lambdasplit.client.run import run_generation

    return run_generation(**options)


def add_token_options(p, what: str = "the server") -> None:
    """--token-file FILE or --token TOKEN (warned about: the process list shows it); env LAMBDASPLIT_TOKEN.

    Both end in `args.token`, read while parsing, so every command uses it unchanged."""
    import argparse
    import os

    class TokenFile(argparse.Action):
        def __call__(self, parser, namespace, path, option_string=None):
            try:
                with open(path, encoding="utf-8") as file:
                    token = file.readline().strip()
            except OSError as error:
                parser.exit(2, f"lambdasplit: error: cannot read --token-file {path}: {error.strerror}\n")
            if not token:
                parser.exit(2, f"lambdasplit: error: --token-file {path} is empty\n")
            namespace.token = token

    class TokenOnCommandLine(argparse.Action):
        def __call__(self, parser, namespace, token, option_string=None):
            print("lambdasplit: warning: --token is visible to every local user in the process list; "
                  "use --token-file or LAMBDASPLIT_TOKEN", file=sys.stderr, flush=True)
            namespace.token = token

    group = p.add_mutually_exclusive_group()
    group.add_argument("--token-file", action=TokenFile, dest="token", metavar="FILE",
                       default=os.environ.get("LAMBDASPLIT_TOKEN"),
                       help=f"file whose first line is the bearer token for {what} (env LAMBDASPLIT_TOKEN)")
    group.add_argument("--token", action=TokenOnCommandLine, dest="token", default=argparse.SUPPRESS,
                       help="the bearer token itself; visible to every local user in the process list, "
                            "prefer --token-file")


def add_session_options(p) -> None:
    """Options every client command shares: auth, TLS, link emulation."""
    import os

    add_token_options(p)
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
    p.add_argument("--mode", choices=["split", "local", "cloud", "shared"], default="split",
                   help="shared: every linear layer on additive secret shares over two servers (--servers A,B; "
                        "docs/privacy.md, Secret-shared mode)")
    p.add_argument("--split", metavar="X:Y", help="head holds layers [0, X), tail [Y, N)")
    p.add_argument("--server", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the body server; in split mode a list: on failure the next one takes over by replay")
    p.add_argument("--max-failovers", type=int, default=None,
                   help="split mode: server switches allowed in one generation (default: twice around the list)")
    p.add_argument("--verify", action="store_true",
                   help="split mode: send every step to the first two --server and stop if their answers differ")
    p.add_argument("--servers", metavar="A,B", help="--mode shared: the share-0 and share-1 servers, in that order")
    p.add_argument("--shares-lm-head", choices=["shared", "device"], default="shared",
                   help="--mode shared: the LM head on shares too (as the servers were started) or on the device")
    p.add_argument("--shares-merge", choices=["auto", "on", "off"], default="auto",
                   help="--mode shared: the merged layers, 2 requests per decoder layer (as the servers were started)")
    p.add_argument("--token2", help="--mode shared: server B's own bearer token (default: --token)")
    p.add_argument("--tls-ca2", help="--mode shared: CA file for server B (default: --tls-ca)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache", choices=["kv", "none"], default="kv", help="none: resend and recompute everything each step")
    p.add_argument("--codec", default="fp32",
                   help="hidden states on the wire, both directions: fp32, fp16, bf16, int8 .. int2 (per-token affine), "
                        "intN+ts (threshold split: outliers exact), adaptiveK (error ~ sigma/2^K, Rice-coded); "
                        "lossy ones change the output, a warning says so; see `bench codecs`")
    p.add_argument("--refine-gap", default="auto",
                   help="near-tie guard of a lossy --codec: a step whose top-2 logit gap is below this asks the "
                        "server for that position again in fp16 (one more round trip); 0 = off; auto: 0.02 for "
                        "lossy codecs, off when speculating (docs/protocol.md REFINE)")
    p.add_argument("--prefill-codec", default="auto",
                   help="calK codecs: the prompt's step at this finer calK (its KV entries are read by every later "
                        "token); auto: cal8.5 below it; none: the codec itself")
    p.add_argument("--device-weights", default="float", choices=["float", "int8"],
                   help="int8: the head's and tail's weights int8 weight-only on the device (not exact; "
                        "`bench codecs --device-weights int8` measures the cost)")
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
    p.add_argument("--speculate", default="none", choices=SOURCES,
                   help="draft tokens on the device and verify several per round trip (docs/speculative.md)")
    p.add_argument("--draft-model", help="--speculate draft: a causal LM sharing the tokenizer; eagle: a draft head folder")
    p.add_argument("--draft-tokens", default="auto", help="tokens drafted per step, or auto (default: chosen from "
                   "the measured acceptance and step costs)")
    p.add_argument("--trace-rounds", action="store_true", help="--json adds `rounds`: per speculative round the "
                   "draft length chosen, why, and the costs --draft-tokens auto fitted")
    add_session_options(p)
    p.set_defaults(func=generate_command)

    d = subparsers.add_parser("demo", help="split generation with the bundled model over a loopback server")
    d.add_argument("--model", default=DEFAULT_LLM)
    d.add_argument("--split", default=None, help="default: 2:N-2")
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.set_defaults(func=demo_command)


def parse_refine_gap(text: str) -> float | str:
    """`--refine-gap`: "auto" or a number >= 0; else a one-line usage error."""
    from lambdasplit.errors import UsageError

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"--refine-gap must be auto or a number >= 0, got {text!r}")
    return value


def lossy_codec_warning(codec: str, dtype: str) -> str | None:
    """The warning for a wire codec that can change the split's output, or None when it keeps it exact
    (fp32; bf16 / fp16 with the same --dtype). Raises on an unknown codec."""
    from lambdasplit.wire.codecs import get_codec

    chosen = get_codec(codec, default_granularity="token")
    if chosen.lossless or (chosen.name, dtype) in (("bf16", "bfloat16"), ("fp16", "float16")):
        return None
    bits = chosen.bits / 4 if chosen.kind == 6 else chosen.bits  # calK: the header holds K in quarter bits
    return (f"lambdasplit: warning: --codec {codec} rounds the hidden states on the wire to {bits:g} bits, so the "
            f"split's output can differ from the unsplit model's (exact: fp32, or bf16 / fp16 with the same --dtype)")


def generate_command(args) -> int:
    refine_gap = parse_refine_gap(args.refine_gap)  # before anything loads
    if args.mode == "split":
        warning = lossy_codec_warning(args.codec, args.dtype)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.mode == "shared":
        return _shared_command(args, sampling, stream)

    record = run_generation(
        device=_device(args), model=args.model, mode=args.mode, prompt=args.prompt, max_new_tokens=args.max_new_tokens, split=args.split,
        server=args.server, cache=args.cache, codec=args.codec, sampling=sampling, dtype=args.dtype,
        token=args.token, tls_ca=args.tls_ca, link=args.link, ignore_eos=args.ignore_eos,
        chat=False if args.no_chat else None, on_text=None if args.json else stream,
        defense=_defense(args.defense, args.defense_seed, args.mode),
        timeout=args.timeout, insecure=args.insecure,
        speculate=args.speculate, draft_model=args.draft_model, draft_tokens=_draft_tokens(args.draft_tokens),
        verify=args.verify, max_failovers=args.max_failovers, trace_rounds=args.trace_rounds,
        refine_gap=refine_gap, prefill_codec=args.prefill_codec,
    )
    if args.json:
        print(json.dumps(record))
    else:
        print()
        print(f"[{record['mode']}: {record['new_tokens']} tokens in {record['seconds']:.2f} s, "
              f"{record['bytes_up']} B up, {record['bytes_down']} B down, {plural(record['round_trips'], 'round trip')}]",
              file=sys.stderr)
    return 0


def _shared_command(args, sampling, stream) -> int:
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.shares.run import run_shared

    if args.server or args.split or args.defense not in (None, "", "none") or args.codec != "fp32" \
            or args.dtype != "float32":
        raise LambdaSplitError("--mode shared takes --servers A,B (not --server, --split, --defense, --codec or "
                               "--dtype: shares are ring elements, computed in float32 on the device)")
    record = run_shared(
        model=args.model, prompt=args.prompt, servers=args.servers, max_new_tokens=args.max_new_tokens,
        sampling=sampling, lm_head=args.shares_lm_head, merge=args.shares_merge,
        token=[args.token, args.token2 or args.token],
        tls_ca=[args.tls_ca, args.tls_ca2 or args.tls_ca], link=args.link, ignore_eos=args.ignore_eos,
        chat=False if args.no_chat else None, on_text=None if args.json else stream, timeout=args.timeout,
        insecure=args.insecure, speculate=args.speculate, draft_model=args.draft_model,
        draft_tokens=_draft_tokens(args.draft_tokens), cache=args.cache,
    )
    if args.json:
        print(json.dumps(record))
    else:
        print()
        up, down = record["bytes_up_per_server"], record["bytes_down_per_server"]
        print(f"[shared: {record['new_tokens']} tokens in {record['seconds']:.2f} s, server A {up[0]} B up / "
              f"{down[0]} B down, server B {up[1]} B up / {down[1]} B down, "
              f"{plural(record['round_trips'], 'round trip')} to each]", file=sys.stderr)
    return 0
def _device(args):
    """The device model with --device-weights applied, or None (run_generation loads it)."""
    if getattr(args, "device_weights", "float") == "float":
        return None
    from lambdasplit.errors import LambdaSplitError

    if args.mode == "cloud":
        raise LambdaSplitError("--device-weights acts on the device's head and tail; cloud mode runs none")
    from lambdasplit.client.device import DeviceModel
    from lambdasplit.llm.lowbit import apply_device_weights

    device = DeviceModel.load(args.model, args.split if args.mode == "split" else None, args.dtype)
    apply_device_weights(device, args.device_weights)
    return device


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
