"""How often a lossy wire codec flips a greedy token, teacher-forced, and whether a near-tie guard helps.

    python scripts/codec_flips.py [--model zoo:smollm2] [--split 2:28] [--codecs cal6.5,cal7]
                                  [--directions down,up,both] [--train-prompts 15] [--taus 0.02,0.05,0.1]

`bench codecs` compares whole greedy generations on 4-5 prompts: one flip early in a prompt
loses the rest of it, so its agreement is a lottery over a handful of near-ties. This counts
flips per token instead, over more text: each prompt (the bench's 5 chat prompts, then
`--train-prompts` of the draft head's training prompts, zoo/draft_data.py) is followed by its fp32
greedy reference (60 tokens), run in one teacher-forced forward with the codec on the chosen
direction(s); a flip is a position whose coded argmax differs from the argmax of the same forward
without the codec. (Each vector is coded on its own, so one forward codes every position as
step-by-step decoding would. The comparison is with the same forward, not with the reference
tokens: a one-pass forward rounds differently from step-by-step decoding, which alone moves a
few near-ties, 3-4 per 1 200 tokens here, with no codec at all.)

The guard is REFINE's (docs/protocol.md): where the coded top-2 gap is below tau, that position's
downlink is replaced by its fp16 rounding (the uplink and the earlier positions stay coded: their
KV entries are what a real session holds) and the recomputed argmax is what counts; flagged
positions cost one more round trip and fp16's bytes. With only the uplink coded there is nothing
to refine. `--prompt-codec cal8.5` codes the prompt's positions at that bound instead (what
`generate --prefill-codec` does). It prints, per codec and direction, the raw flips, and per tau
the fraction flagged and the flips left (a recomputed position is compared with the uncoded
forward over the same prefix).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lambdasplit.bench.codecs import _codecs_for, _reference, _workload, default_prompts
from lambdasplit.wire.codecs import decode_blob, encode, get_codec, read_header
from lambdasplit.zoo.draft_data import training_prompts

FP16 = get_codec("fp16", default_granularity="token")


def travel(hidden: torch.Tensor, codec) -> torch.Tensor:
    if codec is None:
        return hidden
    blob = encode(hidden, codec).blob
    return decode_blob(blob, read_header(blob), codec.table).to(hidden.dtype)


@torch.inference_mode()
def coded_logits(device, body, ids, up, down, precise_row=None, prompt=0, prompt_codec=None) -> torch.Tensor:
    """Logits of every position with the codecs on the way; `precise_row`'s downlink travels at fp16
    instead (REFINE), and the first `prompt` positions (the prefill) in `prompt_codec` when given."""
    head, tail, body = device.head.fork(), device.tail.fork(), body.fork()
    hidden = head.forward(torch.tensor([ids]), 0)
    sent = travel(hidden, up)
    if prompt_codec is not None and up is not None:
        sent[:, :prompt] = travel(hidden[:, :prompt], prompt_codec[0])
    out = body.forward(sent, 0)
    back = travel(out, down)
    if prompt_codec is not None and down is not None:
        back[:, :prompt] = travel(out[:, :prompt], prompt_codec[1])
    if precise_row is not None and down is not None:
        back[:, precise_row] = travel(out[:, precise_row:precise_row + 1], FP16)[:, 0]
    return tail.forward(back, 0, last_only=False)[0].float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--codecs", default="cal6.5,cal7")
    parser.add_argument("--directions", default="down,up,both")
    parser.add_argument("--train-prompts", type=int, default=15)
    parser.add_argument("--taus", default="0.02,0.05,0.1")
    parser.add_argument("--prompt-codec", default=None,
                        help="code the prompt's positions (the prefill) with this codec instead, e.g. fp16")
    parser.add_argument("--prompt-positions", type=int, default=None,
                        help="with --prompt-codec: only the first N positions of the prompt (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    taus = [float(t) for t in args.taus.split(",")]
    device, body = _workload(args.model, args.split)
    prompts = default_prompts(5) + training_prompts(args.train_prompts)
    references = [(device.encode(p, None), _reference(args.model, args.split, p, 60)) for p in prompts]
    for codec in args.codecs.split(","):
        for direction in args.directions.split(","):
            up, down = _codecs_for(codec, direction, (device, body))
            prefill = None
            if args.prompt_codec:
                prefill = _codecs_for(args.prompt_codec, "both", (device, body))
            raw, tokens = 0, 0
            flagged, left = dict.fromkeys(taus, 0), dict.fromkeys(taus, 0)
            for prompt_ids, reference in references:
                ids, n = prompt_ids + reference, len(prompt_ids)
                precise = n if args.prompt_positions is None else min(n, args.prompt_positions)
                top = coded_logits(device, body, ids, up, down, None, precise, prefill)[n - 1:len(ids) - 1].topk(2, -1)
                plain = coded_logits(device, body, ids, None, None)[n - 1:len(ids) - 1].argmax(-1).numpy()
                gap = (top.values[:, 0] - top.values[:, 1]).numpy()
                flips = top.indices[:, 0].numpy() != plain
                # every position some tau flags, recomputed once with its downlink at fp16 (nothing to
                # refine when only the uplink is coded)
                refined = flips.copy()
                for i in np.flatnonzero(gap < max(taus)) if down is not None else []:
                    prefix, row = ids[:n + i], n - 1 + i
                    refined[i] = (coded_logits(device, body, prefix, up, down, row, precise, prefill)[-1].argmax()
                                  != coded_logits(device, body, prefix, None, None)[-1].argmax())
                raw, tokens = raw + int(flips.sum()), tokens + len(reference)
                for tau in taus:
                    guarded = gap < tau
                    flagged[tau] += int(guarded.sum())
                    left[tau] += int(np.where(guarded, refined, flips).sum())
            line = f"{args.split} {codec:7s} {direction:5s} raw flips {raw}/{tokens}"
            for tau in taus:
                line += f" | tau {tau}: flagged {100 * flagged[tau] / tokens:.2f}% flips {left[tau]}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
