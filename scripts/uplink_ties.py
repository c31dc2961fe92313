"""Which positions' uplink rounding flips a greedy token: the flips of a coded uplink, and what undoes them.

    python scripts/uplink_ties.py [--model zoo:smollm2] [--split 2:28] [--codec cal7] [--prefill cal8.5] [--prompts 5]

Teacher-forced along each prompt's fp32 greedy reference (60 tokens, the bench's chat prompts),
the uplink coded as a session codes it (the prompt's positions at --prefill, later ones at
--codec; the downlink exact). For every flipped position it prints the fp32 and coded top-2
gaps and whether the flip survives when, besides the coded run, these uplink rows travel
exactly: the position's own row (`own`), the last four (`last4`), every generated position
(`decode`), every position (`all`, i.e. no codec: never a flip).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lambdasplit.bench.codecs import _codecs_for, _reference, _workload, default_prompts
from lambdasplit.wire.calibrated import at_bound, parse_name
from lambdasplit.wire.codecs import decode_blob, encode, read_header


def travel(hidden: torch.Tensor, codec) -> torch.Tensor:
    blob = encode(hidden, codec).blob
    return decode_blob(blob, read_header(blob), codec.table).to(hidden.dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--codec", default="cal7")
    parser.add_argument("--prefill", default="cal8.5")
    parser.add_argument("--prompts", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device, body = _workload(args.model, args.split)
    up, _ = _codecs_for(args.codec, "up", (device, body))
    prefill = at_bound(up, parse_name(args.prefill))

    @torch.inference_mode()
    def logits(ids, prompt, exact=()):
        head, tail, stack = device.head.fork(), device.tail.fork(), body.fork()
        hidden = head.forward(torch.tensor([ids]), 0)
        sent = travel(hidden, up)
        sent[:, :prompt] = travel(hidden[:, :prompt], prefill)
        for row in exact:
            sent[:, row] = hidden[:, row]
        return tail.forward(stack.forward(sent, 0), 0, last_only=False)[0].float()

    for prompt in default_prompts(args.prompts):
        prompt_ids = device.encode(prompt, None)
        ids, n = prompt_ids + _reference(args.model, args.split, prompt, 60), len(prompt_ids)
        plain = logits(ids, n, exact=range(len(ids)))[n - 1:len(ids) - 1]
        coded = logits(ids, n)[n - 1:len(ids) - 1]
        for i in np.flatnonzero((coded.argmax(-1) != plain.argmax(-1)).numpy()):
            row, want = n - 1 + i, int(plain[i].argmax())
            top, got = plain[i].topk(2).values, coded[i].topk(2).values
            variants = {"own": [row], "last4": range(max(n, row - 3), row + 1), "decode": range(n, row + 1),
                        "all": range(row + 1)}
            survives = {name: int(logits(ids[:row + 1], n, rows)[-1].argmax()) != want
                        for name, rows in variants.items()}
            print(f"{args.split} {args.codec} (prompt at {args.prefill}) {prompt[:32]!r} token {i}: fp32 gap "
                  f"{float(top[0] - top[1]):.4f}, coded gap {float(got[0] - got[1]):.4f}; still flips with exact "
                  + ", ".join(f"{name}: {'yes' if flip else 'no'}" for name, flip in survives.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
