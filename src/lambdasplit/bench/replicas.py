"""`lambdasplit bench replicas`: aggregate tokens/s through `serve --ray` with 1, 2, ... replicas.

For each replica count a real `serve --ray --replicas R` process (a local Ray cluster,
the router on loopback) is started; N client threads in this process each open a real
session through the router and replay a precomputed trace (bench/serve.py: a real
prompt's head outputs and those of its greedy tokens), each step sent the moment the
previous result arrives. tokens/s = N x new tokens / wall time. Every result is compared
with the same trace served alone through the unbatched Body (max abs difference of the
body's output, fp32: 0 or float noise of batching).
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from lambdasplit.bench.report import Column, machine
from lambdasplit.bench.serve import audit_prompts, prepare_traces

COLUMNS = [
    Column("replicas", "replicas", "d"),
    Column("clients", "clients", "d"),
    Column("tokens_per_s", "tokens/s", ".1f"),
    Column("speedup", "x 1 replica", ".2f"),
    Column("latency_p50_ms", "step p50 ms", ".1f"),
    Column("latency_p99_ms", "step p99 ms", ".1f"),
    Column("startup_s", "startup s", ".0f"),
    Column("max_diff", "max diff vs solo", ".1e"),
]


def replay(device, address: str, trace: dict, latencies: list, diffs: list) -> None:
    from lambdasplit.client import RemoteBody

    with RemoteBody.for_device(device, address) as body:
        start = 0
        for piece, solo in zip(trace["inputs"], trace["outputs"]):
            began = time.perf_counter()
            out = body.forward(piece, start)
            latencies.append(time.perf_counter() - began)
            diffs.append(float((out - solo).abs().max()))
            start += piece.shape[1]


def run_clients(device, address: str, traces: list[dict], clients: int) -> dict:
    latencies, diffs, errors = [], [], []

    def one(i):
        try:
            replay(device, address, traces[i % len(traces)], latencies, diffs)
        except Exception as error:  # reported below: a failed session must not pass as a fast one
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    new_tokens = len(traces[0]["inputs"])
    decode = sorted(latencies)
    return {"clients": clients, "tokens_per_s": clients * new_tokens / wall, "seconds": wall,
            "latency_p50_ms": 1e3 * statistics.median(decode),
            "latency_p99_ms": 1e3 * decode[min(len(decode) - 1, int(0.99 * len(decode)))],
            "max_diff": max(diffs)}


def run_replicas_bench(*, model: str, split: str, replicas: list[int], clients: list[int], new_tokens: int,
                       replica_cpus: float = 1.0, ray_num_cpus: int | None = None, progress: bool = True) -> dict:
    from lambdasplit.server.process import ServerProcess

    torch.set_num_threads(1)
    prompts = audit_prompts()[:max(clients)]
    if progress:
        print(f"preparing {len(prompts)} traces of {new_tokens} tokens (solo runs) ...", flush=True)
    device, _, traces = prepare_traces(model, split, prompts, new_tokens)
    info = machine()
    rows = []
    for count in replicas:
        cpus = ray_num_cpus or max(1, int(count * replica_cpus + 0.999))
        args = ["--model", model, "--layers", split, "--ray", "--replicas", str(count), "--ray-num-cpus", str(cpus),
                "--replica-cpus", str(replica_cpus)]
        began = time.perf_counter()
        with ServerProcess(args, timeout=600, env={"RAY_USAGE_STATS_ENABLED": "0"}) as server:
            startup = time.perf_counter() - began
            run_clients(device, server.address, traces, 1)  # warm-up: first calls in each replica
            for n in clients:
                row = {"replicas": count, "startup_s": startup, **run_clients(device, server.address, traces, n)}
                rows.append(row)
                if progress:
                    print(f"  {count} replicas, {n:3d} clients: {row['tokens_per_s']:7.1f} tokens/s", flush=True)
    for row in rows:
        one = next((r for r in rows if r["replicas"] == replicas[0] and r["clients"] == row["clients"]), None)
        row["speedup"] = row["tokens_per_s"] / one["tokens_per_s"] if one else None
    x, y = device.split
    meta = {"model": model, "split": f"{x}:{y}", "new_tokens": new_tokens, "replica_cpus": replica_cpus,
            "prompt_tokens": [t["prompt_tokens"] for t in traces], "machine": info, "machine_after": machine()}
    return {"rows": rows, "meta": meta}


def write_chart(path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for count in sorted({r["replicas"] for r in rows}):
        mine = [r for r in rows if r["replicas"] == count]
        ax.plot([r["clients"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=f"{count} replicas")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("aggregate tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
