"""Where the device's CPU goes per generated token in the secret-shared mode (cProfile on process time).

    python scripts/shares_device_profile.py [--model zoo:smollm2] [--merge auto|off] [--decode-step on|off]
                                            [--tokens 16] [--top 12] [--pin]

Starts two `serve --component shares` processes on loopback, warms up, then profiles one greedy
generation (EOS masked) with time.process_time as the profiler's clock, so only this process's
CPU counts (the servers are other processes). Prints, per generated token (the prompt's step
included), the device CPU split into: the requests (SharePair.exchange: the share arithmetic,
and the framing and socket calls of sending and receiving), and the rest (the model's
non-linear parts, the generation loop, sampling), then the functions with the most own time.
The same generation unprofiled (before it) and local fp32 generation of the same prompt are
timed alongside for scale. cProfile adds its own overhead per call: the split is what to
read, not the profiled total. --decode-step off runs single positions through the family's
modules instead of shares/decode.py.

--pin runs both servers on CPU 0 and this process (the device, and local generation) on CPU 1:
the nearest this one machine comes to servers on other machines, where the device would not
resume after every request on a core whose caches the servers' GEMVs just evicted.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

from lambdasplit.client.device import DeviceModel
from lambdasplit.server.process import ServerProcess
from lambdasplit.shares.device import SharedDevice
from lambdasplit.shares.run import parse_merge, run_shared

PROMPT = "What is the capital of France?"


def cumulative(stats: pstats.Stats, file_part: str, function: str) -> float:
    return sum(entry[3] for (path, _, name), entry in stats.stats.items() if file_part in path and name == function)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--merge", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--decode-step", choices=["on", "off"], default="on")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--pin", action="store_true", help="servers on CPU 0, the device on CPU 1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.pin:  # the servers inherit this affinity; the device then moves to the other core
        os.sched_setaffinity(0, {0})
    servers = [ServerProcess(["--model", args.model, "--component", "shares", "--share", str(share),
                              "--shares-merge", args.merge]).start() for share in (0, 1)]
    if args.pin:
        os.sched_setaffinity(0, {1})
    try:
        device = SharedDevice.load_shared(args.model, merge=parse_merge(args.merge))
        device.decode_step = args.decode_step == "on"
        local = DeviceModel.load(args.model)
        addresses = [s.address for s in servers]
        run_shared(model=None, device=device, prompt=PROMPT, servers=addresses, max_new_tokens=2, ignore_eos=True)
        began = time.process_time()
        run_shared(model=None, device=device, prompt=PROMPT, servers=addresses, max_new_tokens=args.tokens,
                   ignore_eos=True)
        unprofiled_ms = 1e3 * (time.process_time() - began) / args.tokens
        began = time.process_time()
        local.generate(PROMPT, max_new_tokens=args.tokens, ignore_eos=True)
        local_ms = 1e3 * (time.process_time() - began) / args.tokens
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        record = run_shared(model=None, device=device, prompt=PROMPT, servers=addresses, max_new_tokens=args.tokens,
                            ignore_eos=True)
        profiler.disable()
    finally:
        for server in servers:
            server.stop()
    stats = pstats.Stats(profiler)
    per_token = 1e3 / args.tokens
    total = stats.total_tt * per_token
    requests = cumulative(stats, "shares/device.py", "exchange") * per_token
    sends = cumulative(stats, "shares/device.py", "send") * per_token
    receives = cumulative(stats, "shares/device.py", "receive") * per_token
    print(f"{args.model}, {'merged' if device.merge else 'plain'} layers, {record['round_trips_per_token']:.0f} "
          f"requests / token to each server, {args.tokens} tokens"
          + (", servers pinned to CPU 0, device to CPU 1" if args.pin else "")
          + ("" if device.decode_step else ", decode step off"))
    print(f"device CPU / token, profiled: {total:.1f} ms (unprofiled: {unprofiled_ms:.1f} ms; "
          f"local fp32: {local_ms:.1f} ms)")
    print(f"  requests (SharePair.exchange):      {requests:6.1f} ms")
    print(f"    share arithmetic + bookkeeping {requests - sends - receives:6.1f} ms")
    print(f"    sending (framing, sendall)     {sends:6.1f} ms")
    print(f"    receiving (transport, recv)    {receives:6.1f} ms")
    print(f"  the rest (non-linear parts, loop) {total - requests:6.1f} ms")
    print(f"functions with the most own CPU time (ms / token):")
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:args.top]
    for (path, line, name), entry in rows:
        print(f"  {entry[2] * per_token:6.2f}  {entry[1]:6d} calls  {path.rsplit('/', 2)[-1]}:{line} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
