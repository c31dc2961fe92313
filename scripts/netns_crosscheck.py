#!/usr/bin/env python3
"""Cross-check the transport's link emulation against the kernel's own traffic shaping.

Needs root (network namespaces) and `ip` / `tc` (iproute2). It runs the same
`lambdasplit bench llm` rows twice and compares the times:

    kernel     the device side in namespace lsx-dev, the server in lsx-srv, joined by a
               veth pair whose two ends are shaped by `tc qdisc ... tbf` (uplink rate on
               the device end, downlink rate on the server end). This kernel has tbf but
               no netem, so one-way delay comes from a small relay in lsx-srv that holds
               every chunk for `delay` in each direction before passing it on.
    emulated   plain loopback in this namespace, with `--link up=...,down=...,delay=...`
               (wire/link.py, in user space).

Usage (as root, from the repository):

    .venv/bin/python scripts/netns_crosscheck.py                       # 10 Mbit/s, no delay: rate-dominated
    .venv/bin/python scripts/netns_crosscheck.py --rate 100mbit --delay 20ms --caches kv
    .venv/bin/python scripts/netns_crosscheck.py --out /tmp/netns      # also writes crosscheck.json

The default workload: a random-weight Llama (D = 256, 3 layers, built once into the
lambdasplit cache), a 1000-token prompt, 4 tokens without caching (4.1 MB of hidden
states in 4 large frames), so that the link, not compute, dominates the time: compute speed varies a lot when other jobs load the machine, link
time does not. (A first attempt with D = 1024 and a 200-token prompt was compute-bound
under load: communication agreed within 4%, total time did not.) Namespaces, links and processes are removed at
exit, also on errors.

Note on bytes: tbf counts whole Ethernet frames (payload + 66 bytes of Ethernet, IP and
TCP headers per 1448-byte segment, about 4.6% more), and so does the emulator
(Link.wire_bytes). What the emulator does not count: the ACKs, which share the reverse
link under tbf (66 bytes per ACK, one ACK per two segments: about 23 KB per MB delivered).

Limits of the comparison (docs/benchmarks.md says the same):
- The relay adds its delay outside TCP: each hop (device <-> relay, relay <-> server) has
  loopback-like round trips, so TCP's ACK clock, window growth and retransmissions never
  see the delay. It is a fair check of delay added per request/response, not of TCP
  over a long fat pipe.
- The emulator has no congestion window and no slow start: a frame goes out at the link
  rate from its first byte. On a real path with a large RTT, the first frames of a
  connection (and frames after idle periods) are slower than it predicts.
- tbf refills its bucket while the link idles (see setup()); the emulator has no bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEV, SRV = "lsx-dev", "lsx-srv"
DEV_IF, SRV_IF = "lsxd", "lsxs"
DEV_IP, SRV_IP = "10.77.0.1", "10.77.0.2"
RELAY_PORT = 9077


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


# ---------------------------------------------------------------- the delaying relay
async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy bytes one way, each chunk held for `delay` (order kept: a queue, one writer)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def release() -> None:
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                writer.close()
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    releaser = asyncio.create_task(release())
    try:
        while chunk := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, chunk))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    await releaser


async def _relay(listen: str, target: str, delay: float) -> None:
    host, port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        for w in (client_writer, server_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(client_reader, server_writer, delay), _pump(server_reader, client_writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, host, int(port))
    print(f"relay {listen} -> {target}, delay {delay * 1e3:g} ms each way", flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- namespaces
def setup(rate_up: str, rate_down: str) -> None:
    teardown()
    sh("ip", "netns", "add", DEV)
    sh("ip", "netns", "add", SRV)
    sh("ip", "link", "add", DEV_IF, "netns", DEV, "type", "veth", "peer", "name", SRV_IF, "netns", SRV)
    for ns, dev, ip in ((DEV, DEV_IF, DEV_IP), (SRV, SRV_IF, SRV_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    # Egress shaping on each end: the device end shapes the uplink, the server end the downlink.
    # A small bucket (two packets): tbf refills it whenever the link idles (here: during every
    # compute step), and each refill lets that many bytes through at line rate, faster than
    # the emulator, which has no bucket. With a 6 KB bucket and 40 small steps that made the
    # kernel 25% faster than the nominal rate.
    for ns, dev, rate in ((DEV, DEV_IF, rate_up), (SRV, SRV_IF, rate_down)):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
           "rate", rate, "burst", "3kb", "latency", "400ms")


def teardown() -> None:
    for ns in (DEV, SRV):
        sh("ip", "netns", "del", ns, check=False)


def start(ns: str, args: list[str], ready: str, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """Start `args` in namespace `ns`, wait for a line starting with `ready`; returns (process, that line)."""
    process = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(ready):
            # Keep reading its output (as lambdasplit.server.process.ServerProcess does): a
            # process writing to a full, unread pipe blocks, and a blocked server stalls the runs.
            threading.Thread(target=_drain, args=(process,), daemon=True).start()
            return process, line
    process.kill()
    raise RuntimeError(f"{args[:4]} did not start:\n" + "".join(lines))


def _drain(process: subprocess.Popen) -> None:
    for _ in process.stdout:
        pass


def bench(ns: str | None, model: str, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    command = [PYTHON, "-m", "lambdasplit", "bench", "llm", "--model", model, "--splits", args.splits,
               "--configs", "split", "--caches", args.caches, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--codec", args.codec, "--json", *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if ns:
        command = ["ip", "netns", "exec", ns, *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bench failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)["rows"]


def crosscheck(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip"):
        print("netns_crosscheck needs root and iproute2 (ip, tc)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))
    from lambdasplit.bench.llm import resolve_splits
    from lambdasplit.bench.overhead import build_wide_model
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.wire.link import parse_delay, parse_rate

    up, down = args.up or args.rate, args.down or args.rate
    try:  # the --link parser's own rules (a bare number is refused: which unit?), before any setup
        parse_rate(up), parse_rate(down)
        delay_s = parse_delay(args.delay)
    except LambdaSplitError as error:
        print(f"netns_crosscheck: {error}", file=sys.stderr)
        return 2
    model = str(build_wide_model(args.hidden, args.layers))
    processes = []
    try:
        setup(up, down)
        serve = [PYTHON, "-m", "lambdasplit", "serve", "--port", "0", "--model", model]
        for split in resolve_splits(args.splits, args.layers):
            serve += ["--layers", split]
        env_threads = ["env", f"OMP_NUM_THREADS={args.threads}"] if args.threads else []
        server, line = start(SRV, [*env_threads, *serve], "listening on ")
        processes.append(server)
        address = line.split("listening on ", 1)[1].strip()
        relay, _ = start(SRV, [PYTHON, str(Path(__file__).resolve()), "relay", "--listen", f"{SRV_IP}:{RELAY_PORT}",
                                "--to", address, "--delay", str(delay_s)], "relay ")
        processes.append(relay)
        results = []
        for attempt in range(args.repeats):
            kernel = bench(DEV, model, args, ["--server", f"{SRV_IP}:{RELAY_PORT}"])
            emulated = bench(None, model, args, ["--link", f"up={up},down={down},delay={args.delay}"])
            for k, e in zip(kernel, emulated):
                results.append({
                    "attempt": attempt, "split": k["split"], "cache": k["cache"],
                    "bytes_up": e["bytes_up"], "bytes_down": e["bytes_down"], "round_trips": e["round_trips"],
                    "kernel_total_s": k["total_s"], "emulated_total_s": e["total_s"],
                    "kernel_comm_s": k["comm_s"], "emulated_comm_s": e["comm_s"],
                    "difference_pct": 100 * (e["total_s"] - k["total_s"]) / k["total_s"],
                    "comm_difference_pct": 100 * (e["comm_s"] - k["comm_s"]) / k["comm_s"],
                })
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        teardown()

    from rich.console import Console
    from rich.table import Table

    title = (f"kernel (veth + tbf {up} up / {down} down, relay delay {args.delay}) vs emulated (--link), "
             f"D={args.hidden}, {args.prompt_tokens} -> {args.new_tokens} tokens, {args.codec}")
    table = Table(title=title)
    for header in ("split", "cache", "MB up", "MB down", "kernel total s", "emulated total s", "kernel comm s",
                   "emulated comm s", "emulated vs kernel"):
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(r["split"], r["cache"], f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}",
                      f"{r['kernel_total_s']:.2f}", f"{r['emulated_total_s']:.2f}", f"{r['kernel_comm_s']:.2f}",
                      f"{r['emulated_comm_s']:.2f}", f"{r['difference_pct']:+.1f}%")
    Console(width=200).print(table)
    # Compute time varies with the load other jobs put on the machine, link time does not:
    # the median over attempts is the verdict, and the communication times are shown alone too.
    total = statistics.median(abs(r["difference_pct"]) for r in results)
    comm = max(abs(r["comm_difference_pct"]) for r in results)
    verdict = "agree within 10%" if total <= 10 else "DIFFER by more than 10%"
    print(f"total time: median difference {total:.1f}% -> {verdict}; "
          f"communication time: largest difference {comm:.1f}%")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "crosscheck.json").write_text(json.dumps({"title": title, "command": " ".join(sys.argv),
                                                         "rows": results}, indent=1) + "\n")
    return 0 if total <= 10 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    sub = parser.add_subparsers(dest="command")
    relay = sub.add_parser("relay", help="(internal) the delaying TCP relay")
    relay.add_argument("--listen", required=True)
    relay.add_argument("--to", required=True)
    relay.add_argument("--delay", type=float, default=0.0, help="seconds, each way")
    parser.add_argument("--rate", default="10mbit", help="both ways, tc syntax (default %(default)s)")
    parser.add_argument("--up", help="uplink rate (overrides --rate)")
    parser.add_argument("--down", help="downlink rate (overrides --rate)")
    parser.add_argument("--delay", default="0ms", help="one-way delay with its unit: 500us, 20ms, 0.1s "
                                                          "(default %(default)s)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--splits", default="1:N-1")
    parser.add_argument("--caches", default="none", help="none (rate-dominated), kv, or none,kv")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.command == "relay":
        asyncio.run(_relay(args.listen, args.to, args.delay))
        return 0
    return crosscheck(args)


if __name__ == "__main__":
    sys.exit(main())
