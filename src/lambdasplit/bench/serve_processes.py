"""`lambdasplit bench serve --process-clients N,...`: real `generate` client processes against `serve`.

Unlike the engine rows of bench/serve.py (lightweight in-process clients), these rows
are what a deployment sees: one `lambdasplit serve` process (its engine batching), and N
`lambdasplit generate --json` processes started together, each loading its own head and
tail, tokenizing, sampling and talking over loopback sockets; in split mode and in cloud
mode (`serve --cloud`, the whole model on the server). On a 2-core machine the clients
themselves take CPU from the server, so these rows bound what batching can show here.

Per N: aggregate tokens/s = N x new tokens / (last client's end - first client's
generation start), how much the clients' generation intervals overlapped (1.0: all ran
the whole time together), the mean and worst per-client ms per token, and whether every
client's token ids equal the one-client run's for the same prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from lambdasplit.bench.report import Column

PROCESS_COLUMNS = [
    Column("mode", "mode", numeric=False),
    Column("clients", "client processes", "d"),
    Column("tokens_per_s", "tokens/s (aggregate)", ".2f"),
    Column("speedup", "x one client", ".2f"),
    Column("overlap", "overlap", ".2f"),
    Column("ms_per_token_mean", "ms/token (mean client)", ".0f"),
    Column("ms_per_token_max", "ms/token (worst client)", ".0f"),
    Column("ids_equal", "ids = one client", lambda v: "yes" if v else "NO", numeric=False),
]


def _client_command(model, mode, split, server, prompt, new_tokens) -> list[str]:
    command = [sys.executable, "-m", "lambdasplit", "generate", "--model", model, "--mode", mode, "--server", server,
               "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--ignore-eos", "--json"]
    return command + (["--split", split] if mode == "split" else [])


def _run_clients(commands: list[list[str]], env: dict) -> list[dict]:
    """Start every client at once; each record gains `ended` (wall clock) and `began` (= ended - seconds)."""
    records: list[dict | None] = [None] * len(commands)
    errors: list[str] = []

    def wait(i, process):
        stdout, stderr = process.communicate()
        ended = time.time()
        if process.returncode != 0:
            errors.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {process.returncode}")
            return
        record = json.loads(stdout)
        record["ended"], record["began"] = ended, ended - record["seconds"]
        records[i] = record

    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for c in commands]
    threads = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        from lambdasplit.errors import LambdaSplitError

        raise LambdaSplitError(f"a benchmark client failed: {errors[0]}")
    return records


def run_process_clients(*, model: str, split: str, counts: list[int], modes: list[str], new_tokens: int,
                        max_batch: int, prefill_chunk: int, threads: int, prompts: list[str],
                        progress: bool = True) -> list[dict]:
    import os

    from lambdasplit.server.process import ServerProcess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    serve_args = ["--model", model, "--layers", split, "--cloud", "--max-batch", str(max_batch),
                  "--prefill-chunk", str(prefill_chunk)]
    rows = []
    with ServerProcess(serve_args, env={"OMP_NUM_THREADS": str(threads)}) as server:
        for mode in modes:
            solo_ids: dict[str, list[int]] = {}
            solo_rate = None
            for n in counts:
                chosen = [prompts[i % len(prompts)] for i in range(n)]
                records = _run_clients([_client_command(model, mode, split, server.address, p, new_tokens)
                                        for p in chosen], env)
                for prompt, record in zip(chosen, records):
                    solo_ids.setdefault(prompt, record["token_ids"])
                began, ended = min(r["began"] for r in records), max(r["ended"] for r in records)
                together = max(0.0, min(r["ended"] for r in records) - max(r["began"] for r in records))
                rate = sum(r["new_tokens"] for r in records) / (ended - began)
                solo_rate = solo_rate or (rate if n == 1 else None)
                per_token = [1000 * r["seconds"] / max(1, r["new_tokens"]) for r in records]
                row = {"mode": mode, "clients": n, "tokens_per_s": rate, "speedup": rate / solo_rate if solo_rate else None,
                       "overlap": together / (ended - began), "ms_per_token_mean": sum(per_token) / n,
                       "ms_per_token_max": max(per_token),
                       "ids_equal": all(r["token_ids"] == solo_ids[p] for p, r in zip(chosen, records))}
                rows.append(row)
                if progress:
                    print(f"  {mode}: {n} client processes, {rate:.2f} tokens/s, overlap {row['overlap']:.2f}",
                          flush=True)
    return rows
