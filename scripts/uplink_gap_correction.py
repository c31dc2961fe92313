"""Experiment (not in the product): could the server tell the device how the uplink's rounding moved a near-tie?

    python scripts/uplink_gap_correction.py --split 2:28 [--rate 7] [--prompts 12] [--tau 0.1]

The uplink's rounding moves the top-2 logit gap mostly through the rows already in the body's KV
cache (scripts/uplink_metric.py --attribution), so refining the position's own row does not undo
a flip, and re-sending the history costs more than the codec saves. To first order the move is
delta = sum_j g_j . e_j, with g_j the gap's gradient with respect to uplink row j (the server can
compute it: it holds the body and the coded rows; the device would send the gap's gradient at the
downlink, one row) and e_j = x_j - coded x_j (only the device knows it). In the codec's KLT
coordinates e_j is a rounding error, uniform over one step per component, so the server can rank
the (row, component) pairs by |G_ji| alone and send the top m of them; the device adds sum G_ji E_ji
over those and knows the rest's spread. This script measures, teacher-forced along the fp32
references of the benchmark prompts, the uplink alone coded (`cal` at --rate bits per value, as
scripts/uplink_metric.py), at positions whose coded gap is below --tau:

    delta     RMS of the true gap move (exact rows vs coded rows, same two tokens)
    linear    RMS of delta - sum over all (j, i) of G E: the first-order model's error
    top m     RMS of delta - sum over the top m pairs: what m pairs from the server would leave
    rows      how many rows carry 90% of sum G^2 (the server's ranking), of how many in the history
    shares    the mean share of sum G^2 in the position's own row, the last 8 rows, the prompt's rows
              and the first row (the attention sink)

and the flips (coded argmax != fp32's) before and after each correction. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from lambdasplit.bench import codecs as bench
from lambdasplit.llm.segments import LayerStack

from uplink_metric import gather, step_for_rate, variants  # noqa: E402  (scripts/ is on sys.path when run)
from lambdasplit.wire.calibrated import _robust_spread

TOPS = (16, 64, 256, 1024, 4096)


def positions(device, body, ids, n, transform, step, tau, own_down=False):
    run = LayerStack.forward.__wrapped__  # gradients flow (the stacks' forward is in inference mode)
    with torch.no_grad():
        hidden = device.head.fork().forward(torch.tensor([ids]), 0)
    x = hidden[0].double().numpy()
    sigma = np.clip(_robust_spread(x.astype(np.float32)), 2.0**-14, 65504.0).astype(np.float16).astype(np.float64)
    y = ((x / sigma[:, None]) - transform.mean) @ transform.forward
    q = np.round(y / step)
    coded = ((q * step) @ transform.inverse + transform.mean) * sigma[:, None]
    errors = y - q * step  # E: the rounding error in the transform's coordinates
    tail = device.tail

    def logits_of(h):
        out = run(tail.fork().stack, run(body.fork().stack, h, 0), 0)
        return tail.family.logits(tail.config, tail.lm_head(tail.norm(out)))[0].float()

    with torch.no_grad():
        exact = logits_of(hidden)
    up = torch.from_numpy(coded.astype(np.float32))[None].requires_grad_(True)
    down = run(body.fork().stack, up, 0)
    out = run(tail.fork().stack, down, 0)
    coded_logits = tail.family.logits(tail.config, tail.lm_head(tail.norm(out)))[0].float()
    rows = []
    for t in range(n - 1, len(ids) - 1):
        top = coded_logits[t].detach().topk(2).indices
        gap_coded = float(coded_logits[t, top[0]].detach() - coded_logits[t, top[1]].detach())
        if gap_coded >= tau:
            continue
        g, g_down = torch.autograd.grad(coded_logits[t, top[0]] - coded_logits[t, top[1]], [up, down],
                                        retain_graph=True)
        if own_down:
            # what the server can compute from the one row the device would send: the gap's gradient at
            # this position's downlink row only (the tail's attention over earlier rows left out)
            only = torch.zeros_like(g_down)
            only[:, t] = g_down[:, t]
            (g,) = torch.autograd.grad(down, [up], grad_outputs=only, retain_graph=True)
        g = g[0, :t + 1].double().numpy()
        big = sigma[:t + 1, None] * (g @ transform.inverse.T)  # G: d gap / d y, per row and component
        contributions = (big * errors[:t + 1]).ravel()
        delta = float(exact[t, top[0]] - exact[t, top[1]]) - gap_coded
        order = np.argsort(-np.abs(big).ravel())
        row_energy = np.sort((big ** 2).sum(axis=1))[::-1]
        rows90 = int(np.searchsorted(np.cumsum(row_energy), 0.9 * row_energy.sum()) + 1)
        energy = (big ** 2).sum(axis=1)
        energy = energy / energy.sum()
        truth = int(exact[t].argmax())
        record = {"t": t, "gap_coded": gap_coded, "delta": delta, "linear": delta - float(contributions.sum()),
                  "rows90": rows90, "history": t + 1, "flip": int(top[0]) != truth,
                  "share_own": float(energy[t]), "share_last8": float(energy[-8:].sum()),
                  "share_prompt": float(energy[:n].sum()), "share_first": float(energy[0]),
                  "spread_rest": {}}
        record["wrong"] = {}
        for m in (*TOPS, None):
            kept = order[:m] if m else order
            correction = float(contributions[kept].sum())
            if m:
                record[f"top{m}"] = delta - correction
                rest = np.ones(contributions.size, bool)
                rest[kept] = False
                record["spread_rest"][m] = float(np.sqrt(((big.ravel()[rest] * step) ** 2).sum() / 12))
            choice = int(top[1]) if gap_coded + correction < 0 else int(top[0])
            record["wrong"][m or "all"] = choice != truth
        rows.append(record)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--rate", type=float, default=7.0)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--sequences", type=int, default=160)
    parser.add_argument("--own-down", action="store_true",
                        help="G from the gap's gradient at this position's downlink row only (what one row sent up gives)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = bench.resolve_model(args.model)
    device, body = bench._workload(model, args.split)
    x, _ = gather(device, body, args.sequences, 1)
    z = x / _robust_spread(x.astype(np.float32)).astype(np.float64)[:, None]
    transform = variants(z, np.zeros((1, z.shape[1])), [])[0]  # KLT, flat weights (the Fisher's are ~flat)
    sequences, z_eval = [], []
    for prompt in bench.default_prompts(args.prompts):
        reference = bench._reference(model, args.split, prompt, args.new_tokens)
        prompt_ids = device.encode(prompt)
        ids = list(prompt_ids) + list(reference)
        sequences.append((ids, len(prompt_ids)))
        with torch.no_grad():
            h = device.head.fork().forward(torch.tensor([ids]), 0)[0].double().numpy()
        z_eval.append(h / _robust_spread(h.astype(np.float32)).astype(np.float64)[:, None])
    step = step_for_rate(transform, z, np.concatenate(z_eval), args.rate)
    records, total = [], 0
    for ids, n in sequences:
        total += len(ids) - n
        records += positions(device, body, ids, n, transform, step, args.tau, args.own_down)

    def rms(key):
        return round(math.sqrt(np.mean([r[key] ** 2 for r in records])), 5) if records else None

    summary = {"split": args.split, "own_down": args.own_down, "rate": args.rate, "tau": args.tau, "positions": total, "flagged": len(records),
               "flips": sum(r["flip"] for r in records), "delta": rms("delta"), "linear": rms("linear"),
               **{f"top{m}": rms(f"top{m}") for m in TOPS},
               "rows90_median": float(np.median([r["rows90"] for r in records])) if records else None,
               "history_median": float(np.median([r["history"] for r in records])) if records else None,
               **{f"{key}_mean": round(float(np.mean([r[key] for r in records])), 3) if records else None
                  for key in ("share_own", "share_last8", "share_prompt", "share_first")},
               "wrong_after": {str(m): sum(r["wrong"][m] for r in records) for m in (*TOPS, "all")}}
    print(json.dumps(summary), flush=True)
    for r in records:
        if r["flip"]:
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k not in ("spread_rest", "wrong")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
