"""Calibration of the `calK` codec (wire/calibrated.py) for one model and split: `lambdasplit calibrate`.

For both directions (up: the hidden state after layer X, feeding the body; down: after layer
Y, feeding the tail) it runs the model on calibration text, the chat-formatted KJV passages of
audit/data/kjv_train.txt (disjoint from the benchmark's prompts and held-out text), and measures
per vector sigma_t (robust spread), then:

    mean    per-channel median of x / sigma_t
    basis   eigenvectors of the covariance of x / sigma_t - mean (rows with a value beyond 200
            sigma, the attention-sink positions, left out: they are rare and travel at a wider shift)
    weight  per component 1 / sqrt(F_i), F_i the diagonal Fisher information of the output
            distribution w.r.t. that component (squared gradients of log p(y), y sampled from the
            model's own next-token distribution, at every position), normalised to geometric mean 1
    rice    per component, the Rice parameter that codes the calibration text shortest at K = 8

Cached under $LAMBDASPLIT_CACHE/calibration/, keyed by the model fingerprint and split.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from lambdasplit.wire.calibrated import DEFAULT_BOUND, MAX_RICE, MAX_WEIGHT, Table

SEQUENCES = 160  # chat-formatted passages of calibration text (~24k positions: the basis needs n >> D rows,
# or its smallest components are underestimated and cost bits on unseen text)
GRADIENT_SEQUENCES = 12  # of those, the ones that also measure the Fisher information (a backward pass each)
MAX_TOKENS = 200  # per passage
SINK_SIGMAS = 200.0
VERSION = 3  # bump when the procedure changes: old cached tables are then recomputed


def calibration_passages(tokenizer, count: int = SEQUENCES) -> list[list[int]]:
    """Token ids of `count` chat exchanges (user: 3 verses, assistant: the next 5) from kjv_train.txt."""
    return [_chat(tokenizer, user, reply) for user, reply in _exchanges(count)]


def _exchanges(count: int) -> list[tuple[str, str]]:
    from lambdasplit.audit.inverters import shipped_text

    lines = [line for line in shipped_text("kjv_train.txt").splitlines() if line.strip()]
    passages = []
    for i in range(count):
        first = (i * 8) % max(1, len(lines) - 8)
        user, reply = " ".join(lines[first:first + 3]), " ".join(lines[first + 3:first + 8])
        passages.append((user, reply))
    return passages


def _chat(tokenizer, user: str, reply: str) -> list[int]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(user + "\n" + reply)["input_ids"]
    return list(ids)[:MAX_TOKENS]



def _hidden(device, body, ids: list[int]):
    """(x at X, x at Y) for one passage, no gradients."""
    up = device.head.fork().forward(torch.tensor([ids]), 0)
    return up[0], body.fork().forward(up, 0)[0]


def _gradients(device, body, ids: list[int], generator: torch.Generator):
    """(x at X, d log p / d x at X, x at Y, d log p / d x at Y) for one passage, y sampled from p."""
    from lambdasplit.llm.segments import LayerStack

    run = LayerStack.forward.__wrapped__  # the stacks' forward without inference mode: gradients flow
    with torch.no_grad():
        up = device.head.fork().forward(torch.tensor([ids]), 0)
    up = up.clone().requires_grad_(True)
    tail = device.tail.fork()
    down = run(body.fork().stack, up, 0)
    out = run(tail.stack, down, 0)
    logits = tail.family.logits(tail.config, tail.lm_head(tail.norm(out)))[0].float()
    logp = torch.log_softmax(logits, -1)
    sampled = torch.multinomial(logp.exp().detach(), 1, generator=generator)[:, 0]
    grad_up, grad_down = torch.autograd.grad(logp.gather(1, sampled[:, None]).sum(), [up, down])
    return up.detach()[0], grad_up[0], down.detach()[0], grad_down[0]


def fit_table(rows: np.ndarray, grads: np.ndarray, grad_rows: np.ndarray) -> Table:
    """A direction's table from hidden states [n, D], and log-likelihood gradients [m, D] at grad_rows [m, D]."""
    from lambdasplit.wire.calibrated import _robust_spread, _zigzag

    rows = rows.astype(np.float64)
    sigma = _robust_spread(rows.astype(np.float32)).astype(np.float64)
    z = rows / sigma[:, None]
    bulk = np.abs(z).max(axis=1) < SINK_SIGMAS
    mean = np.median(z[bulk], axis=0)
    centered = z[bulk] - mean
    _, basis = np.linalg.eigh(centered.T @ centered / len(centered))
    basis = basis[:, ::-1]  # largest component first
    grad_sigma = _robust_spread(grad_rows.astype(np.float32)).astype(np.float64)
    fisher = ((grads.astype(np.float64) * grad_sigma[:, None]) @ basis) ** 2
    fisher = np.maximum(fisher.mean(axis=0), 1e-30)
    weight = np.sqrt(np.exp(np.log(fisher).mean()) / fisher)
    weight = np.clip(weight, 1 / MAX_WEIGHT, MAX_WEIGHT)
    steps = weight * math.sqrt(12.0) * 2.0**-DEFAULT_BOUND
    zigzag = _zigzag(np.round(centered @ basis / steps).astype(np.int64))
    candidates = np.arange(MAX_RICE + 1)
    cost = np.stack([(zigzag >> k).sum(axis=0) for k in candidates], axis=1) + len(zigzag) * (candidates + 1)
    rice = cost.argmin(axis=1).astype(np.uint8)
    return Table(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32), weight.astype(np.float32),
                 rice)


def cache_path(fingerprint: str, split: tuple[int, int]) -> Path:
    from lambdasplit.zoo.registry import cache_dir

    return cache_dir() / "calibration" / f"{fingerprint[:24]}-{split[0]}-{split[1]}-v{VERSION}.npz"


def calibrate(device, body, *, progress: bool = False, sequences: int = SEQUENCES,
              gradient_sequences: int = GRADIENT_SEQUENCES) -> tuple[Table, Table]:
    """(uplink table at X, downlink table at Y) for a loaded device (head + tail) and body."""
    from rich.progress import Progress

    generator = torch.Generator().manual_seed(0)
    grads: list[list[torch.Tensor]] = [[], [], [], []]
    rows: list[list[torch.Tensor]] = [[], []]
    exchanges = _exchanges(sequences)
    passages = [_chat(device.tokenizer, user, reply) for user, reply in exchanges]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"calibrating {device.split[0]}:{device.split[1]}", total=len(passages))
        for i, ids in enumerate(passages):
            if i < gradient_sequences:
                for part, tensor in zip(grads, _gradients(device, body, ids, generator)):
                    part.append(tensor.float())
            else:
                for part, tensor in zip(rows, _hidden(device, body, ids)):
                    part.append(tensor.float())
            bar.advance(task)
    up_x, up_g, down_x, down_g = (torch.cat(p).numpy() for p in grads)
    all_up, all_down = np.concatenate([up_x, *[t.numpy() for t in rows[0]]]), np.concatenate([down_x, *[t.numpy() for t in rows[1]]])
    # numpy's BLAS rounds matmul and eigh differently with its thread count (measured: OMP_NUM_THREADS=1
    # and the default give different tables for SmolLM2); one thread makes a table the same everywhere
    with threadpool_limits(limits=1, user_api="blas"):
        return fit_table(all_up, up_g, up_x), fit_table(all_down, down_g, down_x)


def load_cached(fingerprint: str, split: tuple[int, int]) -> tuple[Table, Table]:
    """The cached (up, down) tables, for a client that holds no body; a clear error when there are none."""
    from lambdasplit.errors import UsageError

    path = cache_path(fingerprint, split)
    if not path.exists():
        raise UsageError(f"no calibration for this model at split {split[0]}:{split[1]}: run "
                         f"`lambdasplit calibrate --model MODEL --split {split[0]}:{split[1]}` first")
    return _read(path)


def _read(path: Path) -> tuple[Table, Table]:
    with np.load(path) as saved:
        up, down = saved["up"].tobytes(), saved["down"].tobytes()
    width = int(np.frombuffer(up[:4], "<u4")[0])
    return Table.from_bytes(up, width), Table.from_bytes(down, width)


def load_or_calibrate(device, body, *, progress: bool = False) -> tuple[Table, Table]:
    """The cached tables for this model and split, computed (and cached) on first use."""
    path = cache_path(device.checkpoint.fingerprint, device.split)
    width = device.checkpoint.config.hidden_size
    if path.exists():
        up, down = _read(path)
        if up.width == width:
            return up, down
    up, down = calibrate(device, body, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + f".tmp{os.getpid()}-{time.time_ns()}.npz")
    np.savez(staging, up=np.frombuffer(up.to_bytes(), np.uint8), down=np.frombuffer(down.to_bytes(), np.uint8))
    os.replace(staging, path)  # atomically: a parallel run never reads half a file
    return up, down
