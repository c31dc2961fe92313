"""Experiment (not in the product): how many bits would conditional coding save, with side information
both ends of a link already hold?

    python scripts/codec_conditional.py --split 2:28 [--passages 160] [--fit 110] [--bits 7]

The downlink row z_Y (hidden state after layer Y over its robust sigma) is predicted linearly from what
the device already holds when it arrives: the uplink row x_X it sent for the same position (scaled by
the uplink's own sigma, `zu`, or by the downlink's, `u_in_d`) and the previous downlink row
(`prev_zd`); the uplink row from the previous uplink / downlink rows. The server holds the same rows
(it received the one and sent the other), so both ends could form the prediction and only its
residual would travel. Prediction: ridge least squares with a constant, fitted on the first --fit
calibration passages (attention-sink rows beyond 200 sigma left out, as calK leaves them out), then
the residual in its own KLT basis, Rice-coded at calK's step for K = --bits with per-component
parameters fitted on the same passages; bits per value are measured on the remaining passages.
`plain` is calK's own scheme (median, KLT, Rice), the baseline to beat.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from lambdasplit.bench import codecs as bench
from lambdasplit.wire import calibrate as cal
from lambdasplit.wire.calibrated import _robust_spread
from uplink_metric import rice_bits

SINK = 200.0  # rows with a component beyond this many sigma are attention sinks, coded apart


def rows(device, body, passages) -> list[dict]:
    """Per passage: its uplink and downlink rows in the units the predictions use (position 0 dropped)."""
    out = []
    for ids in passages:
        u, d = (t.float().numpy().astype(np.float64) for t in cal._hidden(device, body, ids))
        su = _robust_spread(u.astype(np.float32)).astype(np.float64)[:, None]
        sd = _robust_spread(d.astype(np.float32)).astype(np.float64)[:, None]
        zu, zd = u / su, d / sd
        previous = lambda z: np.vstack([np.zeros((1, z.shape[1])), z[:-1]])
        out.append({name: value[1:] for name, value in
                    dict(zu=zu, zd=zd, prev_zu=previous(zu), prev_zd=previous(zd), u_in_d=u / sd).items()})
    return out


def bits_per_value(fit: list[dict], held: list[dict], target: str, predictors: list[str], step: float) -> float:
    joined = lambda group, name: np.concatenate([r[name] for r in group])
    bulk = lambda z: np.abs(z).max(axis=1) < SINK
    y_fit, y_held = joined(fit, target), joined(held, target)
    if predictors:
        p_fit = np.hstack([joined(fit, p) for p in predictors] + [np.ones((len(y_fit), 1))])
        p_held = np.hstack([joined(held, p) for p in predictors] + [np.ones((len(y_held), 1))])
        keep = bulk(y_fit) & bulk(p_fit)
        ridge = 1e-3 * len(p_fit) * np.eye(p_fit.shape[1])
        a = np.linalg.solve(p_fit[keep].T @ p_fit[keep] + ridge, p_fit[keep].T @ y_fit[keep])
        r_fit, r_held = y_fit - p_fit @ a, y_held - p_held @ a
    else:
        center = np.median(y_fit[bulk(y_fit)], axis=0)
        r_fit, r_held = y_fit - center, y_held - center
    r_fit, r_held = r_fit[bulk(r_fit)], r_held[bulk(r_held)]
    centered = r_fit - r_fit.mean(0)
    _, basis = np.linalg.eigh(centered.T @ centered / len(centered))
    return rice_bits(np.round(r_fit @ basis / step), np.round(r_held @ basis / step))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--passages", type=int, default=160)
    parser.add_argument("--fit", type=int, default=110)
    parser.add_argument("--bits", type=float, default=7.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device, body = bench._workload(bench.resolve_model(args.model), args.split)
    data = rows(device, body, cal.calibration_passages(device.tokenizer, args.passages))
    fit, held = data[:args.fit], data[args.fit:]
    step = math.sqrt(12) * 2 ** -args.bits  # calK's step in sigma units (relative weights 1)
    print(f"{args.model} {args.split}: Rice bits per value at cal{args.bits:g}'s step, fitted on {len(fit)} "
          f"passages, measured on {len(held)}")
    print("| direction | predicted from | bits / value |")
    print("|:---|:---|---:|")
    for direction, target, choices in (("down", "zd", [[], ["zu"], ["u_in_d"], ["u_in_d", "prev_zd"]]),
                                       ("up", "zu", [[], ["prev_zu"], ["prev_zu", "prev_zd"]])):
        for predictors in choices:
            value = bits_per_value(fit, held, target, predictors, step)
            print(f"| {direction} | {', '.join(predictors) or 'plain (calK)'} | {value:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
