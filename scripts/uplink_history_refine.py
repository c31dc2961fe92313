"""Experiment (not in the product): on a near-tie the downlink's REFINE left, re-send the uplink's whole history finer.

    python scripts/uplink_history_refine.py --split 2:28 [--codec cal7] [--tau 0.01] [--bits 2] [--prompts 5]

`bench codecs --directions both` loses tokens to the uplink's rounding, which sits in the body's
KV cache (docs/benchmarks.md). The only cure a device can ask for without knowing the body's
weights is to send that history again, finer: here, when a decode step's top-2 gap is still below
`--tau` after the downlink's REFINE, every uplink row so far (prompt included) is re-coded
`--bits` bits finer (a refinement of `--bits` bits per component would cost D * bits / 8 bytes a
row plus 16 of header, counted here), the body's cache is recomputed from them (what a server
would do: one prefill), and the recomputed last row comes back (counted as a kind-7-sized 850-byte
fine row). Everything else is `bench codecs`' in-process path (CodedBody, the same refine gap and
prefill defaults). Prints one JSON line: agreement with fp32, bytes as a fraction of fp16's
(history re-sends included), and how many re-sends and rows they carried.
"""

from __future__ import annotations

import argparse
import json

import torch

from lambdasplit.bench import codecs as bench
from lambdasplit.client import generation
from lambdasplit.wire.calibrated import QUARTERS, at_bound
from lambdasplit.wire.codecs import decode_blob, encode, read_header

RETURNED_ROW_BYTES = 850  # the recomputed last row, about a cal11 blob at D = 576


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--codec", default="cal7")
    parser.add_argument("--tau", type=float, default=0.01, help="re-send when the refined gap is below this")
    parser.add_argument("--bits", type=int, default=2, help="how much finer the history travels again")
    parser.add_argument("--prompts", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stats = {"resends": 0, "rows": 0, "resend_bytes": 0}

    class HistoryBody(bench.CodedBody):
        """CodedBody that remembers its uplink rows and can recompute its cache from them, finer."""

        def forward(self, hidden, start):
            self.history = [] if start == 0 else [(s, h) for s, h in self.history if s < start]
            self.history.append((start, hidden.clone()))
            return super().forward(hidden, start)

        def resend_history(self) -> torch.Tensor:
            rows = torch.cat([h for _, h in self.history], dim=1)
            finer = at_bound(self.up, self.up.bits + args.bits * QUARTERS)
            blob = encode(rows, finer).blob
            out = self.body.forward(decode_blob(blob, read_header(blob), finer.table).to(rows.dtype), 0)
            cost = rows.shape[1] * (args.bits * rows.shape[-1] // 8) + 16
            self.bytes["up"] += cost
            self.bytes["down"] += RETURNED_ROW_BYTES
            stats["resends"] += 1
            stats["rows"] += rows.shape[1]
            stats["resend_bytes"] += cost + RETURNED_ROW_BYTES
            return out[:, -1:]

    plain_step = generation.StepModel.step

    @torch.inference_mode()
    def step(self, start, token_ids, last=None, parents=None, keep=None):
        logits = plain_step(self, start, token_ids, last, parents, keep)
        if last == 1 and parents is None and self.refine_gap > 0 and generation.top2_gap(logits[-1]) < args.tau:
            row = self.body.resend_history().to(self.features.dtype)
            position = start + len(token_ids) - 1
            self.tail.stack.truncate(position)
            self.features[-1] = self.tail.stack.forward(row, position)[0, 0]
            logits = self.tail.family.logits(self.tail.config, self.tail.lm_head(self.tail.norm(self.features[-1:])))
        return logits

    generation.StepModel.step = step
    bench.CodedBody = HistoryBody
    row = bench.measure_codec(bench.resolve_model(args.model), args.split, args.codec,
                              bench.default_prompts(args.prompts), direction="both")
    print(json.dumps({key: row[key] for key in ("split", "codec", "agreement", "fraction_of_fp16", "refined")}
                     | stats | {"tau": args.tau, "bits": args.bits, "prompts": args.prompts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
