"""Milliseconds of a linear layer over 1-8 rows, plain nn.Linear against PaddedLinear (2-3 rows as 4).

    python scripts/small_rows_timing.py [--threads 1] [--repeats 20]

SmolLM2-135M's shapes (q/o, gate/up, down, the 49152-row LM head), random fp32 weights, best of
three medians; prints a markdown table. Why: llm/small_rows.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lambdasplit.llm.small_rows import PaddedLinear

SHAPES = {"q/o 576->576": (576, 576), "gate/up 576->1536": (576, 1536), "down 1536->576": (1536, 576),
          "lm_head 576->49152": (576, 49152)}
ROWS = (1, 2, 3, 4, 6, 8)


def milliseconds(layer, x, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        best = []
        for _ in range(3):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - t)
            best.append(statistics.median(times))
    return 1e3 * min(best)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call, nn.Linear / PaddedLinear")
    print("| layer | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|:---|" + "---:|" * len(ROWS))
    for name, (d_in, d_out) in SHAPES.items():
        plain = torch.nn.Linear(d_in, d_out, bias=False)
        padded = PaddedLinear(d_in, d_out, bias=False)
        padded.weight = plain.weight
        repeats = args.repeats if d_out < 10000 else max(3, args.repeats // 4)
        cells = []
        for rows in ROWS:
            x = torch.randn(1, rows, d_in)
            cells.append(f"{milliseconds(plain, x, repeats):.3f} / {milliseconds(padded, x, repeats):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
