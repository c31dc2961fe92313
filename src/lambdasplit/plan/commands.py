"""`lambdasplit plan`: profile, predict every (split, codec, speculation), print the Pareto front and a
recommendation, then measure the recommendation and a few other points and report the errors."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

from lambdasplit.errors import LambdaSplitError, UsageError

DEFAULT_SOURCES = "none,lookup,lookahead,eagle"
MEASURED_SPEED_TIE = 0.05  # measured tokens/s this close count as equal when checking the measured front


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose split, codec and drafting from measured profiles, then check it")
    p.add_argument("--model", required=True, help="Hub id, local folder or zoo:NAME")
    p.add_argument("--server", metavar="HOST:PORT",
                   help="a server hosting the candidate splits (default: start one on loopback)")
    p.add_argument("--link", metavar="SPEC", help="link emulation for predictions and measurements (wire/link.py "
                   "syntax, e.g. wan, 5g, up=81mbit,down=340mbit,delay=20ms); default: the real link, as measured")
    p.add_argument("--device-memory", metavar="SIZE", help="largest device memory (weights + KV), e.g. 300MB, 1GiB")
    p.add_argument("--max-leak", type=float, metavar="FRACTION",
                   help="largest share of prompt tokens an audited attack recovers (needs audit figures)")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="least greedy agreement with the unsplit model for a lossy codec")
    p.add_argument("--splits", default="", help="candidate splits X:Y, comma-separated (default: X:N-X for X in 1, 2, "
                   "4, 8 below N/2)")
    p.add_argument("--codecs", default="", help="candidate codecs (default: every codec the wire registry accepts)")
    p.add_argument("--speculate", default=DEFAULT_SOURCES, help="candidate draft sources (unavailable ones are skipped)")
    p.add_argument("--draft-model", help="draft model / EAGLE head folder for --speculate draft / eagle")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round trip when speculating")
    p.add_argument("--device-weights", default="float", metavar="float[,int8]",
                   help="candidate precisions of the device's own weights: int8 = weight-only int8 head and tail "
                        "(llm/lowbit.py: less memory, not exact; held to --min-agreement like a lossy codec, and "
                        "planned without speculation)")
    p.add_argument("--prompt", help="the workload's prompt (default: a fixed question, with the chat template)")
    p.add_argument("--new-tokens", type=int, default=32, help="the workload's generated tokens (greedy)")
    p.add_argument("--profile-tokens", type=int, default=None,
                   help="tokens per profiling session, over which codec agreement is measured (default: --new-tokens; "
                        "fewer is quicker, but a codec's first divergence can come later)")
    p.add_argument("--measure", type=int, default=3, help="points measured besides the recommendation")
    p.add_argument("--measure-repeats", type=int, default=1,
                   help="runs per measured point, round robin; the median run is reported")
    p.add_argument("--audit", type=Path, metavar="REPORT",
                   help="leakage per split from `audit llm --out DIR` (DIR/report.json); remembered in the cache")
    p.add_argument("--quick-audit", action="store_true",
                   help="no audit figures yet: run a small `audit llm` (1 prompt, 3 tokens) and cache it")
    p.add_argument("--leak-attack", default="worst", help="which audited attack's top-1 recovery is the leakage")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads here and in the server it starts (0: as is)")
    p.add_argument("--fresh", action="store_true", help="measure the profiles again instead of reading the cache")
    p.add_argument("--out", type=Path, required=True, help="write DIR/plan.json, DIR/front.png, DIR/table.md")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    p.set_defaults(func=run)


def parse_size(text: str | None) -> int | None:
    """'300MB' -> 300e6, '1GiB' -> 2**30, '512' -> 512 bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise UsageError(f"bad size {text!r}: write e.g. 300MB, 1.5GiB, 800000")
    power = " kmgt".index(match.group(2) or " ")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base**power)


def default_splits(num_layers: int) -> list[str]:
    return [f"{x}:{num_layers - x}" for x in (1, 2, 4, 8) if x < num_layers - x]


def run(args) -> int:
    plan = make_plan(args, progress=not args.json)
    if args.json:
        json.dump(plan, sys.stdout, indent=1)
        print()
    return 0


def make_plan(args, progress: bool = True) -> dict:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lambdasplit.bench.report import machine
    from lambdasplit.client.device import DeviceModel
    from lambdasplit.llm.checkpoint import Checkpoint
    from lambdasplit.llm.lowbit import DEVICE_WEIGHTS, apply_device_weights
    from lambdasplit.llm.segments import parse_split
    from lambdasplit.plan import pareto, profile
    from lambdasplit.plan.predict import Model, leakage_from_report
    from lambdasplit.wire.link import Link

    began = time.perf_counter()
    if args.profile_tokens is None:
        args.profile_tokens = args.new_tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2 or args.profile_tokens < 2 or args.draft_tokens < 1 or args.measure_repeats < 1:
        raise UsageError("--new-tokens and --profile-tokens need at least 2, --draft-tokens and --measure-repeats "
                         "at least 1")
    link = Link.parse(args.link)  # a bad --link fails before anything is loaded
    memory_limit = parse_size(args.device_memory)
    constraints = pareto.Constraints(memory_limit, args.max_leak, args.min_agreement)
    checkpoint = Checkpoint(args.model)
    n_layers = checkpoint.config.num_hidden_layers
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or default_splits(n_layers)
    splits = list(dict.fromkeys(f"{x}:{y}" for x, y in (parse_split(s, n_layers) for s in splits)))
    available = profile.codec_names()
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()] or available
    sources = list(dict.fromkeys(["none"] + [s.strip() for s in args.speculate.split(",") if s.strip()]))
    weight_modes = list(dict.fromkeys(w.strip() for w in args.device_weights.split(",") if w.strip())) or ["float"]
    for mode in weight_modes:
        if mode not in DEVICE_WEIGHTS:
            raise UsageError(f"--device-weights takes {', '.join(DEVICE_WEIGHTS)}, got {mode!r}")
    settings = profile.Settings(dtype=args.dtype, draft_tokens=args.draft_tokens, new_tokens=args.profile_tokens)
    console = Console(stderr=True, quiet=not progress)
    notes: list[str] = []

    whole = DeviceModel.load(checkpoint, None, args.dtype)
    prompt_ids = whole.encode(args.prompt or profile.DEFAULT_PROMPT)
    devices: dict[tuple[str, str], DeviceModel] = {}

    def device_for(split: str, weights: str = "float") -> DeviceModel:
        if (split, weights) not in devices:
            devices[split, weights] = DeviceModel.load(checkpoint, split, args.dtype)
            apply_device_weights(devices[split, weights], weights)
        return devices[split, weights]

    def whole_with(weights: str) -> DeviceModel:
        if weights == "float":
            return whole
        model = DeviceModel.load(checkpoint, None, args.dtype)
        apply_device_weights(model, weights)
        return model

    def variant(weights: str) -> str:  # cache keys: float keeps the keys it always had
        return "" if weights == "float" else f"|weights={weights}"

    process = None
    server = args.server
    server_id = server or "loopback server started by plan"
    fingerprint = checkpoint.fingerprint
    from_cache: dict[str, bool] = {}
    phases: dict[str, float] = {}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 3)
        clock[0] = now

    phase("load")
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            # ---- device
            device_profiles = {}
            for weights in dict.fromkeys(["float", *weight_modes]):  # float's local generation is the reference
                task = bar.add_task(f"profile: device layers ({weights} weights)", total=settings.repeats * 3 + 1)
                device_profiles[weights], from_cache["device" + variant(weights)] = profile.cached(
                    profile.cache_file(fingerprint, "device", settings, variant(weights), prompt_ids=prompt_ids),
                    lambda: profile.profile_device(whole_with(weights), prompt_ids, settings,
                                                   lambda: bar.advance(task)), args.fresh)
                bar.update(task, completed=settings.repeats * 3 + 1)
            device_profile = device_profiles["float"]
            phase("profile_device")
            # ---- drafting (also the workload's reference tokens)
            task = bar.add_task("profile: drafting sources", total=len(sources))
            drafting, from_cache["drafting"] = profile.cached(
                profile.cache_file(fingerprint, "drafting", settings, f"{args.new_tokens}|{sources}|{args.draft_model}",
                                   prompt_ids),
                lambda: profile.profile_drafting(whole, prompt_ids, args.new_tokens, sources, settings,
                                                 args.draft_model, lambda: bar.advance(task)), args.fresh)
            bar.update(task, completed=len(sources))
            phase("profile_drafting")
            for name, reason in drafting["skipped"].items():
                notes.append(f"speculation source {name} skipped: {reason}")
            reference = drafting["sources"]["none"]["token_ids"]
            # ---- server
            if server is None:
                from lambdasplit.bench.llm import server_args
                from lambdasplit.server.process import ServerProcess

                task = bar.add_task("start a loopback server", total=1)
                env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
                process = ServerProcess(server_args(str(checkpoint.folder), splits, args.dtype, False), env=env).start()
                server = process.address
                bar.advance(task)
                phase("start_server")
            server_profiles = {}
            for weights in weight_modes:
                task = bar.add_task(f"profile: server sessions ({weights} weights)", total=len(splits) * len(codecs))
                # agreement against the unsplit model with float weights, whatever the device holds
                server_profiles[weights], from_cache["server" + variant(weights)] = profile.cached(
                    profile.cache_file(fingerprint, "server", settings,
                                       f"{server_id}|{splits}|{codecs}" + variant(weights), prompt_ids),
                    lambda: profile.profile_server(lambda split: device_for(split, weights), server, splits, codecs,
                                                   prompt_ids, settings, device_profile["reference_tokens"],
                                                   lambda: bar.advance(task)),
                    args.fresh)
                bar.update(task, completed=len(splits) * len(codecs))
                for name, reason in server_profiles[weights]["failures"].items():
                    notes.append(f"profile session {name}{variant(weights)} failed: {reason}")
            phase("profile_server")

            # ---- leakage
            leakage, leak_source = {}, "none: no audit figures (pass --audit REPORT or --quick-audit)"
            audit_cache = profile.cache_root() / fingerprint[:16] / "audit-report.json"
            report_path = args.audit
            if report_path is None and not audit_cache.exists() and args.quick_audit:
                task = bar.add_task("quick audit", total=1)
                audit_cache.parent.mkdir(parents=True, exist_ok=True)
                audit_cache.write_text(json.dumps(quick_audit(checkpoint, splits)) + "\n")
                bar.advance(task)
            if report_path is not None:
                leakage_from_report(report_path, args.leak_attack)  # refuse a bad report before caching it
                audit_cache.parent.mkdir(parents=True, exist_ok=True)
                audit_cache.write_text(Path(report_path).read_text())
                leak_source = str(report_path)
            elif audit_cache.exists():
                leak_source = f"cached audit report {audit_cache}"
            if audit_cache.exists():
                leakage = leakage_from_report(audit_cache, args.leak_attack)
            phase("audit")

            # ---- predict
            models = {weights: Model(device_profiles[weights], server_profiles[weights], drafting,
                                     prompt_tokens=len(prompt_ids), new_tokens=args.new_tokens, link=link)
                      for weights in weight_modes}
            candidates = []
            for weights, model in models.items():
                # drafting was profiled with float weights: the int8 candidates decode plainly
                for candidate in model.candidates(sources if weights == "float" else ["none"]):
                    candidate.device_weights = weights
                    candidates.append(candidate)
            for candidate in candidates:
                if candidate.split in leakage:
                    candidate.leakage, candidate.leakage_attack = leakage[candidate.split]
            # the front of what the constraints allow (a codec that loses the answer, or a split
            # that leaks too much, dominates nothing); of every candidate when none is allowed
            allowed = [c for c in candidates if not constraints.reasons(c)]
            the_front = pareto.front(allowed or candidates)
            chosen = pareto.recommend(candidates, constraints)

            # ---- measure
            to_measure = measured_points(chosen, the_front, args.measure)
            task = bar.add_task("measure over the link", total=len(to_measure) * args.measure_repeats)
            runs: dict[int, list[dict]] = {}
            for _ in range(args.measure_repeats):  # round robin: a slow minute hits every point alike
                for index, candidate in enumerate(to_measure):
                    runs.setdefault(index, []).append(measure(
                        candidate, device_for(candidate.split, candidate.device_weights), server, args.link,
                        prompt_ids, args.new_tokens, reference, settings, args.draft_model))
                    bar.advance(task)
            for index, candidate in enumerate(to_measure):
                candidate.measured = combine_runs(candidate, runs[index])
            phase("measure")
    finally:
        if process is not None:
            process.stop()

    measured = [c for c in to_measure if c.measured]  # the recommendation first
    measured_front = pareto.front(measured, measured=True)
    tolerant_front = pareto.front(measured, measured=True, speed_tie=MEASURED_SPEED_TIE)
    rows = [candidate_row(c, c in the_front, c is chosen, constraints) for c in candidates]
    errors = [abs(c.measured["error"]["tokens_per_s"]) for c in measured]
    for c in measured:
        agreement = c.measured.get("agreement")
        exact = c.codec in pareto.LOSSLESS and c.device_weights == "float"
        if not exact and agreement is not None and agreement < args.min_agreement:
            notes.append(f"{c.label}: measured agreement over the workload {agreement:.0%} is below --min-agreement "
                         f"{args.min_agreement:g} (the quick profile over {args.profile_tokens} tokens said "
                         f"{_pct(c.agreement)})" + (": the recommendation fails it" if c is chosen else ""))
    plan = {
        "model": args.model, "fingerprint": fingerprint, "layers": n_layers, "dtype": args.dtype,
        "link": link.describe() if link else "the real link to the server (no emulation), as profiled",
        "server": server_id,
        "workload": {"prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens, "sampling": "greedy",
                     "eos": "ignored (EOS logits masked)", "draft_tokens": args.draft_tokens},
        "constraints": {"device_memory_bytes": memory_limit, "max_leak": args.max_leak,
                        "min_agreement": args.min_agreement, "leak_attack": args.leak_attack},
        "leakage_source": leak_source, "codecs_in_registry": available,
        "exchange_profile": models[weight_modes[0]].exchange_summary(), "device_weights": weight_modes,
        "candidates": rows, "front": [c.label for c in the_front],
        "recommendation": chosen.label if chosen else None,
        "recommendation_reason": None if chosen else "no candidate meets the constraints",
        "measured": [measured_row(c) for c in measured],
        "max_abs_error_tokens_per_s": max(errors) if errors else None,
        "mean_abs_error_tokens_per_s": sum(errors) / len(errors) if errors else None,
        "recommendation_on_measured_front": (chosen in measured_front) if chosen and chosen.measured else None,
        "recommendation_measured_agreement": chosen.measured.get("agreement") if chosen and chosen.measured else None,
        "measured_front": [c.label for c in measured_front],
        "recommendation_on_measured_front_within_5pct": (chosen in tolerant_front) if chosen and chosen.measured
        else None,
        "profiles_from_cache": from_cache, "notes": notes,
        "seconds": time.perf_counter() - began, "phase_seconds": phases, "machine": machine(),
    }
    write_outputs(args.out, plan, candidates, the_front, chosen)
    if progress:
        wide = Console(stderr=True)
        if not wide.is_terminal:  # piped or logged: do not squeeze the tables into 80 columns
            wide = Console(stderr=True, width=max(wide.width, 180))
        show(wide, plan, candidates, the_front, chosen)
    return plan


def measured_points(chosen, the_front, extra: int) -> list:
    """The recommendation, then the front's extremes: fastest, fewest bytes, least memory, least leakage."""
    picks = [chosen] if chosen else []
    orders = [lambda c: c.seconds_per_token, lambda c: c.bytes_per_token, lambda c: c.device_memory,
              lambda c: (1.0 if c.leakage is None else c.leakage, c.seconds_per_token)]
    for order in orders:
        if len(picks) >= extra + (1 if chosen else 0):
            break
        for candidate in sorted(the_front, key=order):
            if candidate not in picks:
                picks.append(candidate)
                break
    return picks


def measure(candidate, device, server: str, link: str | None, prompt_ids: list[int], new_tokens: int,
            reference: list[int], settings, draft_model: str | None) -> dict:
    """Run the workload for real (the code path of `generate`): tokens/s, TTFT, bytes, memory, agreement."""
    from lambdasplit.client.remote import RemoteBody
    from lambdasplit.client.run import default_refine_gap
    from lambdasplit.plan.profile import device_bytes
    from lambdasplit.speculative import make_source
    from lambdasplit.speculative.sources import DRAFT_MODEL_SOURCES

    source = make_source(candidate.speculate, device,
                         draft_model=draft_model if candidate.speculate in DRAFT_MODEL_SOURCES else None)
    first: list[float] = []
    with RemoteBody.for_device(device, server, codec=candidate.codec, link=link) as body:
        began = time.perf_counter()
        result = device.generate(list(prompt_ids), body=body, max_new_tokens=new_tokens, ignore_eos=True,
                                 speculate=source, draft_tokens=settings.draft_tokens,
                                 on_token=lambda token: first or first.append(time.perf_counter()),
                                 refine_gap=default_refine_gap(candidate.codec))
        memory = device_bytes(device)
        body.close()
        nbytes = body.bytes_up + body.bytes_down
    tokens = list(result.token_ids)
    agreement = sum(a == b for a, b in zip(tokens, reference)) / len(reference) if reference else None
    figures = {
        "tokens_per_s": len(tokens) / result.seconds, "ttft_s": first[0] - began if first else None,
        "bytes_per_token": nbytes / len(tokens), "device_memory": memory["weights"] + memory["kv"],
        "round_trips": body.round_trips, "tokens_per_round_trip": result.accepted_per_step,
        "agreement": agreement, "seconds": result.seconds,
    }
    return figures


def combine_runs(candidate, runs: list[dict]) -> dict:
    """The run of median speed (its figures together, not a mix of runs), with every run's speed
    and the errors of the prediction against it."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    figures = dict(ordered[(len(ordered) - 1) // 2])
    figures["runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
    predicted = {"tokens_per_s": candidate.tokens_per_s, "ttft_s": candidate.ttft_s,
                 "bytes_per_token": candidate.bytes_per_token, "device_memory": candidate.device_memory}
    figures["error"] = {key: (predicted[key] - figures[key]) / figures[key]
                        for key in predicted if figures.get(key)}
    return figures


def candidate_row(c, on_front: bool, chosen: bool, constraints) -> dict:
    return {
        "label": c.label, "split": c.split, "codec": c.codec, "speculate": c.speculate,
        "device_weights": c.device_weights,
        "tokens_per_s": c.tokens_per_s, "ttft_s": c.ttft_s, "bytes_per_token": c.bytes_per_token,
        "device_memory": c.device_memory, "leakage": c.leakage, "leakage_attack": c.leakage_attack,
        "agreement": c.agreement, "tokens_per_round_trip": c.tokens_per_round_trip,
        "on_front": on_front, "recommended": chosen, "refused_by": constraints.reasons(c),
        "breakdown": c.breakdown,
    }


def measured_row(c) -> dict:
    m = c.measured
    return {
        "label": c.label, "split": c.split, "codec": c.codec, "speculate": c.speculate,
        "device_weights": c.device_weights,
        "predicted": {"tokens_per_s": c.tokens_per_s, "ttft_s": c.ttft_s, "bytes_per_token": c.bytes_per_token,
                      "device_memory": c.device_memory, "tokens_per_round_trip": c.tokens_per_round_trip},
        "measured": {k: v for k, v in m.items() if k != "error"},
        "error": m["error"],
    }


def _pct(value) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"


def _mb(value) -> str:
    return f"{value / 1e6:.1f}"


def show(console, plan: dict, candidates, the_front, chosen) -> None:
    from rich.table import Table

    table = Table(title=f"Pareto front: {plan['model']}, link: {plan['link']}",
                  caption=f"{len(the_front)} of {len(candidates)} candidates are on the front; predicted figures")
    text_columns = ("split", "codec", "speculate", "device weights", "refused by")
    for header in ("split", "codec", "speculate", "device weights", "tok/s", "TTFT ms", "bytes/token", "device MB",
                   "leakage", "agreement", "refused by"):
        table.add_column(header, justify="left" if header in text_columns else "right")
    for c in sorted(the_front, key=lambda c: c.seconds_per_token):
        mark = "[bold green]" if c is chosen else ""
        row = next(r for r in plan["candidates"] if r["label"] == c.label)
        table.add_row(mark + c.split, c.codec, c.speculate, c.device_weights, f"{c.tokens_per_s:.1f}",
                      f"{1e3 * c.ttft_s:.0f}", f"{c.bytes_per_token:,.0f}", _mb(c.device_memory), _pct(c.leakage),
                      _pct(c.agreement),
                      ", ".join(row["refused_by"]))
    console.print(table)
    if chosen:
        console.print(f"[bold]Recommendation:[/bold] split {chosen.split}, codec {chosen.codec}, speculate "
                      f"{chosen.speculate}, device weights {chosen.device_weights}: {chosen.tokens_per_s:.1f} tok/s "
                      "predicted")
    else:
        console.print("[bold red]No candidate meets the constraints[/bold red]")
    measured = Table(title="Predicted vs measured (real loopback server" + (", emulated link)" if "no emulation"
                                                                              not in plan["link"] else ")"))
    for header in ("config", "tok/s pred", "tok/s meas", "error", "TTFT ms pred", "TTFT ms meas", "bytes/tok pred",
                   "bytes/tok meas", "agreement"):
        measured.add_column(header, justify="left" if header == "config" else "right")
    for row in plan["measured"]:
        p, m = row["predicted"], row["measured"]
        measured.add_row(row["label"] + (" (recommended)" if row["label"] == plan["recommendation"] else ""),
                         f"{p['tokens_per_s']:.1f}", f"{m['tokens_per_s']:.1f}",
                         f"{100 * row['error'].get('tokens_per_s', 0):+.1f}%",
                         f"{1e3 * p['ttft_s']:.0f}", f"{1e3 * m['ttft_s']:.0f}" if m["ttft_s"] else "",
                         f"{p['bytes_per_token']:,.0f}", f"{m['bytes_per_token']:,.0f}", _pct(m["agreement"]))
    console.print(measured)
    if plan["max_abs_error_tokens_per_s"] is not None:
        console.print(f"tokens/s error: max {100 * plan['max_abs_error_tokens_per_s']:.1f}%, mean "
                      f"{100 * plan['mean_abs_error_tokens_per_s']:.1f}%; recommendation on the measured front: "
                      f"{plan['recommendation_on_measured_front']} (speeds within 5% as equal: "
                      f"{plan['recommendation_on_measured_front_within_5pct']})")
    for note in plan["notes"]:
        console.print(f"note: {note}")


def write_outputs(out: Path, plan: dict, candidates, the_front, chosen) -> None:
    from lambdasplit.bench.report import Column, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    columns = [Column("label", "config", numeric=False), Column("tokens_per_s", "tok/s", ".1f"),
               Column("ttft_s", "TTFT s", ".3f"), Column("bytes_per_token", "bytes/token", ",.0f"),
               Column("device_memory", "device MB", _mb), Column("leakage", "leakage", _pct),
               Column("agreement", "agreement", _pct), Column("on_front", "front", numeric=False),
               Column("recommended", "recommended", numeric=False)]
    rows = sorted(plan["candidates"], key=lambda r: -r["tokens_per_s"])
    measured_rows = [{"label": r["label"], "pred": r["predicted"]["tokens_per_s"], "meas": r["measured"]["tokens_per_s"],
                      "err": 100 * r["error"].get("tokens_per_s", math.nan),
                      "bpred": r["predicted"]["bytes_per_token"], "bmeas": r["measured"]["bytes_per_token"]}
                     for r in plan["measured"]]
    measured_columns = [Column("label", "config", numeric=False), Column("pred", "tok/s predicted", ".1f"),
                        Column("meas", "tok/s measured", ".1f"), Column("err", "error %", "+.1f"),
                        Column("bpred", "bytes/token predicted", ",.0f"), Column("bmeas", "bytes/token measured", ",.0f")]
    text = [f"# plan: {plan['model']}", "", f"- link: {plan['link']}", f"- recommendation: {plan['recommendation']}",
            f"- leakage: {plan['leakage_source']}", "", "## Candidates (predicted)", "", markdown_table(rows, columns),
            "## Predicted vs measured", "", markdown_table(measured_rows, measured_columns)]
    (out / "table.md").write_text("\n".join(text))
    write_chart(out / "front.png", plan, candidates, the_front, chosen)


def write_chart(path: Path, plan: dict, candidates, the_front, chosen) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, key, label in ((left, "bytes_per_token", "bytes per token (log)"),
                             (right, "device_memory", "device memory, MB")):
        scale = 1e6 if key == "device_memory" else 1.0
        others = [c for c in candidates if c not in the_front]
        axis.scatter([getattr(c, key) / scale for c in others], [c.tokens_per_s for c in others], s=14, c="lightgray",
                     label="dominated")
        points = axis.scatter([getattr(c, key) / scale for c in the_front], [c.tokens_per_s for c in the_front], s=30,
                              c=[1.0 if c.leakage is None else c.leakage for c in the_front], cmap="viridis",
                              vmin=0, vmax=1, label="Pareto front (colour: leakage)")
        for c in candidates:
            if c.measured:
                x = getattr(c, key) / scale
                axis.annotate("", xy=(c.measured[key] / scale if key == "device_memory" else c.measured[key],
                                      c.measured["tokens_per_s"]),
                              xytext=(x, c.tokens_per_s), arrowprops={"arrowstyle": "->", "color": "tab:red"})
                axis.scatter([c.measured[key] / scale], [c.measured["tokens_per_s"]], marker="x", c="tab:red", s=40)
        if chosen:
            axis.scatter([getattr(chosen, key) / scale], [chosen.tokens_per_s], marker="*", s=220, c="tab:orange",
                         edgecolors="black", label=f"recommended: {chosen.label}", zorder=5)
        if key == "bytes_per_token":
            axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("tokens / s (predicted; red x: measured)")
        axis.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    fig.colorbar(points, ax=right, label="leakage (top-1 prompt recovery; 1 = unknown or all)")
    fig.suptitle(f"lambdasplit plan: {plan['model']}, {plan['link']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_audit(checkpoint, splits: list[str]) -> dict:
    """A small `audit llm` at the symmetric candidate splits (1 prompt, 3 tokens, short training)."""
    from lambdasplit.audit.llm import LLMAuditConfig, audit_llm, default_prompts

    n = checkpoint.config.num_hidden_layers
    depths = sorted({int(s.split(":")[0]) for s in splits if int(s.split(":")[0]) + int(s.split(":")[1]) == n
                     and 1 <= int(s.split(":")[0]) <= n // 2})
    if not depths:
        raise LambdaSplitError("--quick-audit audits splits X:N-X only; none is among the candidates")
    config = LLMAuditConfig(model=str(checkpoint.folder), splits=depths, prompts=default_prompts()[:1],
                            max_new_tokens=3, train_tokens=800, epochs=1, sweep_budget_s=2.0, cloud_check=False,
                            lens_sequences=8, perplexity_tokens=32)
    report = audit_llm(config, progress=False, log=lambda *a, **k: None)
    report["meta"]["quick"] = "plan --quick-audit: 1 prompt, 3 tokens, 800 training tokens, 1 epoch"
    return report
