"""The device's CPU per request of the secret-shared mode when it does almost nothing: the floor.

    python scripts/shares_wait_floor.py [--waits 0,0.5,5,20] [--requests 300] [--pin]

A stand-in server process answers each request after `wait` ms (the servers' compute and the
link's round trip, as the device sees them), with an answer of a merged SmolLM2 request's size.
The device side is the least a request can cost: encode 1152 values to the ring, subtract masks,
one sendall, read the 29 kB answer, add two answers, decode, and the RMS scale and SiLU of the
merged layer, in numpy, nothing else. Prints the device's CPU (time.process_time) per request for
each wait. On the project's VM the CPU per request grows with the wait (the process wakes on a
core whose caches other work used meanwhile, and waking costs the VM itself): that, times the
requests per token (62 for SmolLM2 merged), is a floor under the device's CPU per token that no
arithmetic saving removes (docs/benchmarks.md, "Secret-shared mode").

--pin puts the stand-in server on CPU 0 and the device on CPU 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import time

import numpy as np

REQUEST_WORDS, ANSWER_WORDS = 1152, 3648  # a merged o_proj request of SmolLM2: [a ; r] in, W_o a | gate | up out


def serve(listener: socket.socket, wait: float) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answer = struct.pack("<IB", 8 * ANSWER_WORDS + 1, 3) + os.urandom(8 * ANSWER_WORDS)
    view = memoryview(bytearray(1 << 20))
    while True:
        header = conn.recv(5, socket.MSG_WAITALL)
        if len(header) < 5:
            return
        length = struct.unpack_from("<I", header)[0] - 1
        done = 0
        while done < length:
            done += conn.recv_into(view[done:length])
        if wait:
            time.sleep(wait)
        conn.sendall(answer)


def request(sock: socket.socket, x: np.ndarray, masks: np.ndarray, other: np.ndarray) -> np.ndarray:
    scaled = x.astype(np.float64) * float(2 ** 20)
    shares = np.rint(scaled, out=scaled).astype(np.int64).view(np.uint64) - masks
    sock.sendall(struct.pack("<IB", 8 * REQUEST_WORDS + 1, 2) + shares.tobytes())
    length = struct.unpack_from("<I", sock.recv(5, socket.MSG_WAITALL))[0] - 1
    body = bytearray(length)
    view, done = memoryview(body), 0
    while done < length:
        done += sock.recv_into(view[done:])
    values = (np.frombuffer(body, dtype="<u8") + other).view(np.int64).astype(np.float32) * np.float32(2.0 ** -40)
    h = x[:576] + values[:576]
    scale = np.float32(1.0) / np.sqrt(np.float32(np.dot(h, h)) / np.float32(576) + np.float32(1e-5))
    gate, up = values[576:2112] * scale, values[2112:] * scale
    return gate / (np.float32(1.0) + np.exp(-gate)) * up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="0,0.5,5,20", help="ms before each answer")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--pin", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(REQUEST_WORDS).astype(np.float32)
    masks = rng.integers(0, 2**63, REQUEST_WORDS, dtype=np.uint64)
    other = rng.integers(0, 2**63, ANSWER_WORDS, dtype=np.uint64)
    print(f"device CPU per request, {REQUEST_WORDS} words up, {ANSWER_WORDS} down"
          + (" (server on CPU 0, device on CPU 1)" if args.pin else ""))
    for wait_ms in [float(w) for w in args.waits.split(",")]:
        listener = socket.create_server(("127.0.0.1", 0))
        pid = os.fork()
        if pid == 0:
            if args.pin:
                os.sched_setaffinity(0, {0})
            serve(listener, wait_ms / 1e3)
            os._exit(0)
        if args.pin:
            os.sched_setaffinity(0, {1})
        sock = socket.create_connection(listener.getsockname())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):
            request(sock, x, masks, other)
        count = args.requests if wait_ms < 5 else max(50, args.requests // 4)
        began, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            request(sock, x, masks, other)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        sock.close()
        os.waitpid(pid, 0)
        listener.close()
        print(f"  wait {wait_ms:5.1f} ms: {1e6 * cpu / count:6.1f} us CPU per request ({1e6 * wall / count:8.1f} us wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
