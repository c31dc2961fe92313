"""`lambdasplit bench shared`: what the secret-shared mode costs, against local generation.

Two real `serve --component shares` processes on loopback (or `--servers A,B`), the device
in this process. For each link (loopback, then one-way delays: one emulated link carries
both sessions, the device has one uplink) and each --speculate source, greedy generation
of the same prompts with EOS masked (exactly --new-tokens tokens; fewer, --delay-tokens,
on the delayed links, where one token takes seconds), and local fp32 generation of the
same prompts, interleaved so that the machine's load hits both alike. Per row:

    tok/s                   wall clock, the prompt's step included
    round trips / token     requests to EACH server (both get every request, in parallel)
    bytes / token           per server, up and down, every byte on the socket (handshake excluded),
                            the prompt's step included; "steady": a plain decoding step's requests
                            (one position each) times the requests per step
    device CPU / token      this process's CPU time (time.process_time) per generated token,
                            shared against local; the servers are other processes. Of it, the
                            share arithmetic (encode, mask, add, decode: O(d) per layer) and the
                            framing and socket calls (thread CPU time around them); the rest is
                            the model's non-linear parts and the interpreter around them
    agreement               greedy tokens equal to local fp32's, position by position (loopback row)
    max |logit error|       against local fp32 (loopback row)

Plus the device's weights in memory (parameters and buffers it holds) against local's.
"""

from __future__ import annotations

import argparse
import time

import torch

from lambdasplit.bench.report import Column, describe_machine, machine, megabytes, print_table, write_outputs
from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.errors import LambdaSplitError
from lambdasplit.shares.device import SharedDevice
from lambdasplit.shares.run import parse_merge, parse_servers, run_shared
from lambdasplit.zoo.registry import DEFAULT_LLM

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Explain in one sentence what a CPU does.",
           "Write a haiku about the sea.", "What is 12 plus 7?", "Give me a synonym for happy."]

COLUMNS = [
    Column("link", "link", numeric=False), Column("speculate", "speculate", numeric=False),
    Column("lm_head", "LM head", numeric=False), Column("layers", "layers", numeric=False),
    Column("tokens", "tokens", "d"), Column("tokens_per_second", "tok/s", ".3f"),
    Column("round_trips_per_token", "round trips / token (each server)", ".1f"),
    Column("up_a_per_token", "A up / token (MB)", megabytes), Column("down_a_per_token", "A down / token (MB)", megabytes),
    Column("up_b_per_token", "B up / token (kB)", lambda v: f"{v / 1e3:.2f}"),
    Column("down_b_per_token", "B down / token (MB)", megabytes),
    Column("steady_up_a", "steady A up / token (kB)", lambda v: f"{v / 1e3:.1f}"),
    Column("steady_down_a", "steady A down / token (kB)", lambda v: f"{v / 1e3:.1f}"),
    Column("steady_up_b", "steady B up / token (kB)", lambda v: f"{v / 1e3:.2f}"),
    Column("device_cpu_ms_per_token", "device CPU / token (ms)", ".1f"),
    Column("arithmetic_cpu_ms_per_token", "of which share arithmetic (ms)", ".2f"),
    Column("io_cpu_ms_per_token", "of which framing + sockets (ms)", ".1f"),
    Column("local_cpu_ms_per_token", "local CPU / token (ms)", ".1f"),
    Column("device_cpu_percent_of_local", "device CPU % of local", ".0f"),
    Column("agreement", "greedy agreement", lambda v: f"{100 * v:.1f}%"),
    Column("max_logit_error", "max |logit err|", ".2e"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_LLM, help="default %(default)s; a diffusers pipeline (zoo:digits) "
                   "measures images instead: PSNR against the unsplit pipeline, bytes and round trips per server")
    p.add_argument("--servers", metavar="A,B", help="running shares servers (default: start two on loopback)")
    p.add_argument("--lm-head", choices=["shared", "device"], default="shared",
                   help="where the LM head runs (servers started here follow it; default %(default)s)")
    p.add_argument("--merge", choices=["auto", "on", "off"], default="auto",
                   help="the merged layers, 2 requests per decoder layer (servers started here follow it; "
                        "default %(default)s: where the model allows it)")
    p.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} built-in prompts")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per prompt on loopback (EOS masked)")
    p.add_argument("--delays", default="5,20,40", help="one-way delays in ms, comma-separated ('' for none)")
    p.add_argument("--delay-tokens", type=int, default=3, help="tokens per prompt on the delayed links")
    p.add_argument("--delay-prompts", type=int, default=1, help="prompts on the delayed links")
    p.add_argument("--speculate", default="none,lookup", help="--speculate sources on loopback and the 20 ms link")
    p.add_argument("--audit", action="store_true",
                   help="instead: capture both servers' traffic over --prompts sessions (+ 4 attacker sessions "
                        "with known text), run the attacks and the statistical tests (shares/audit.py)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (default %(default)s)")
    p.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and chart.png")
    p.add_argument("--json", action="store_true")


def held_bytes(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() not in seen and not tensor.is_meta:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _local(local: DeviceModel, prompt: str, tokens: int):
    began = time.process_time()
    result = local.generate(prompt, max_new_tokens=tokens, ignore_eos=True, keep_logits=True)
    return result, time.process_time() - began


ATTACKER_PROMPTS = ["Tell me a story about a dragon.", "How do plants make food?", "What is the tallest mountain?",
                    "List four kinds of fruit."]

AUDIT_COLUMNS = [
    Column("view", "capture", numeric=False), Column("positions", "positions", "d"),
    Column("inversion_top1", "white-box inversion top-1", lambda v: f"{100 * v:.1f}%"),
    Column("probe_top1", "learned probe top-1", lambda v: f"{100 * v:.1f}%"),
    Column("public_tail_top1", "public tail on the downlink top-1", lambda v: f"{100 * v:.1f}%"),
]


def run_audit(args, servers: list[str]) -> int:
    from lambdasplit.shares.audit import audit_shares

    device = SharedDevice.load_shared(args.model, lm_head=args.lm_head == "shared", merge=parse_merge(args.merge))
    report = audit_shares(device, servers, prompts=PROMPTS[:max(2, args.prompts)], attacker_prompts=ATTACKER_PROMPTS,
                          max_new_tokens=args.new_tokens)
    rows = [{"view": view, **scores} for view, scores in report["attacks"].items()]
    meta = {"machine": machine(), "model": args.model, "report": report}
    chance = report["chance"]
    stat = report["stats"]
    notes = [f"chance: uniform {100 * chance['uniform']:.3f}%, always guessing the most common token "
             f"{100 * chance['most_common_token']:.1f}%",
             f"server 0's received bytes ({stat['bytes']}): chi-square vs uniform p = {stat['byte_chi2_p']:.3f}; "
             f"two prompts' share words, two-sample KS p = {stat['two_prompts_ks_p']:.3f}; same prompt twice: "
             f"{100 * stat['same_prompt_equal_words']:.4f}% identical words; corr(share, input) = "
             f"{stat['share_vs_input_correlation']:.4f}",
             describe_machine(meta["machine"])]
    title = f"Secret-shared mode, audit: {args.model}, {report['prompts']} prompts x {report['new_tokens']} tokens"
    if args.json:
        import json

        print(json.dumps({"rows": rows, "meta": meta}))
    else:
        print_table(rows, AUDIT_COLUMNS, title=title)
        for note in notes:
            print(note)
    if args.out:
        write_outputs(args.out, rows, AUDIT_COLUMNS, title=title, meta=meta, notes=notes)
    return 0


DIGIT_PROMPTS = ["a handwritten digit seven", "a handwritten digit three", "a handwritten digit zero",
                 "a handwritten digit five"]
IMAGE_COLUMNS = [
    Column("prompt", "prompt", numeric=False), Column("steps", "steps", "d"), Column("psnr_db", "PSNR vs unsplit (dB)", ".1f"),
    Column("seconds", "seconds / image", ".2f"), Column("round_trips_per_step", "round trips / step (each server)", ".0f"),
    Column("up_a", "A up / image (MB)", megabytes), Column("down_a", "A down / image (MB)", megabytes),
    Column("up_b", "B up / image (kB)", lambda v: f"{v / 1e3:.1f}"), Column("down_b", "B down / image (MB)", megabytes),
    Column("device_cpu_seconds", "device CPU (s)", ".2f"), Column("local_cpu_seconds", "local CPU (s)", ".2f"),
]


def run_images(args, servers: list[str]) -> int:
    """The digits model: each prompt's image over the shares servers against the unsplit pipeline."""
    import numpy as np

    from lambdasplit.diffusion.client import imagine
    from lambdasplit.diffusion.split import Device
    from lambdasplit.shares.unet import imagine_shared, load_device

    device = load_device(args.model)
    local = Device.load(args.model, with_unet=True)
    rows = []
    for prompt in DIGIT_PROMPTS[:max(1, args.prompts)]:
        began = time.process_time()
        reference = imagine(local, prompt, mode="local")
        local_cpu = time.process_time() - began
        result = imagine_shared(device, prompt, servers=servers)
        r = result.record
        mse = float(np.mean((result.image - reference.image) ** 2))
        rows.append({"prompt": prompt, "steps": r["steps"], "psnr_db": 10 * np.log10(1 / mse) if mse else float("inf"),
                     "seconds": r["seconds"], "round_trips_per_step": r["round_trips_per_step"],
                     "up_a": r["bytes_up_per_server"][0], "down_a": r["bytes_down_per_server"][0],
                     "up_b": r["bytes_up_per_server"][1], "down_b": r["bytes_down_per_server"][1],
                     "device_cpu_seconds": r["device_cpu_seconds"], "local_cpu_seconds": local_cpu})
    meta = {"machine": machine(), "model": args.model}
    title = f"Secret-shared U-Net: {args.model}"
    notes = [describe_machine(meta["machine"]), "PSNR of the [0, 1] image against the unsplit pipeline, same seed"]
    if args.json:
        import json

        print(json.dumps({"rows": rows, "meta": meta}))
    else:
        print_table(rows, IMAGE_COLUMNS, title=title, caption=notes[0])
    if args.out:
        write_outputs(args.out, rows, IMAGE_COLUMNS, title=title, meta=meta, notes=notes)
    return 0


def is_pipeline(model: str) -> bool:
    from lambdasplit.shares.service import _pipeline_info

    return _pipeline_info(model) is not None


def run(args) -> int:
    torch.set_num_threads(args.threads)
    from lambdasplit.server.process import ServerProcess

    prompts = PROMPTS[:max(1, min(args.prompts, len(PROMPTS)))]
    delays = [d.strip() for d in args.delays.split(",") if d.strip()]
    sources = [s.strip() for s in args.speculate.split(",") if s.strip()] or ["none"]
    started = []
    try:
        if args.servers:
            servers = parse_servers(args.servers)
        else:
            extra = [] if is_pipeline(args.model) else ["--shares-lm-head", args.lm_head, "--shares-merge", args.merge]
            for share in (0, 1):
                started.append(ServerProcess(["--model", args.model, "--component", "shares", "--share", str(share),
                                              *extra]).start())
            servers = [s.address for s in started]
        if args.audit:
            return run_audit(args, servers)
        if is_pipeline(args.model):
            return run_images(args, servers)
        device = SharedDevice.load_shared(args.model, lm_head=args.lm_head == "shared", merge=parse_merge(args.merge))
        local = DeviceModel.load(args.model)
        rows = []
        configs = [("loopback", None, s, prompts, args.new_tokens) for s in sources]
        for delay in delays:
            for s in (sources if delay == "20" else ["none"]):
                configs.append((f"{delay} ms", f"rate=1000mbit,delay={delay}ms", s,
                                prompts[:args.delay_prompts], args.delay_tokens))
        for label, link, source, which, tokens in configs:
            row = {"link": label, "speculate": source, "lm_head": args.lm_head,
                   "layers": "merged" if device.merge else "plain", "tokens": 0}
            sums = dict(seconds=0.0, up_a=0, down_a=0, up_b=0, down_b=0, rt=0, cpu=0.0, local_cpu=0.0, equal=0,
                        err=0.0, arithmetic=0.0, io=0.0)
            for prompt in which:
                if not args.json:
                    print(f"bench shared: {label}, speculate {source}: {prompt!r}", flush=True)
                reference, local_cpu = _local(local, prompt, tokens)
                record = run_shared(model=None, device=device, prompt=prompt, servers=servers, max_new_tokens=tokens,
                                    lm_head=args.lm_head, merge=device.merge, link=link, ignore_eos=True, speculate=source,
                                    keep_logits=source == "none", sampling=Sampling())
                n = record["new_tokens"]
                row["tokens"] += n
                sums["seconds"] += record["seconds"]
                hs_up, hs_down = record["handshake_bytes_up_per_server"], record["handshake_bytes_down_per_server"]
                sums["up_a"] += record["bytes_up_per_server"][0] - hs_up[0]
                sums["down_a"] += record["bytes_down_per_server"][0] - hs_down[0]
                sums["up_b"] += record["bytes_up_per_server"][1] - hs_up[1]
                sums["down_b"] += record["bytes_down_per_server"][1] - hs_down[1]
                sums["rt"] += record["round_trips"]
                single = max(1, record["single_row_requests"])
                per_step = record["round_trips"] / max(1, record["steps"])
                steady = [record["single_row_bytes_up_per_server"][0] / single * per_step,
                          record["single_row_bytes_down_per_server"][0] / single * per_step,
                          record["single_row_bytes_up_per_server"][1] / single * per_step]
                sums["cpu"] += record["device_cpu_seconds"]
                sums["arithmetic"] += record["device_arithmetic_cpu_seconds"]
                sums["io"] += record["device_io_cpu_seconds"]
                sums["local_cpu"] += local_cpu
                sums["equal"] += sum(a == b for a, b in zip(record["token_ids"], reference.token_ids))
                if "_logits" in record:
                    sums["err"] = max(sums["err"], max(float((a - b).nan_to_num(0).abs().max())
                                                       for a, b in zip(record["_logits"], reference.logits)))
            n = row["tokens"]
            row.update({
                "tokens_per_second": n / sums["seconds"], "round_trips_per_token": sums["rt"] / n,
                "up_a_per_token": sums["up_a"] / n, "down_a_per_token": sums["down_a"] / n,
                "up_b_per_token": sums["up_b"] / n, "down_b_per_token": sums["down_b"] / n,
                "device_cpu_ms_per_token": 1e3 * sums["cpu"] / n,
                "arithmetic_cpu_ms_per_token": 1e3 * sums["arithmetic"] / n, "io_cpu_ms_per_token": 1e3 * sums["io"] / n, "local_cpu_ms_per_token": 1e3 * sums["local_cpu"] / n,
                "device_cpu_percent_of_local": 100 * sums["cpu"] / sums["local_cpu"],
                "agreement": sums["equal"] / n,
                "max_logit_error": sums["err"] if source == "none" else None,
                "prompts": len(which),
                **({"steady_up_a": steady[0], "steady_down_a": steady[1], "steady_up_b": steady[2]}
                   if source == "none" and n > len(which) else {}),
            })
            rows.append(row)
        memory = {"device_weight_bytes": held_bytes([device.head.embed, device.tail.norm, *device.stack.layers,
                                                     *([device.stack.rotary] if device.stack.rotary else []),
                                                     *([] if device.lm_head_shared else [device.tail.lm_head])]),
                  "local_weight_bytes": held_bytes([local.head.embed, local.tail.norm, local.tail.lm_head,
                                                    *local.head.stack.layers])}
    finally:
        for server in started:
            server.stop()
    meta = {"machine": machine(), "model": args.model, "servers": "started here" if started else args.servers,
            "prompts": prompts, "memory": memory}
    title = f"Secret-shared mode: {args.model}, LM head {args.lm_head}"
    notes = [describe_machine(meta["machine"]),
             f"device weights in memory: {memory['device_weight_bytes'] / 1e6:.1f} MB shared mode vs "
             f"{memory['local_weight_bytes'] / 1e6:.1f} MB local (parameters and buffers; KV cache excluded, the same)",
             "A = share-0 server (gets x - r), B = share-1 server (gets a key once, then request headers, or one PLAN per decode step)"]
    if args.json:
        import json

        print(json.dumps({"rows": rows, "meta": meta}))
    else:
        print_table(rows, COLUMNS, title=title, caption=notes[0])
        print(notes[1])
    if args.out:
        out = write_outputs(args.out, rows, COLUMNS, title=title, meta=meta, notes=notes)
        chart(rows, out / "chart.png")
    return 0


def chart(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['link']}\n{r['speculate']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(labels, [r["tokens_per_second"] for r in rows], color="tab:blue")
    left.set_ylabel("tokens / s")
    left.set_title("shared mode throughput")
    right.bar(labels, [r["device_cpu_percent_of_local"] for r in rows], color="tab:orange")
    right.axhline(20, color="k", linestyle="--", linewidth=1, label="goal: 20% of local")
    right.set_ylabel("device CPU, % of local")
    right.set_title("device compute per token")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_args(args) -> None:
    if args.new_tokens < 1 or args.delay_tokens < 1:
        raise LambdaSplitError("--new-tokens and --delay-tokens must be >= 1")
