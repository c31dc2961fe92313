"""Experiment (not in the product): does a better distortion metric let the uplink keep the answer at fewer bits?

    python scripts/uplink_metric.py --split 2:28 [--rates 7,8] [--prompts 12] [--gradient-sequences 40]

`calK` codes the uplink in the KLT basis of the calibration rows with a per-component step
1/sqrt(F_ii) clipped to [1/4, 4] (F: Fisher information of the output distribution, diagonal in
that basis). Rate-distortion theory says the best transform for the distortion e F e^T is the
KLT *after* whitening by F^(1/2), with one step for every component. This script measures, at the
same rate (bits per value, Rice-coded with per-component parameters fitted on calibration rows),
what each transform does to the answer: the uplink alone coded, every position teacher-forced
over the benchmark prompts and their fp32 references, against the uncoded forward:

    flips    positions whose argmax changes (per 1000)
    kl       mean KL(fp32 || coded) per position, in nats
    gap      RMS change of the top-2 logit gap

Variants: `cal` (the product's table: clip 4), `clip16`, `clipinf` (diagonal Fisher, unclipped),
`white` (full-Fisher whitened KLT, F + lam * mean(diag F) * I for --lams). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from lambdasplit.bench import codecs as bench
from lambdasplit.wire import calibrate as cal
from lambdasplit.wire.calibrated import _robust_spread, _zigzag


def gather(device, body, count: int, gradient_count: int):
    """(hidden states x [n, D], log-likelihood gradients in units of x / sigma [m, D]) from the calibration passages."""
    generator = torch.Generator().manual_seed(0)
    passages = cal.calibration_passages(device.tokenizer, count)
    rows, grads = [], []
    for i, ids in enumerate(passages):
        if i < gradient_count:
            up, g, _, _ = cal._gradients(device, body, ids, generator)
            sigma = _robust_spread(up.numpy())
            grads.append(g.numpy().astype(np.float64) * sigma[:, None])
        else:
            up, _ = cal._hidden(device, body, ids)
        rows.append(up.float().numpy())
    return np.concatenate(rows).astype(np.float64), np.concatenate(grads)


class Transform:
    """z -> y = (z - mean) @ forward, z = y @ inverse + mean; one step for every component of y."""

    def __init__(self, name, mean, forward, inverse):
        self.name, self.mean, self.forward, self.inverse = name, mean, forward, inverse

    def codes(self, z, step):
        return np.round(((z - self.mean) @ self.forward) / step)

    def decode(self, q, step):
        return (q * step) @ self.inverse + self.mean


def rice_bits(q_fit, q_eval) -> float:
    """Bits per value of q_eval with each component's Rice parameter fitted on q_fit."""
    zf, ze = _zigzag(q_fit.astype(np.int64)), _zigzag(q_eval.astype(np.int64))
    ks = np.arange(25)
    cost = np.stack([(zf >> k).sum(axis=0) + len(zf) * (k + 1) for k in ks], axis=1)
    best = cost.argmin(axis=1)
    return float(((ze >> best[None, :]) + best[None, :] + 1).sum() / ze.size)


def step_for_rate(transform, z_fit, z_eval, rate: float) -> float:
    lo, hi = -12.0, 8.0  # log2 step
    for _ in range(40):
        mid = (lo + hi) / 2
        bits = rice_bits(transform.codes(z_fit, 2**mid), transform.codes(z_eval, 2**mid))
        lo, hi = (mid, hi) if bits > rate else (lo, mid)
    return 2 ** ((lo + hi) / 2)


def variants(z, grads, lams):
    bulk = np.abs(z).max(axis=1) < cal.SINK_SIGMAS
    mean = np.median(z[bulk], axis=0)
    centered = z[bulk] - mean
    cov = centered.T @ centered / len(centered)
    _, basis = np.linalg.eigh(cov)
    basis = basis[:, ::-1]
    fisher_diag = np.maximum(((grads @ basis) ** 2).mean(axis=0), 1e-30)
    out = []
    for name, clip in (("cal", 4.0), ("clip16", 16.0), ("clipinf", np.inf)):
        weight = np.sqrt(np.exp(np.log(fisher_diag).mean()) / fisher_diag)
        weight = np.clip(weight, 1 / clip, clip)
        out.append(Transform(name, mean, basis / weight[None, :], basis.T * weight[:, None]))
    fisher = grads.T @ grads / len(grads)
    for lam in lams:
        reg = fisher + lam * np.mean(np.diag(fisher)) * np.eye(len(fisher))
        values, vectors = np.linalg.eigh(reg)
        half, inv_half = (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T
        _, v = np.linalg.eigh(half @ cov @ half)
        v = v[:, ::-1]
        out.append(Transform(f"white{lam:g}", mean, half @ v, v.T @ inv_half))
    return out


@torch.inference_mode()
def evaluate(device, body, sequences, transform, step):
    flips = kl = gap2 = count = 0
    for ids, n in sequences:
        head, tail = device.head.fork(), device.tail.fork()
        hidden = head.forward(torch.tensor([ids]), 0)
        x = hidden[0].float().numpy().astype(np.float64)
        sigma = np.clip(_robust_spread(x.astype(np.float32)), 2.0**-14, 65504.0).astype(np.float16).astype(np.float64)
        z = x / sigma[:, None]
        coded = transform.decode(transform.codes(z, step), step) * sigma[:, None]
        coded_hidden = torch.from_numpy(coded.astype(np.float32))[None].to(hidden.dtype)
        logits = []
        for h in (hidden, coded_hidden):
            out = body.fork().forward(h, 0)
            logits.append(device.tail.fork().forward(out, 0, last_only=False)[0, n - 1:len(ids) - 1].float())
        plain, coded_logits = logits
        flips += int((plain.argmax(-1) != coded_logits.argmax(-1)).sum())
        p = torch.log_softmax(plain, -1)
        kl += float((p.exp() * (p - torch.log_softmax(coded_logits, -1))).sum())
        top = plain.topk(2, -1).indices
        g_plain = plain.gather(1, top[:, :1]) - plain.gather(1, top[:, 1:])
        g_coded = coded_logits.gather(1, top[:, :1]) - coded_logits.gather(1, top[:, 1:])
        gap2 += float(((g_plain - g_coded) ** 2).sum())
        count += len(plain)
    return {"flips_per_1k": 1000 * flips / count, "kl": kl / count, "gap_rms": math.sqrt(gap2 / count)}


@torch.inference_mode()
def attribution(device, body, sequences, transform, step):
    """Gap error at each reference position with (all rows coded, history coded + own row exact,
    history exact + own row coded): which rows' rounding moves the answer."""
    errors = {"all": [], "history": [], "own": []}
    flips = {"all": 0, "history": 0, "own": 0}
    for ids, n in sequences:
        hidden = device.head.fork().forward(torch.tensor([ids]), 0)
        x = hidden[0].float().numpy().astype(np.float64)
        sigma = np.clip(_robust_spread(x.astype(np.float32)), 2.0**-14, 65504.0).astype(np.float16).astype(np.float64)
        coded = transform.decode(transform.codes(x / sigma[:, None], step), step) * sigma[:, None]
        coded = torch.from_numpy(coded.astype(np.float32))[None].to(hidden.dtype)

        def last_logits(h):
            out = body.fork().forward(h, 0)
            return device.tail.fork().forward(out, 0, last_only=False)[0, -1].float()

        for t in range(n - 1, len(ids) - 1):
            plain = last_logits(hidden[:, :t + 1])
            top = plain.topk(2).indices
            gap = float(plain[top[0]] - plain[top[1]])
            mixes = {"all": coded[:, :t + 1],
                     "history": torch.cat([coded[:, :t], hidden[:, t:t + 1]], 1),
                     "own": torch.cat([hidden[:, :t], coded[:, t:t + 1]], 1)}
            for name, h in mixes.items():
                logits = last_logits(h)
                errors[name].append(float(logits[top[0]] - logits[top[1]]) - gap)
                flips[name] += int(logits.argmax() != top[0])
    count = len(errors["all"])
    return {name: {"gap_rms": round(math.sqrt(np.mean(np.square(e))), 5), "flips_per_1k": round(1000 * flips[name] / count, 3)}
            for name, e in errors.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--rates", default="7,8")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=160)
    parser.add_argument("--gradient-sequences", type=int, default=40)
    parser.add_argument("--lams", default="0.001,0.01,0.1")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--attribution", action="store_true", help="which rows' rounding moves the answer (cal only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = bench.resolve_model(args.model)
    device, body = bench._workload(model, args.split)
    x, grads = gather(device, body, args.sequences, args.gradient_sequences)
    sigma = _robust_spread(x.astype(np.float32)).astype(np.float64)
    z = x / sigma[:, None]
    prompts = bench.default_prompts(args.prompts)
    sequences, z_eval = [], []
    for prompt in prompts:
        reference = bench._reference(model, args.split, prompt, args.new_tokens)
        prompt_ids = device.encode(prompt)
        ids = list(prompt_ids) + list(reference)
        sequences.append((ids, len(prompt_ids)))
        with torch.inference_mode():
            h = device.head.fork().forward(torch.tensor([ids]), 0)[0].float().numpy().astype(np.float64)
        z_eval.append(h / _robust_spread(h.astype(np.float32)).astype(np.float64)[:, None])
    z_eval = np.concatenate(z_eval)
    lams = [float(v) for v in args.lams.split(",") if v]
    if args.attribution:
        for rate in [float(r) for r in args.rates.split(",")]:
            transform = variants(z, grads, [])[0]
            step = step_for_rate(transform, z, z_eval, rate)
            print(json.dumps({"split": args.split, "rate": rate, **attribution(device, body, sequences, transform, step)}),
                  flush=True)
        return 0
    for rate in [float(r) for r in args.rates.split(",")]:
        for transform in variants(z, grads, lams):
            step = step_for_rate(transform, z, z_eval, rate)
            row = {"split": args.split, "rate": rate, "variant": transform.name, "log2_step": round(math.log2(step), 3)}
            row.update({k: round(v, 5) for k, v in evaluate(device, body, sequences, transform, step).items()})
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
