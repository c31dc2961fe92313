"""Exact matmul modulo 2^64: float64 limb GEMMs (ring.RingMatmul) against torch's int64 matmul.

    python scripts/ring_matmul_timing.py [--json] [--device]

--device instead times the device's own work per request (encode, mask, add, decode,
576 -> 576 one position): back to back (caches warm), and with a 0.5 ms sleep between
requests, as when the device waits for the servers (caches cold on a loaded machine).

Both give W s mod 2^64 exactly (checked against a Python-int reference on a few entries;
torch's int64 matmul wraps on overflow on this CPU build, which C++ does not promise).
Shapes are SmolLM2-135M's: q/o (576 -> 576), gate/up (576 -> 1536), down (1536 -> 576),
LM head (576 -> 49152), for 1 row (a decoded token) and 32 rows (a prompt).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lambdasplit.shares.ring import FRAC_W, RingMatmul, limb_bits_for

SHAPES = [("q/o 576->576", 576, 576), ("gate/up 576->1536", 576, 1536), ("down 1536->576", 1536, 576),
          ("lm_head 576->49152", 576, 49152)]


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        f()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", action="store_true", help="time the device's per-request arithmetic instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device:
        return device_arithmetic(args.json)
    rng = np.random.default_rng(0)
    rows_out = []
    for label, d_in, d_out in SHAPES:
        w_int = np.rint(rng.normal(0, 0.05, (d_out, d_in)) * 2 ** FRAC_W).astype(np.int64)
        bits = limb_bits_for(int(np.abs(w_int).max()), d_in)
        limb = RingMatmul(w_int, None, bits)
        w64 = torch.from_numpy(w_int)
        for n in (1, 32):
            s = rng.integers(0, 2**64, (n, d_in), dtype=np.uint64)
            y_limb = limb(s, False)
            y_int = (torch.from_numpy(s.view(np.int64)) @ w64.T).numpy().view(np.uint64)
            for i, j in ((0, 0), (n - 1, d_out - 1)):
                ref = sum(int(s[i, k]) * int(w_int[j, k]) for k in range(d_in)) % 2**64
                assert int(y_limb[i, j]) == ref == int(y_int[i, j]), (label, n)
            t_limb = best(lambda: limb(s, False), args.repeat)
            t_int = best(lambda: torch.from_numpy(s.view(np.int64)) @ w64.T, args.repeat)
            x32, w32 = torch.randn(n, d_in), torch.randn(d_out, d_in)
            t_f32 = best(lambda: x32 @ w32.T, args.repeat)
            rows_out.append({"layer": label, "rows": n, "limb_bits": bits, "limbs": limb.limbs,
                             "limb_f64_ms": t_limb * 1e3, "torch_int64_ms": t_int * 1e3, "float32_ms": t_f32 * 1e3})
    if args.json:
        print(json.dumps(rows_out))
        return 0
    print("| layer | rows | limbs x bits | float64 limb GEMMs (ms) | torch int64 matmul (ms) | plain float32 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['layer']} | {r['rows']} | {r['limbs']} x {r['limb_bits']} | {r['limb_f64_ms']:.3f} | "
              f"{r['torch_int64_ms']:.3f} | {r['float32_ms']:.3f} |")
    return 0


def device_arithmetic(as_json: bool) -> int:
    from lambdasplit.shares.ring import FRAC_X, FRAC_Y, MaskStream, decode, encode, share

    x = torch.randn(1, 1, 576)
    masks = MaskStream(bytes(32))
    answer = encode(x.reshape(-1, 576).numpy(), FRAC_X).tobytes()

    def one_request():
        rows = x.detach().reshape(-1, 576).numpy()
        float(max(rows.max(), -rows.min()))
        share(encode(rows, FRAC_X), masks)
        total = np.frombuffer(answer, dtype="<u8") + np.frombuffer(answer, dtype="<u8")
        values = decode(total, FRAC_Y).astype(np.float32)
        return torch.from_numpy(values).view(1, 1, 576)

    out = {}
    for label, pause in (("warm", 0.0), ("after 0.5 ms sleep", 0.0005)):
        cpu = 0.0
        for _ in range(3000):
            began = time.thread_time()
            one_request()
            cpu += time.thread_time() - began
            if pause:
                time.sleep(pause)
        out[label] = cpu / 3000 * 1e6
    if as_json:
        print(json.dumps(out))
    else:
        for label, us in out.items():
            print(f"device arithmetic per request, {label}: {us:.1f} us CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
