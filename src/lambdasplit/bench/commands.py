"""`lambdasplit bench llm | overhead | diffusion | serve | redundancy | wan`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lambdasplit.speculative.sources import SOURCES
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
    s.add_argument("--process-clients", metavar="N,...",
                   help="also run N real `generate` client processes at once against a `serve` process "
                        "(e.g. 1,2,4; lambdasplit.bench.serve_processes), written to processes.md/json")
    s.add_argument("--process-modes", default="split,cloud", help="modes of the process rows (default %(default)s)")
    s.add_argument("--only-processes", action="store_true", help="skip the in-process engine rows")
    s.set_defaults(func=serve_command)

    r = which.add_parser("redundancy", help="what --verify and a failover by replay cost, against real servers",
                         description="One greedy split generation three ways against `lambdasplit serve` processes: "
                                     "one server, --verify over two, and a failover after the first server is "
                                     "killed mid-generation (lambdasplit.bench.redundancy).")
    r.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    r.add_argument("--split", default="2:28", help="default %(default)s")
    r.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    r.add_argument("--new-tokens", type=int, default=32, help="default %(default)s")
    r.add_argument("--kill-after", type=int, default=16, help="tokens before the first server is killed "
                   "(default %(default)s)")
    r.add_argument("--codec", default="fp32", help="default %(default)s")
    r.add_argument("--repeats", type=int, default=3, help="runs of each row, the median kept (default %(default)s)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s)")
    r.add_argument("--link", help="emulated link for every session, e.g. wan or delay=40ms (default: loopback as is)")
    r.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    r.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    r.set_defaults(func=redundancy_command)
    # Scale-out (ops): aggregate tokens/s through `serve --ray` with 1, 2, ... replicas (bench/replicas.py).
    rp = which.add_parser("replicas", help="aggregate tokens/s through `serve --ray` with 1, 2, ... body replicas",
                          description="Real `serve --ray --replicas R` processes; N client threads replay real "
                                      "prompts' head outputs through the router (lambdasplit.bench.replicas).")
    rp.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    rp.add_argument("--split", default="2:28", help="X:Y, the body is layers [X, Y) (default %(default)s)")
    rp.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default %(default)s)")
    rp.add_argument("--clients", default="1,2,4,8", help="comma-separated session counts (default %(default)s)")
    rp.add_argument("--new-tokens", type=int, default=16, help="tokens per session (default %(default)s)")
    rp.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per replica")
    rp.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    rp.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    rp.set_defaults(func=replicas_command)

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
    sh = which.add_parser("shared", help="secret-shared mode: tok/s, round trips and bytes per server, device CPU "
                                         "vs local (options: bench shared --help)", add_help=False, prefix_chars="\0")
    sh.add_argument("rest", nargs=argparse.REMAINDER)
    sh.set_defaults(func=shared_command)
    w = which.add_parser("wan", help="speculative sources vs plain split decoding at several one-way delays",
                         description="tokens/s, tokens per round trip, bytes and device compute per token for each "
                                     "--speculate source against plain split decoding (docs/speculative.md)")
    w.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s")
    w.add_argument("--split", help="X:Y (default 2:N-2)")
    w.add_argument("--sources", default="lookup,lookahead", help="comma-separated --speculate sources besides none "
                   "(lookup, lookahead, draft, eagle, eagle-tree, eagle+lookup; default %(default)s)")
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
    add_codecs_command(which)


def add_codecs_command(which) -> None:
    """`bench codecs` (bench/codecs.py): agreement, perplexity and bytes per token of wire codecs."""
    # bench/codecs.py's DEFAULT_CODECS / DEFAULT_SPLITS, spelled out: importing it loads torch,
    # and a usage error must not wait for that (tests/test_usage_errors.py)
    DEFAULT_CODECS, DEFAULT_SPLITS = "int8,int8+ts,int8+ts+z,adaptive7,adaptive,cal", "1:29,2:28,4:26,8:22"

    c = which.add_parser("codecs", help="wire codecs: greedy agreement with fp32, perplexity change, bytes per token",
                         description="Each codec on the uplink, the downlink and both, at each split, in process "
                                     "through the wire's encode/decode (lambdasplit.bench.codecs).")
    c.add_argument("--model", default=DEFAULT_LLM, help="Hub id, folder, zoo:NAME, or planted:FAMILY (a random model "
                   "of that family built from a config, with planted outlier channels; default %(default)s)")
    c.add_argument("--splits", default=DEFAULT_SPLITS, help="comma-separated X:Y, N = layer count (default %(default)s)")
    c.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec names (default %(default)s)")
    c.add_argument("--directions", default="up,down,both", help="coded directions (default %(default)s)")
    c.add_argument("--prompts", type=int, default=5, help="chat prompts from audit/data/prompts.json (default %(default)s)")
    c.add_argument("--new-tokens", type=int, default=60, help="greedy tokens per prompt, EOS masked (default %(default)s)")
    c.add_argument("--heldout-tokens", type=int, default=256, help="held-out text for perplexity (default %(default)s)")
    c.add_argument("--device-weights", default="", help="also rows with the device's weights in these modes, e.g. int8")
    c.add_argument("--refine-gap", default="auto", help="the near-tie guard of a coded downlink, as `generate "
                   "--refine-gap` (auto: 0.02 for lossy codecs; 0: off)")
    c.add_argument("--prefill-codec", default="auto", help="the prompt's step of a calK codec, as `generate "
                   "--prefill-codec` (auto: cal8.5 for calK below it; none: the codec itself)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    c.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    c.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    c.set_defaults(func=codecs_command)


def _partial_rows(out: str | None):
    """DIR/rows.partial.jsonl: rows as they are measured, so a long run interrupted keeps what it did."""
    if not out:
        return None
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out) / "rows.partial.jsonl"


def codecs_command(args) -> int:
    import torch

    from lambdasplit.bench.codecs import COLUMNS, DIRECTIONS, default_prompts, resolve_model, run_codecs_bench, write_chart
    from lambdasplit.client.commands import parse_refine_gap
    from lambdasplit.bench.llm import resolve_splits
    from lambdasplit.bench.report import describe_machine, report
    from lambdasplit.errors import UsageError
    from lambdasplit.llm.checkpoint import Checkpoint
    from lambdasplit.wire.codecs import get_codec

    torch.set_num_threads(args.threads)
    refine_gap = parse_refine_gap(args.refine_gap)
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise UsageError(f"--directions takes a comma-separated subset of {', '.join(DIRECTIONS)}")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not codecs or args.prompts < 1 or args.new_tokens < 1:
        raise UsageError("--codecs needs at least one codec, --prompts and --new-tokens at least 1")
    for codec in codecs:
        get_codec(codec)  # a bad name is refused before any model loads
    prompts = default_prompts(args.prompts)
    if len(prompts) < args.prompts:
        raise UsageError(f"--prompts {args.prompts}: audit/data/prompts.json has {len(prompts)} prompts")
    model = resolve_model(args.model)
    splits = resolve_splits(args.splits, Checkpoint(model).config.num_hidden_layers)
    weights = [w.strip() for w in args.device_weights.split(",") if w.strip()]
    result = run_codecs_bench(model=model, splits=splits, codecs=codecs, directions=directions,
                              prompts=prompts, new_tokens=args.new_tokens,
                              heldout_tokens=args.heldout_tokens, device_weights=weights, progress=not args.json,
                              partial=_partial_rows(args.out), refine_gap=refine_gap,
                              prefill_codec=args.prefill_codec)
    for row in result["rows"]:
        row["model"] = args.model  # its name, not the cache folder it resolved to
    meta = {**result["meta"], "model": args.model, "command": _command_line()}
    title = (f"Wire codecs: {args.model}, {len(meta['prompts'])} chat prompts x {args.new_tokens} greedy tokens, "
             f"agreement with fp32")
    notes = [
        "agreement: generated tokens equal to fp32's position by position; before 1st diff: tokens before the first "
        "difference; flips / 1k: teacher-forced (prompt + fp32 reference in one forward), positions whose greedy "
        "choice the codec changes, guard included, per 1000 tokens (each counted once, not the rest of its prompt); "
        "Δ ppl: perplexity change on held-out text against fp32; B/token: blob bytes per decode step in "
        "each coded direction, refinements included; of fp16: coded bytes / fp16 bytes for the same tensors; refined: "
        "decode steps whose last row came again, finer (REFINE: a calK refinement, else fp16; top-2 logit gap below "
        "--refine-gap); prompt at: the calK bound "
        "of the prompt's step (--prefill-codec), prompt B/position its bytes per position, both coded directions",
        describe_machine(meta["machine"]),
        f"command: `{meta['command']}`",
    ]
    report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption="\n".join(notes[:2]),
           json_mode=args.json, out_dir=args.out, chart=write_chart)
    return 0


def _command_line() -> str:
    return "lambdasplit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def llm_command(args) -> int:
    from lambdasplit.bench.llm import COLUMNS, run_table, write_chart
    from lambdasplit.bench.report import describe_machine, report

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
    report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption="\n".join(notes[2:-1]),
           json_mode=args.json, out_dir=args.out, chart=write_chart)
    return 0


def overhead_command(args) -> int:
    from lambdasplit.bench.overhead import COLUMNS, run_overhead
    from lambdasplit.bench.report import describe_machine, report

    result = run_overhead(model=args.model, split=args.split, wide_hidden=args.wide_hidden,
                          wide_layers=args.wide_layers, new_tokens=args.new_tokens, repeats=args.repeats,
                          codec=args.codec, threads=args.threads, progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = f"Framework overhead: {args.new_tokens} tokens, codec {args.codec}, median of {args.repeats}"
    notes = ["tokens/s: median over interleaved repeats; bytes/token: steady state, both directions",
             describe_machine(meta["machine"]), f"command: `{meta['command']}`"]
    report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption=notes[1],
           json_mode=args.json, out_dir=args.out)
    return 0


def redundancy_command(args) -> int:
    from lambdasplit.bench.redundancy import COLUMNS, run_redundancy_bench, write_chart
    from lambdasplit.bench.report import describe_machine, report

    result = run_redundancy_bench(model=args.model, split=args.split, prompt=args.prompt, new_tokens=args.new_tokens,
                                  codec=args.codec, kill_after=args.kill_after, repeats=args.repeats,
                                  threads=args.threads, link=args.link, progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = (f"Redundancy: {args.model} body {meta['split']}, {args.new_tokens} greedy tokens, codec {args.codec}, "
             f"median of {args.repeats}" + (f", link {args.link}" if args.link else ""))
    notes = [f"verify tolerance {meta['verify_tolerance']:g} (max |a - b| / max(1, max |a|) per step); failover: "
             f"the first server killed (SIGKILL) after {args.kill_after} tokens; MB = 10^6 socket bytes, all servers",
             describe_machine(meta["machine"]) + " (at start)", f"command: `{meta['command']}`"]
    report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption=" | ".join(notes),
           json_mode=args.json, out_dir=args.out, chart=write_chart)
    return 0


def _serve_process_rows(args) -> None:
    """bench serve's rows with real client processes (--process-clients)."""
    from lambdasplit.bench.report import describe_machine, machine, markdown_table, print_table
    from lambdasplit.bench.serve import audit_prompts
    from lambdasplit.bench.serve_processes import PROCESS_COLUMNS, run_process_clients
    from lambdasplit.errors import UsageError

    try:
        counts = [int(c) for c in args.process_clients.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--process-clients takes comma-separated integers, got {args.process_clients!r}") from None
    modes = list(_names(args.process_modes, {"split", "cloud"}))
    if not counts or min(counts) < 1:
        raise UsageError("--process-clients needs counts >= 1")
    info = machine()
    rows = run_process_clients(model=args.model, split=args.split, counts=counts, modes=modes,
                               new_tokens=args.new_tokens, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                               threads=args.threads, prompts=audit_prompts(), progress=not args.json)
    title = (f"Serving with real client processes: {args.model} body {args.split} (split) or whole model (cloud), "
             f"{args.new_tokens} tokens per client, max batch {args.max_batch}")
    notes = ["one `lambdasplit serve --cloud --layers` process; N `lambdasplit generate --json` processes started "
             "together (each loads its head and tail: on 2 cores they compete with the server)",
             describe_machine(info) + " (at start)", f"command: `{_command_line()}`"]
    if args.json:
        print(json.dumps({"process_rows": rows, "machine": info}))
    else:
        print_table(rows, PROCESS_COLUMNS, title=title, caption="\n".join(notes[:2]))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "processes.md").write_text(f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
                                          + markdown_table(rows, PROCESS_COLUMNS))
        (out / "processes.json").write_text(json.dumps({"rows": rows, "machine": info, "notes": notes}, indent=1))


def serve_command(args) -> int:
    from lambdasplit.bench.report import describe_machine, report
    from lambdasplit.bench.report import markdown_table, print_table
    from lambdasplit.bench.serve import BREAKDOWN_COLUMNS, COLUMNS, run_serve_bench, write_chart
    from lambdasplit.errors import UsageError

    if args.process_clients:
        _serve_process_rows(args)
        if args.only_processes:
            return 0

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
    out = report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption="\n".join(notes[:3]),
                 json_mode=args.json, out_dir=args.out, chart=write_chart, extra={"breakdown": breakdown})
    if breakdown and not args.json:
        print_table(breakdown, BREAKDOWN_COLUMNS, title=breakdown_title)
    if out is not None and breakdown:
        (out / "breakdown.json").write_text(json.dumps(breakdown, indent=1) + "\n")
        with open(out / "table.md", "a") as handle:
            handle.write(f"\n## {breakdown_title}\n\n" + markdown_table(breakdown, BREAKDOWN_COLUMNS))
    return 0


def wan_command(args) -> int:
    from lambdasplit.bench.report import describe_machine, report
    from lambdasplit.bench.wan import COLUMNS, run_wan, write_chart
    from lambdasplit.speculative.adaptive import parse_draft_tokens

    sources = list(_names(args.sources, set(SOURCES)))
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
    if meta.get("plain_again"):
        notes.insert(2, "runs interleaved prompt by prompt (none, each source, none again); noise: the second plain run gave " + ", ".join(
            f"{v['again']:.2f} tokens/s at {link} ({v['ratio']:.2f}x its first run)"
            for link, v in meta["plain_again"].items()) + "; a \"x none\" closer to 1 than that is within the noise")
    out = report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption="\n".join(notes[:3]),
                 json_mode=args.json, out_dir=args.out, chart=write_chart, extra={"tree": result.get("tree")})
    if out is not None and result.get("tree"):  # eagle-tree: what verifying the whole tree in one step would add
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


def shared_command(args) -> int:
    from lambdasplit.shares import bench as shared_bench

    parser = argparse.ArgumentParser(prog="lambdasplit bench shared", description=shared_bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_bench.add_arguments(parser)
    parsed = parser.parse_args(args.rest)
    shared_bench.check_args(parsed)
    return int(shared_bench.run(parsed) or 0)


def _names(text: str, allowed: set[str]) -> tuple[str, ...]:
    from lambdasplit.errors import LambdaSplitError

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise LambdaSplitError(f"expected a comma-separated subset of {', '.join(sorted(allowed))}, got {text!r}")
    return names


def replicas_command(args) -> int:
    from lambdasplit.bench.replicas import COLUMNS, run_replicas_bench, write_chart
    from lambdasplit.bench.report import describe_machine, report
    from lambdasplit.errors import UsageError

    try:
        replicas = [int(c) for c in args.replicas.split(",") if c.strip()]
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UsageError("--replicas and --clients take comma-separated integers") from None
    if not replicas or not clients or min(replicas + clients) < 1 or args.new_tokens < 1:
        raise UsageError("--replicas and --clients need counts >= 1, --new-tokens >= 1")
    result = run_replicas_bench(model=args.model, split=args.split, replicas=replicas, clients=clients,
                                new_tokens=args.new_tokens, replica_cpus=args.replica_cpus, progress=not args.json)
    meta = {**result["meta"], "command": _command_line()}
    title = (f"Scale-out: {args.model} body {meta['split']} on `serve --ray`, {args.new_tokens} tokens per session, "
             f"{args.replica_cpus:g} CPU per replica")
    notes = [
        "real serve --ray processes (local Ray cluster, router on loopback); client threads in the bench process "
        "replay precomputed head outputs; tokens/s = sessions x tokens / wall time; step latency = one STEP round "
        "trip through the router; startup = Ray + replicas loading, until the router listens",
        describe_machine(meta["machine"]) + " (at start)",
        f"command: `{meta['command']}`",
    ]
    report(result["rows"], COLUMNS, title=title, meta=meta, notes=notes, caption="\n".join(notes[:2]),
           json_mode=args.json, out_dir=args.out, chart=write_chart)
    return 0
