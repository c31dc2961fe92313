"""`lambdasplit bench serve`: what batching many sessions' steps buys a body server.

The engine (lambdasplit.engine) runs in this process; N lightweight clients replay real
traces through it at once. A trace is a real prompt's head output (the chat prompts of
the privacy audit, cycled) and the head outputs of the tokens the split model generates
for it greedily, precomputed once, so the clients cost nothing (no head, tail or LM head
on this machine's two cores while measuring) and the body does exactly the work of a
real generation. Each client submits its prefill, then each decode step the moment the
previous one returns (from the engine's result callback, no client threads).

Per N: aggregate tokens/s (N x new tokens / wall time, prefills included), decode
tokens/s (decode steps finished once every session has its first token, over that
time: what batching buys in the steady state), per-token latency p50/p99 (decode
step submit -> result), time to first token (prefill submit -> result), mean batch size
(rows per forward, from the engine's metrics), admission wait, and, computed after the
timed run by the tail: the largest logit difference from the same trace served alone
through the unbatched Body path, and whether every greedy token id is the solo one.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from importlib import resources

import torch

from lambdasplit.bench.report import Column, machine
from lambdasplit.engine import Engine

COLUMNS = [
    Column("clients", "clients", "d"),
    Column("max_batch", "max batch", "d"),
    Column("tokens_per_s", "tokens/s", ".1f"),
    Column("speedup", "x one session", ".2f"),
    Column("decode_tokens_per_s", "decode tokens/s", ".1f"),
    Column("decode_speedup", "decode x one", ".2f"),
    Column("latency_p50_ms", "token p50 ms", ".1f"),
    Column("latency_p99_ms", "token p99 ms", ".1f"),
    Column("ttft_ms", "TTFT ms (mean)", ".0f"),
    Column("mean_batch", "mean batch", ".2f"),
    Column("forward_ms", "forward ms (mean)", ".1f"),
    Column("admission_wait_ms", "admission wait ms", ".1f"),
    Column("max_logit_diff", "max logit diff vs solo", ".1e"),
    Column("ids_equal", "ids = solo", lambda v: "yes" if v else "NO", numeric=False),
]


def audit_prompts() -> list[str]:
    text = resources.files("lambdasplit.audit.data").joinpath("prompts.json").read_text()
    return json.loads(text)["prompts"]


def prepare_traces(model: str, split: str, prompts: list[str], new_tokens: int, dtype: str = "float32"):
    """(device, body, traces): per prompt the body's inputs and its solo, unbatched outputs."""
    from lambdasplit.client.device import DeviceModel
    from lambdasplit.llm.segments import load_body

    device = DeviceModel.load(model, split, dtype)
    x, y = device.split
    body = load_body(device.checkpoint, x, y, dtype)
    traces = []
    for prompt in prompts:
        prompt_ids = device.encode(prompt)
        result = device.generate(prompt_ids, body=body.fork(), max_new_tokens=new_tokens, ignore_eos=True)
        ids = torch.tensor([prompt_ids + result.token_ids[:-1]])
        with torch.inference_mode():
            hidden = device.head.fork().forward(ids, 0)
        inputs = [hidden[:, :len(prompt_ids)]] + [hidden[:, i:i + 1] for i in range(len(prompt_ids), ids.shape[1])]
        solo, start, outputs = body.fork(), 0, []
        for piece in inputs:  # the session served alone, step by step, without the engine
            outputs.append(solo.forward(piece, start))
            start += piece.shape[1]
        traces.append({"prompt_tokens": len(prompt_ids), "inputs": inputs, "outputs": outputs})
    return device, body, traces


def run_clients(engine: Engine, traces: list[dict], clients: int, timeout: float = 3600.0) -> dict:
    """N clients replaying traces (cycled) through a running engine, all at once."""
    m = engine.metrics
    before = {k: m.value(f"lambdasplit_engine_{k}") for k in ("rows_total", "batches_total", "forward_seconds_sum")}
    wait_before = (m.value("lambdasplit_engine_admission_wait_seconds_sum"),
                   m.value("lambdasplit_engine_admission_wait_seconds_count"))
    latencies, ttfts, outputs, finished_at = [], [], {}, []  # finished_at: (time, was the prefill)
    done = threading.Semaphore(0)
    errors = []
    lock = threading.Lock()

    def start_client(index, trace):
        outputs[index] = (trace, [])
        total = sum(p.shape[1] for p in trace["inputs"])
        session = engine.open_session(client="bench", max_positions=total)
        state = {"step": 0, "start": 0}

        def submit():
            piece = trace["inputs"][state["step"]]
            state["submitted"] = time.perf_counter()
            future = session.submit(state["start"], piece)
            future.add_done_callback(on_result)

        def on_result(future):
            now = time.perf_counter()
            try:
                out = future.result()
            except Exception as error:  # noqa: BLE001 - reported after the run
                errors.append(error)
                session.close()
                done.release()
                return
            step = state["step"]
            with lock:
                (ttfts if step == 0 else latencies).append(now - state["submitted"])
                finished_at.append((now, step == 0))
                outputs[index][1].append(out)
            state["start"] += trace["inputs"][step].shape[1]
            state["step"] = step + 1
            if state["step"] == len(trace["inputs"]):
                session.close()
                done.release()
            else:
                submit()

        submit()

    began = time.perf_counter()
    for i in range(clients):
        start_client(i, traces[i % len(traces)])
    for _ in range(clients):
        if not done.acquire(timeout=timeout):
            raise TimeoutError(f"{clients} clients did not finish within {timeout} s")
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    new_tokens = len(traces[0]["inputs"])  # prefill -> first token, then one token per decode step
    rows = m.value("lambdasplit_engine_rows_total") - before["rows_total"]
    batches = m.value("lambdasplit_engine_batches_total") - before["batches_total"]
    wait_sum = m.value("lambdasplit_engine_admission_wait_seconds_sum") - wait_before[0]
    wait_count = m.value("lambdasplit_engine_admission_wait_seconds_count") - wait_before[1]
    ordered = sorted(latencies)
    # The decode phase: from the moment every session has its first token to the end.
    last_prefill = max(t for t, prefill in finished_at if prefill)
    end = max(t for t, _ in finished_at)
    decode_tokens = sum(1 for t, prefill in finished_at if not prefill and t > last_prefill)
    return {
        "clients": clients, "new_tokens": new_tokens, "seconds": wall,
        "tokens_per_s": clients * new_tokens / wall,
        "decode_tokens_per_s": decode_tokens / (end - last_prefill) if decode_tokens else None,
        "latency_p50_ms": 1e3 * statistics.median(ordered) if ordered else None,
        "latency_p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
        "ttft_ms": 1e3 * statistics.fmean(ttfts),
        "mean_batch": rows / batches if batches else 0.0,
        "forwards": int(batches),
        "forward_ms": 1e3 * (m.value("lambdasplit_engine_forward_seconds_sum") - before["forward_seconds_sum"]) / batches,
        "admission_wait_ms": 1e3 * wait_sum / wait_count if wait_count else 0.0,
        "outputs": outputs,
    }


def compare_with_solo(tail, outputs: dict) -> tuple[float, bool]:
    """Largest |logit - solo logit| over every generated position, and whether all greedy ids agree."""
    worst, same = 0.0, True
    with torch.inference_mode():
        for trace, got in outputs.values():
            n = trace["prompt_tokens"]
            batched = tail.fork().forward(torch.cat(got, dim=1), 0, last_only=False)[0, n - 1:]
            solo = tail.fork().forward(torch.cat(trace["outputs"], dim=1), 0, last_only=False)[0, n - 1:]
            worst = max(worst, float((batched - solo).abs().max()))
            same = same and bool(torch.equal(batched.argmax(-1), solo.argmax(-1)))
    return worst, same


def run_serve_bench(*, model: str, split: str, clients: list[int], new_tokens: int, max_batch: int,
                    prefill_chunk: int, dtype: str = "float32", threads: int = 1, unbatched: bool = False,
                    breakdown: bool = False, progress: bool = True) -> dict:
    """One row per N; with `unbatched`, also one per N with max_batch=1 (one step per forward,
    like a server without the engine, but in one thread)."""
    torch.set_num_threads(threads)
    prompts = audit_prompts()[:max(clients)]
    if progress:
        print(f"preparing {len(prompts)} traces of {new_tokens} tokens (solo runs, unbatched) ...", flush=True)
    device, body, traces = prepare_traces(model, split, prompts, new_tokens, dtype)
    info = machine()  # the load average at the start of the measurements
    rows = []
    for batch in [max_batch] + ([1] if unbatched and max_batch != 1 else []):
        with Engine(body.stack, max_batch=batch, prefill_chunk=prefill_chunk) as engine:
            run_clients(engine, traces, 1)  # warm-up (allocator, first-call costs)
            for n in clients:
                row = {"max_batch": batch, **run_clients(engine, traces, n)}
                row["max_logit_diff"], row["ids_equal"] = compare_with_solo(device.tail, row.pop("outputs"))
                rows.append(row)
                if progress:
                    print(f"  {n:3d} clients, max batch {batch}: {row['tokens_per_s']:7.1f} tokens/s, "
                          f"mean batch {row['mean_batch']:.2f}", flush=True)
    breakdown_rows = forward_breakdown(body.stack, traces, clients) if breakdown else None
    solo = next((r for r in rows if r["clients"] == 1 and r["max_batch"] == max_batch), None)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / solo["tokens_per_s"] if solo else None
        row["decode_speedup"] = (row["decode_tokens_per_s"] / solo["decode_tokens_per_s"]
                                 if solo and solo["decode_tokens_per_s"] and row["decode_tokens_per_s"] else None)
    x, y = device.split
    config = device.checkpoint.config
    meta = {
        "model": model, "split": f"{x}:{y}", "body_layers": y - x, "hidden_size": config.hidden_size,
        "new_tokens": new_tokens, "max_batch": max_batch, "prefill_chunk": prefill_chunk, "dtype": dtype,
        "prompt_tokens": [t["prompt_tokens"] for t in traces], "machine": info, "machine_after": machine(),
    }
    return {"rows": rows, "meta": meta, "breakdown": breakdown_rows}


def write_chart(path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unbatched = [r for r in rows if r["max_batch"] == 1 and rows[0]["max_batch"] != 1]
    rows = [r for r in rows if r["max_batch"] == rows[0]["max_batch"]]
    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(clients, [r["tokens_per_s"] for r in rows], "o-", label="engine (batched)")
    if unbatched:
        left.plot([r["clients"] for r in unbatched], [r["tokens_per_s"] for r in unbatched], "x--",
                  label="max batch 1 (one step per forward)")
    if rows and rows[0]["clients"] == 1:
        left.plot(clients, [rows[0]["tokens_per_s"] * c for c in clients], ":", color="gray", label="linear in clients")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("aggregate tokens / s")
    left.set_title("throughput")
    left.legend()
    right.plot(clients, [r["latency_p50_ms"] for r in rows], "o-", label="p50")
    right.plot(clients, [r["latency_p99_ms"] for r in rows], "s--", label="p99")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("per-token latency, ms")
    right.set_title("latency")
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BREAKDOWN_COLUMNS = [
    Column("rows", "decode rows", "d"),
    Column("wall_ms", "forward ms", ".1f"),
    Column("per_row_ms", "ms per row", ".2f"),
    Column("linear_ms", "linear ms", ".1f"),
    Column("attention_ms", "attention ms", ".1f"),
    Column("cache_ms", "KV cat/pad ms", ".1f"),
    Column("other_ops_ms", "other ops ms", ".1f"),
    Column("outside_ops_ms", "outside ops ms", ".1f"),
]

_LINEAR_OPS = {"aten::addmm", "aten::mm", "aten::mv", "aten::bmm", "aten::matmul", "aten::linear"}
_CACHE_OPS = {"aten::cat", "aten::constant_pad_nd", "aten::pad_sequence"}


def _category(op: str) -> str:
    if op in _LINEAR_OPS:
        return "linear_ms"
    if "scaled_dot_product" in op or "softmax" in op:
        return "attention_ms"
    if op in _CACHE_OPS:
        return "cache_ms"
    return "other_ops_ms"


def forward_breakdown(stack, traces: list[dict], counts: list[int], repeats: int = 3) -> list[dict]:
    """Where one batched decode forward of N rows spends its time (torch.profiler, CPU).

    Sessions are prefilled with the traces' prompts, then `repeats` decode forwards of N
    rows are profiled; op self-times are grouped (linear algebra, attention, KV-cache
    concatenation and padding, other ops), and "outside ops" is wall time minus all op
    time: Python and dispatch overhead. The profiler adds overhead of its own.
    """
    from torch.profiler import ProfilerActivity, profile

    from lambdasplit.engine import PackedStack, Row

    packed = PackedStack(stack)
    rows_out = []
    for n in counts:
        chosen = [traces[i % len(traces)] for i in range(n)]
        sessions = [packed.new_session() for _ in chosen]
        for session, trace in zip(sessions, chosen):
            packed.forward([Row(session, 0, trace["inputs"][0])])
        step = 1
        packed.forward([Row(s, s.length, t["inputs"][step]) for s, t in zip(sessions, chosen)])  # warm-up
        totals = {c.key: 0.0 for c in BREAKDOWN_COLUMNS[3:7]}
        wall = 0.0
        for _ in range(repeats):
            step += 1
            rows = [Row(s, s.length, t["inputs"][min(step, len(t["inputs"]) - 1)]) for s, t in zip(sessions, chosen)]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                began = time.perf_counter()
                packed.forward(rows)
                wall += time.perf_counter() - began
            for event in prof.key_averages():
                totals[_category(event.key)] += event.self_cpu_time_total / 1e3
        row = {"rows": n, "wall_ms": 1e3 * wall / repeats}
        row.update({k: v / repeats for k, v in totals.items()})
        row["outside_ops_ms"] = max(0.0, row["wall_ms"] - sum(row[k] for k in totals))
        row["per_row_ms"] = row["wall_ms"] / n
        rows_out.append(row)
    return rows_out
