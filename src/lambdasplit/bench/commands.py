"""`lambdasplit bench llm | overhead | diffusion | serve | wan`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lambdasplit.zoo.registry import DEFAULT_LLM


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: Table I (llm), framework overhead, diffusion")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")

    p = which.add_parser("llm", help="the Λ-Split paper's Table I for any model, on an emulated link",
                         description="Every row of Table I (cloud-only, split without/with caching at each split, "
                                     "local-only) against a real server process on loopback.")
    p.add_argument("--model", default=DEFAULT_LLM, help="Hub id, local folder or zoo:NAME (default %(default)s)")
    p.add_argument("--splits", default="1:N-1,4:N-4,8:N-8",
                   help="comma-separated X:Y; N is the model's layer count (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=14,
                   help="prompt length: the prompt text is repeated or cut to exactly this many tokens "
                        "(0 = the text as is; default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=300, help="tokens generated per row, exactly (default %(default)s)")
    p.add_argument("--prompt", help="prompt text (default: the paper's 'What is the difference between AI, ML and DL?')")
    p.add_argument("--link", help="emulated link, e.g. up=81mbit,down=340mbit,delay=40ms, 1000mbit,0ms, "
                                  "or a preset: paper | 5g | wan (default: plain loopback)")
    p.add_argument("--codec", default="fp16", help="hidden states on the wire: fp32, fp16, bf16, int8 (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--configs", default="cloud,split,local", help="rows to run (default %(default)s)")
    p.add_argument("--caches", default="none,kv", help="split rows: without (none) and/or with (kv) caching")
    p.add_argument("--server", metavar="HOST:PORT",
                   help="use this running server (it must host every split, plus --cloud for the cloud row) "
                        "instead of starting one")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process, device and server alike (default %(default)s: the two "
                        "processes share the machine, and spinning intra-op threads that fight for cores made "
                        "SmolLM2 3x slower on a loaded 2-core machine)")
    p.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    p.set_defaults(func=llm_command)

    o = which.add_parser("overhead", help="tokens/s of split over loopback vs in-process split vs local; bytes/token",
                         description="The framework's own cost, for a model (default the bundled SmolLM2, D = 576) and a "
                                     "wider random Llama built from a config (default D = 2048); the output names "
                                     "the machine.")
    o.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    o.add_argument("--split", default="1:N-1", help="default %(default)s")
    o.add_argument("--wide-hidden", type=int, default=2048,
                   help="hidden size of the wider random Llama also measured (0 = skip; default %(default)s)")
    o.add_argument("--wide-layers", type=int, default=6, help="default %(default)s")
    o.add_argument("--new-tokens", type=int, default=64, help="default %(default)s")
    o.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median kept (default %(default)s)")
    o.add_argument("--codec", default="fp16", help="default %(default)s")
    o.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s, see bench llm)")
    o.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json and run.json")
    o.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    o.set_defaults(func=overhead_command)

    s = which.add_parser("serve", help="the batching engine: aggregate tokens/s and latency for N concurrent sessions",
                         description="N lightweight in-process clients replay real prompts' head outputs through "
                                     "the body's engine at once (lambdasplit.bench.serve); one table row per N.")
    s.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    s.add_argument("--split", default="2:28", help="X:Y, the body is layers [X, Y) (default %(default)s)")
    s.add_argument("--clients", default="1,2,4,8,16", help="comma-separated session counts (default %(default)s)")
    s.add_argument("--new-tokens", type=int, default=16, help="tokens per session (default %(default)s)")
    s.add_argument("--max-batch", type=int, default=16, help="rows per batched forward (default %(default)s)")
    s.add_argument("--prefill-chunk", type=int, default=64, help="prefill positions per forward (default %(default)s)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    s.add_argument("--unbatched", action="store_true",
                   help="also run every N with max batch 1 (one step per forward: what batching buys)")
    s.add_argument("--breakdown", action="store_true",
                   help="also profile one decode forward of N rows per N: linear, attention, KV copies, overhead")
    s.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    s.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    s.set_defaults(func=serve_command)

    # The diffusion benchmark lives in lambdasplit.diffusion.bench; its options are parsed
    # only when it runs, so `bench llm` never imports diffusers (nor breaks without it).
    d = which.add_parser("diffusion", help="diffusion split benchmark (options: bench diffusion --help)",
                         add_help=False, prefix_chars="\0")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=diffusion_command)

    pp = which.add_parser("ppidm", help="PPIDM: quality, traffic per layer type, offloaded FLOPs (options: bench ppidm --help)",
                          add_help=False, prefix_chars="\0")
    pp.add_argument("rest", nargs=argparse.REMAINDER)
    pp.set_defaults(func=ppidm_command)
    w = which.add_parser("wan", help="speculative sources vs plain split decoding at several one-way delays",
                         description="tokens/s, tokens per round trip, bytes and device compute per token for each "
                                     "--speculate source against plain split decoding (docs/speculative.md)")
    w.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    w.add_argument("--split", help="X:Y (default 2:N-2)")
    w.add_argument("--sources", default="lookup,lookahead", help="comma-separated --speculate sources besides none "
                   "(lookup, lookahead, draft, eagle, eagle-tree; default %(default)s)")
    w.add_argument("--draft-model", help="for the draft and eagle sources")
    w.add_argument("--draft-tokens", default="auto", help="K or auto (default %(default)s)")
    w.add_argument("--delays", default="5,20,40,80", help="one-way delays in ms (default %(default)s)")
    w.add_argument("--presets", default="wan", help="link presets also run (default %(default)s; '' for none)")
    w.add_argument("--prompts", type=int, default=6, help="how many of the built-in prompts (default %(default)s)")
    w.add_argument("--new-tokens", type=int, default=64, help="at most, per prompt (stops at EOS; default %(default)s)")
    w.add_argument("--codec", default="fp16", help="default %(default)s")
    w.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s)")
    w.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    w.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    w.set_defaults(func=wan_command)


def _command_line() -> str:
    return "lambdasplit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def llm_command(args) -> int:
    from lambdasplit.bench.llm import COLUMNS, run_table, write_chart
    from lambdasplit.bench.report import describe_machine, print_table, write_outputs

    result = run_table(
        model=args.model, splits=args.splits, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        prompt=args.prompt, link=args.link, codec=args.codec, dtype=args.dtype,
        configs=_names(args.configs, {"cloud", "split", "local"}), caches=_names(args.caches, {"kv", "none"}),
        server=args.server, threads=args.threads, progress=not args.json,
    )
    meta = {**result["meta"], "command": _command_line(), "caching_reduction": result["reduction"]}
    title = f"Table I: {args.model}, {meta['prompt_tokens']} -> {args.new_tokens} tokens, link {meta['link']}"
    notes = [
        f"model {args.model}: {meta['num_layers']} layers, D = {meta['hidden_size']}; wire codec {args.codec}, "
        f"compute {args.dtype}; greedy; {meta['eos_rule']}",
        "MB = 10^6 socket bytes (handshake and framing included); times in seconds: local = head + tail + "
        "sampling, cloud = body compute reported by the server, comm = wall - local - cloud",
        *[f"traffic reduction from caching at {r['split']}: {r['measured_pct']:.2f}% measured, "
          f"{r['from_positions_pct']:.2f}% from positions sent" for r in result["reduction"]],
        describe_machine(meta["machine"]),
        f"command: `{meta['command']}`",
    ]
    if args.json:
        print(json.dumps({"rows": result["rows"], "meta": meta}))
    else:
        print_table(result["rows"], COLUMNS, title=title, caption="\n".join(notes[2:-1]))
    if args.out:
        out = write_outputs(args.out, result["rows"], COLUMNS, title=title, meta=meta, notes=notes)
        write_chart(out / "chart.png", result["rows"], title)
        if not args.json:
            print(f"wrote {out}/table.md, table.csv, table.json, run.json, chart.png")
    return 0


def overhead_command(args) -> int:
    from lambdasplit.bench.overhead import COLUMNS, run_overhead
    from lambdasplit.bench.report import describe_machine, print_table, write_outputs

    result = run_overhead(model=args.model, split=args.split, wide_hidden=args.wide_hidden,
                          wide_layers=args.wide_layers, new_tokens=args.new_tokens, repeats=args.repeats,
                          codec=args.codec, threads=args.threads, progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = f"Framework overhead: {args.new_tokens} tokens, codec {args.codec}, median of {args.repeats}"
    notes = ["tokens/s: median over interleaved repeats; bytes/token: steady state, both directions",
             describe_machine(meta["machine"]), f"command: `{meta['command']}`"]
    if args.json:
        print(json.dumps({"rows": result["rows"], "meta": meta}))
    else:
        print_table(result["rows"], COLUMNS, title=title, caption=notes[1])
    if args.out:
        write_outputs(args.out, result["rows"], COLUMNS, title=title, meta=meta, notes=notes)
    return 0


def serve_command(args) -> int:
    from lambdasplit.bench.report import describe_machine, print_table, write_outputs
    from lambdasplit.bench.report import markdown_table
    from lambdasplit.bench.serve import BREAKDOWN_COLUMNS, COLUMNS, run_serve_bench, write_chart
    from lambdasplit.errors import UsageError

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--clients takes comma-separated integers, got {args.clients!r}") from None
    if not clients or min(clients) < 1 or args.new_tokens < 1:
        raise UsageError("--clients needs counts >= 1 and --new-tokens >= 1")
    result = run_serve_bench(model=args.model, split=args.split, clients=clients, new_tokens=args.new_tokens,
                             max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, dtype=args.dtype,
                             threads=args.threads, unbatched=args.unbatched, breakdown=args.breakdown,
                             progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = (f"Serving: {args.model} body {meta['split']}, {args.new_tokens} tokens per session, "
             f"max batch {args.max_batch}, prefill chunk {args.prefill_chunk}")
    notes = [
        "in-process engine, clients replay precomputed head outputs of real prompts (greedy traces); tokens/s = "
        "sessions x tokens / wall time; decode tokens/s: the decode steps after every session's first token, over that time; latency = one decode step, submit to result; TTFT = the prefill step",
        f"prompt tokens per trace: {meta['prompt_tokens']}",
        describe_machine(meta["machine"]) + " (at start)",
        f"command: `{meta['command']}`",
    ]
    breakdown = result["breakdown"]
    breakdown_title = "Where one decode forward of N rows spends its time (torch.profiler; ms)"
    if args.json:
        print(json.dumps({"rows": result["rows"], "meta": meta, "breakdown": breakdown}))
    else:
        print_table(result["rows"], COLUMNS, title=title, caption="\n".join(notes[:3]))
        if breakdown:
            print_table(breakdown, BREAKDOWN_COLUMNS, title=breakdown_title)
    if args.out:
        out = write_outputs(args.out, result["rows"], COLUMNS, title=title, meta=meta, notes=notes)
        write_chart(out / "chart.png", result["rows"], title)
        if breakdown:
            (out / "breakdown.json").write_text(json.dumps(breakdown, indent=1) + "\n")
            with open(out / "table.md", "a") as handle:
                handle.write(f"\n## {breakdown_title}\n\n" + markdown_table(breakdown, BREAKDOWN_COLUMNS))
        if not args.json:
            print(f"wrote {out}/table.md, table.csv, table.json, run.json, chart.png")
def wan_command(args) -> int:
    from lambdasplit.bench.report import describe_machine, print_table, write_outputs
    from lambdasplit.bench.wan import COLUMNS, run_wan, write_chart
    from lambdasplit.speculative.adaptive import parse_draft_tokens

    sources = list(_names(args.sources, {"none", "lookup", "lookahead", "draft", "eagle", "eagle-tree"}))
    result = run_wan(model=args.model, split=args.split, sources=sources, delays=args.delays, presets=args.presets,
                     new_tokens=args.new_tokens, prompts=args.prompts, codec=args.codec, draft_model=args.draft_model,
                     draft_tokens=parse_draft_tokens(args.draft_tokens), threads=args.threads, progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = f"Speculative decoding over WAN links: {args.model}, split {meta['split']}, up to {args.new_tokens} tokens"
    notes = [f"{len(meta['prompts'])} prompts (chat, summarization, code), greedy, codec {args.codec}, "
             f"draft tokens {meta['draft_tokens']}; link delay is one way, rate unlimited unless a preset says",
             "tokens/round trip: tokens committed by the steps after the prompt's, per step; bytes/token: every "
             "socket byte both ways (rejected positions included) per generated token; ids = none: every prompt's "
             "greedy token ids equal plain split decoding's on that link",
             describe_machine(meta["machine"]), f"command: `{meta['command']}`"]
    if args.json:
        print(json.dumps({"rows": result["rows"], "meta": meta, "tree": result.get("tree")}))
    else:
        print_table(result["rows"], COLUMNS, title=title, caption="\n".join(notes[:3]))
    if args.out:
        out = write_outputs(args.out, result["rows"], COLUMNS, title=title, meta=meta, notes=notes)
        write_chart(out / "chart.png", result["rows"], title)
        if result.get("tree"):  # eagle-tree: what verifying the whole tree in one step would add
            (out / "tree.json").write_text(json.dumps(result["tree"], indent=1) + "\n")
            with open(out / "table.md", "a") as handle:
                handle.write("\n## eagle-tree: tokens per round trip if verified as\n\n" + "\n".join(
                    f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result["tree"].items())
                    + "\n")
    return 0


def diffusion_command(args) -> int:
    from lambdasplit.errors import LambdaSplitError

    try:
        from lambdasplit.diffusion import bench as diffusion_bench
    except ImportError as error:
        raise LambdaSplitError(f"the diffusion benchmark is not available: {error}") from None
    parser = argparse.ArgumentParser(prog="lambdasplit bench diffusion")
    diffusion_bench.add_arguments(parser)
    return int(diffusion_bench.run(parser.parse_args(args.rest)) or 0)


def ppidm_command(args) -> int:
    from lambdasplit.diffusion.ppidm import bench as ppidm_bench

    parser = argparse.ArgumentParser(prog="lambdasplit bench ppidm", description=ppidm_bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ppidm_bench.add_arguments(parser)
    return int(ppidm_bench.run(parser.parse_args(args.rest)) or 0)


def _names(text: str, allowed: set[str]) -> tuple[str, ...]:
    from lambdasplit.errors import LambdaSplitError

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise LambdaSplitError(f"expected a comma-separated subset of {', '.join(sorted(allowed))}, got {text!r}")
    return names
