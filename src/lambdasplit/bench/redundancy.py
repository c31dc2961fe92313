"""`lambdasplit bench redundancy`: what --verify and a failover cost, against real server processes.

Three rows, each the same greedy generation from this process (head and tail here, the
body in `lambdasplit serve` processes on loopback):

    one server   --server A
    verify       --server A,B --verify: every step to both, answers compared
    failover     --server V,B with V killed (SIGKILL) after --kill-after tokens: B takes
                 over with one replay STEP of everything sent so far

Each row reports wall seconds, tokens/s, socket bytes up and down, round trips, the
failovers, and whether its token ids equal the one-server row's. `link` (wire/link.py, e.g.
"wan") emulates a network on every session, so round trips cost what they would over it.
"""

from __future__ import annotations

import os
import signal
import statistics

from lambdasplit.bench.report import Column, machine, megabytes

COLUMNS = [
    Column("row", "row", numeric=False),
    Column("servers", "servers that served", lambda v: ", ".join(v), numeric=False),
    Column("seconds", "seconds", ".2f"),
    Column("tokens_per_s", "tokens/s", ".2f"),
    Column("x_one_server", "time x one server", ".2f"),
    Column("bytes_up", "MB up", megabytes),
    Column("bytes_down", "MB down", megabytes),
    Column("round_trips", "round trips", "d"),
    Column("failovers", "failovers", "d"),
    Column("replayed_positions", "positions replayed", "d"),
    Column("verify_max_difference", "verify max rel. diff", ".1e"),
    Column("same_ids", "ids = one server", lambda v: "yes" if v else "NO", numeric=False),
]


def run_redundancy_bench(*, model: str, split: str, prompt: str, new_tokens: int, codec: str, kill_after: int,
                         repeats: int, threads: int, link: str | None = None, progress: bool = True) -> dict:
    import torch

    from lambdasplit.client.device import DeviceModel
    from lambdasplit.client.generation import Sampling
    from lambdasplit.client.run import run_generation
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.server.process import ServerProcess

    if not 0 < kill_after < new_tokens:
        raise LambdaSplitError(f"--kill-after must be between 1 and --new-tokens - 1, got {kill_after}")
    torch.set_num_threads(threads)
    env = {"OMP_NUM_THREADS": str(threads)}
    device = DeviceModel.load(model, split)
    serve_args = ["--model", model, "--layers", f"{device.split[0]}:{device.split[1]}"]
    common = dict(model=model, mode="split", split=split, prompt=prompt, max_new_tokens=new_tokens,
                  sampling=Sampling(), codec=codec, ignore_eos=True, device=device, link=link)
    say = print if progress else (lambda *a, **k: None)
    runs: dict[str, list[dict]] = {"one server": [], "verify": [], "failover": []}
    with ServerProcess(serve_args, env=env) as a, ServerProcess(serve_args, env=env) as b:
        run_generation(server=a.address, **{**common, "max_new_tokens": 2})  # warm both servers and this process
        run_generation(server=b.address, **{**common, "max_new_tokens": 2})
        for repeat in range(repeats):
            say(f"repeat {repeat + 1}/{repeats}: one server, verify, failover", flush=True)
            runs["one server"].append(run_generation(server=a.address, **common))
            runs["verify"].append(run_generation(server=f"{a.address},{b.address}", verify=True, **common))
            with ServerProcess(serve_args, env=env) as victim:
                run_generation(server=victim.address, **{**common, "max_new_tokens": 2})
                pieces = []

                def kill_mid_generation(piece: str) -> None:
                    pieces.append(piece)
                    if len(pieces) == kill_after:
                        os.kill(victim.process.pid, signal.SIGKILL)
                        victim.process.wait(30)

                record = run_generation(server=f"{victim.address},{b.address}", on_text=kill_mid_generation, **common)
                record["servers"] = ["V (killed)" if s == victim.address else "B" for s in record["servers"]]
                runs["failover"].append(record)
    baseline = runs["one server"]
    base_seconds = statistics.median(r["seconds"] for r in baseline)
    base_positions = baseline[0]["prompt_tokens"] + baseline[0]["new_tokens"] - 1
    rows = []
    for name, records in runs.items():
        middle = sorted(records, key=lambda r: r["seconds"])[len(records) // 2]
        seconds = middle["seconds"]
        servers = middle["servers"] if name == "failover" else (["A", "B"] if name == "verify" else ["A"])
        per_server_payload = middle["payload_bytes"]
        base_payload = baseline[0]["payload_bytes"]
        rows.append({
            "row": name, "servers": servers, "seconds": seconds, "tokens_per_s": middle["new_tokens"] / seconds,
            "x_one_server": seconds / base_seconds, "bytes_up": middle["bytes_up"], "bytes_down": middle["bytes_down"],
            "round_trips": middle["round_trips"], "failovers": middle["failovers"],
            # payload bytes are proportional to positions sent (uninterrupted: prompt + new tokens - 1)
            "replayed_positions": round((per_server_payload - base_payload) / base_payload * base_positions)
            if name == "failover" else 0,
            "verify_max_difference": middle.get("verify_max_difference"),
            "same_ids": all(r["token_ids"] == baseline[0]["token_ids"] for r in records),
            "seconds_all": [r["seconds"] for r in records],
        })
    meta = {"model": model, "split": f"{device.split[0]}:{device.split[1]}", "new_tokens": new_tokens,
            "codec": codec, "link": link, "kill_after": kill_after, "repeats": repeats, "prompt": prompt, "machine": machine(),
            "verify_tolerance": runs["verify"][0].get("verify_tolerance")}
    return {"rows": rows, "meta": meta}


def write_chart(path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [r["tokens_per_s"] for r in rows], color=["tab:blue", "tab:orange", "tab:green"])
    left.set_ylabel("tokens / s")
    left.set_title("speed")
    right.bar(names, [r["bytes_up"] / 1e6 for r in rows], color=["tab:blue", "tab:orange", "tab:green"])
    right.set_ylabel("MB up (all servers)")
    right.set_title("uplink bytes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
