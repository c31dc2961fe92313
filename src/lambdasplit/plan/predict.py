"""The planner's cost model: each (split, codec, speculation source) -> predicted figures.

For a workload of P prompt tokens and M new tokens (greedy), with a speculation source that
commits `a` tokens and sends `n` positions per round trip (a = n = 1 without one):

    device(n, rows)   loop + LM head(rows) + the device's layers x the median layer's time at n
    server(n)         the body's compute for n positions: its layers x the server's compute per
                      layer (RESULT compute time / body layers, median over all sessions)
    exchange(n)       protocol + real network per exchange (wall - server compute), per codec
    link(n)           what the emulated link adds (wire/link.py): serialization of the
                      frame's wire bytes both ways + 2 x delay (+ expected loss retransmits)
    TTFT   = device(P, 1) + server(P) + exchange(P) + link(P)
    step   = device(n, n) + draft + server(n) + exchange(n) + link(n)
    time   = TTFT + (M - 1) / a * step;    tokens/s = M / time
    bytes per token = (handshake + bytes(P) + (M - 1) / a * bytes(n)) / M
    device memory   = weights of embedding, LM head, final norm and the device's layers
                      + KV cache of the device's layers for P + M positions

Each f(n) is measured at n = 1, k+1 and P and interpolated linearly between them.
Leakage comes from an audit report (`audit llm --out DIR` writes DIR/report.json).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.link import HEADER_BYTES, SEGMENT_BYTES, Link


def interpolate(table: dict, n: float) -> float:
    """Linear interpolation (and extrapolation) of {positions: value} at n."""
    points = sorted((int(k), float(v)) for k, v in table.items())
    if len(points) == 1:
        return points[0][1] * n / points[0][0]
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if n <= n1 or (n1, v1) == points[-1]:
            return v0 + (v1 - v0) * (n - n0) / (n1 - n0)
    return points[-1][1]


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


@dataclass
class Candidate:
    """One configuration and its predicted (and, once measured, measured) figures."""

    split: str
    codec: str
    speculate: str
    tokens_per_s: float = 0.0
    ttft_s: float = 0.0
    bytes_per_token: float = 0.0
    device_memory: int = 0
    leakage: float | None = None
    leakage_attack: str = ""
    agreement: float | None = None
    tokens_per_round_trip: float = 1.0
    breakdown: dict = field(default_factory=dict)
    measured: dict | None = None
    device_weights: str = "float"  # int8: the head's and tail's weights int8 weight-only (llm/lowbit.py)

    @property
    def label(self) -> str:
        return (f"{self.split} {self.codec}" + (f" +{self.speculate}" if self.speculate != "none" else "")
                + (f" {self.device_weights}-weights" if self.device_weights != "float" else ""))

    @property
    def seconds_per_token(self) -> float:
        return 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else math.inf


class Model:
    """The profiles, reduced to the functions of n the cost model needs."""

    def __init__(self, device: dict, server: dict, drafting: dict, *, prompt_tokens: int, new_tokens: int,
                 link: Link | None):
        self.device, self.server, self.drafting = device, server, drafting
        self.p, self.m = prompt_tokens, new_tokens
        self.link = link
        self.n_layers = device["layers"]
        sessions = server["sessions"]
        self.splits = list(sessions)
        self.codecs = list(dict.fromkeys(c for by_codec in sessions.values() for c in by_codec))
        # server compute per body layer and n: the median over every exchange of every session
        # of compute / body layers (a body's compute is its layers'; pooling all sessions is
        # what keeps one slow moment of a shared machine from deciding a split's figure)
        per_layer = []
        for split, by_codec in sessions.items():
            x, y = (int(v) for v in split.split(":"))
            per_layer += [{**r, "per_layer": r["compute"] / max(1, y - x)} for s in by_codec.values()
                          for r in _exchanges(s)]
        self.compute_per_layer = _by_n(per_layer, "per_layer")
        # exchange cost, bytes up/down and handshake per codec (median over splits)
        self.exchange, self.up, self.down, self.handshake = {}, {}, {}, {}
        for codec in self.codecs:
            runs = [by_codec[codec] for by_codec in sessions.values() if codec in by_codec]
            records = [{**r, "exchange": r["wall"] - r["compute"]} for s in runs for r in _exchanges(s)]
            self.exchange[codec] = _by_n(records, "exchange")
            self.up[codec] = _by_n(records, "up")
            self.down[codec] = _by_n(records, "down")
            self.handshake[codec] = _median(s["handshake_bytes"]["up"] + s["handshake_bytes"]["down"] for s in runs)
        self.agreement = {(split, codec): s.get("agreement") for split, by_codec in sessions.items()
                          for codec, s in by_codec.items()}
        # the near-tie guard's REFINE exchanges (client/generation.py): per (split, codec), refines per
        # generated step, and per codec the median refine's wall time and bytes
        self.refine_rate = {(split, codec): _refine_rate(s) for split, by_codec in sessions.items()
                            for codec, s in by_codec.items()}
        self.refine_cost = {}
        for codec in self.codecs:
            refines = [r for by_codec in sessions.values() if codec in by_codec
                       for r in by_codec[codec]["records"] if r["kind"] == "refine"]
            if refines:
                self.refine_cost[codec] = {key: _median(r[key] for r in refines) for key in ("wall", "up", "down")}

    def exchange_summary(self) -> dict:
        """Per codec, what the profile measured of the path to the server: the round trip of a
        one-position exchange beyond the server's compute, and the effective rate between the
        one-position and the prompt-sized exchange (protocol costs included: a lower bound of
        the network's own rate)."""
        out = {}
        for codec in self.codecs:
            exchange, up, down = self.exchange[codec], self.up[codec], self.down[codec]
            small, large = min(exchange), max(exchange)
            extra_bytes = (up[large] + down[large]) - (up[small] + down[small])
            extra_seconds = exchange[large] - exchange[small]
            out[codec] = {"round_trip_s": exchange[small],
                          "effective_mbit_s": extra_bytes * 8 / extra_seconds / 1e6 if extra_seconds > 0 else None}
        return out

    # ------------------------------------------------------------ parts

    def local_layers(self, split: str) -> list[int]:
        x, y = (int(v) for v in split.split(":"))
        return [i for i in range(self.n_layers) if i < x or i >= y]

    def device_seconds(self, split: str | None, n: float, rows: float) -> float:
        layers = range(self.n_layers) if split is None else self.local_layers(split)
        # decoder layers of one model cost the same: the median layer is the robust figure on a
        # machine shared with other jobs (the per-layer timings stay in the profile)
        per_layer = {k: _median(v) for k, v in self.device["layer_seconds"].items()}
        compute = len(layers) * interpolate(per_layer, n)
        return self.device["loop_seconds"] + interpolate(self.device["lm_head_seconds"], rows) + compute

    def server_seconds(self, split: str, n: float) -> float:
        x, y = (int(v) for v in split.split(":"))
        return (y - x) * interpolate(self.compute_per_layer, n)

    def frame_bytes(self, codec: str, n: float) -> tuple[float, float]:
        return interpolate(self.up[codec], n), interpolate(self.down[codec], n)

    def link_seconds(self, up_bytes: float, down_bytes: float) -> float:
        link = self.link
        if link is None:
            return 0.0
        seconds = 2 * link.delay_s
        for nbytes, bps in ((up_bytes, link.up_bps), (down_bytes, link.down_bps)):
            segments = max(1, math.ceil(nbytes / SEGMENT_BYTES))
            if bps is not None:
                seconds += (nbytes + segments * HEADER_BYTES) * 8 / bps
            if link.loss:  # the expected cost of the fast retransmits link.py emulates
                per_segment = 0.0 if bps is None else (min(nbytes, SEGMENT_BYTES) + HEADER_BYTES) * 8 / bps
                seconds += segments * link.loss * (2 * link.delay_s + per_segment)
        return seconds

    def exchange_seconds(self, codec: str, n: float) -> float:
        up, down = self.frame_bytes(codec, n)
        return interpolate(self.exchange[codec], n) + self.link_seconds(up, down)

    def memory(self, split: str) -> int:
        weights = self.device["weight_bytes"]
        layers = self.local_layers(split)
        total = weights["embed"] + weights["lm_head"] + weights["norm"] + sum(weights["layers"][i] for i in layers)
        return int(total + self.device["kv_bytes_per_position_per_layer"] * len(layers) * (self.p + self.m))

    def drafting_figures(self, source: str) -> tuple[float, float, float]:
        """(tokens per round trip, positions per round trip, the source's own seconds per round trip)."""
        if source == "none":
            return 1.0, 1.0, 0.0
        run = self.drafting["sources"][source]
        a, n = run["tokens_per_round_trip"], run["positions_per_round_trip"]
        later = max(1, run["steps"] - 1)
        model_seconds = self.device_seconds(None, self.p, 1) + later * self.device_seconds(None, n, n)
        return a, n, max(0.0, (run["seconds"] - model_seconds) / later)

    # ------------------------------------------------------------ a candidate

    def predict(self, split: str, codec: str, source: str) -> Candidate:
        p, m = self.p, self.m
        a, n, draft = self.drafting_figures(source)
        ttft = (self.device_seconds(split, p, 1) + self.server_seconds(split, p) + self.exchange_seconds(codec, p))
        step = self.device_seconds(split, n, n) + draft + self.server_seconds(split, n) + self.exchange_seconds(codec, n)
        steps = (m - 1) / a
        refine_s = refine_bytes = 0.0  # the near-tie guard's REFINEs, per step (the prompt's included)
        if source == "none" and codec in self.refine_cost:  # the guard refines plain steps only
            rate, cost = self.refine_rate.get((split, codec), 0.0), self.refine_cost[codec]
            refine_s = rate * (cost["wall"] + (self.link_seconds(cost["up"], cost["down"]) if self.link else 0.0))
            refine_bytes = rate * (cost["up"] + cost["down"])
        ttft += refine_s
        step += refine_s
        total = ttft + steps * step
        up_p, down_p = self.frame_bytes(codec, p)
        up_n, down_n = self.frame_bytes(codec, n)
        nbytes = self.handshake[codec] + up_p + down_p + steps * (up_n + down_n) + (1 + steps) * refine_bytes
        breakdown = {
            "step_s": step, "device_s": self.device_seconds(split, n, n), "draft_s": draft,
            "server_s": self.server_seconds(split, n), "exchange_s": interpolate(self.exchange[codec], n),
            "link_s": self.link_seconds(up_n, down_n), "positions_per_round_trip": n,
        }
        return Candidate(split, codec, source, tokens_per_s=m / total, ttft_s=ttft, bytes_per_token=nbytes / m,
                         device_memory=self.memory(split), agreement=self.agreement.get((split, codec)),
                         tokens_per_round_trip=a, breakdown=breakdown)

    def candidates(self, sources: list[str]) -> list[Candidate]:
        out = []
        for split in self.splits:
            for codec in self.codecs:
                if (split, codec) not in self.agreement:
                    continue  # that session failed: nothing measured to predict from
                for source in sources:
                    if source == "none" or source in self.drafting["sources"]:
                        out.append(self.predict(split, codec, source))
        return out


def _exchanges(session: dict) -> list[dict]:
    """A profiled session's STEP exchanges (its REFINE records apart)."""
    return [r for r in session["records"] if r.get("kind") != "refine"]


def _refine_rate(session: dict) -> float:
    """REFINEs per generated step of a profiled session (0 without the guard)."""
    steps = sum(1 for r in session["records"] if r.get("kind") == "step")
    refines = sum(1 for r in session["records"] if r.get("kind") == "refine")
    return refines / steps if steps else 0.0


def _by_n(records: list[dict], key: str) -> dict[int, float]:
    """{positions: median of record[key]} over exchange records."""
    grouped: dict[int, list[float]] = {}
    for record in records:
        grouped.setdefault(record["n"], []).append(record[key])
    return {n: _median(values) for n, values in grouped.items()}


# ---------------------------------------------------------------- leakage


def leakage_from_report(path: str | Path, attack: str = "worst") -> dict[str, tuple[float, str]]:
    """{split: (top-1 recovery of prompt tokens, attack)} from an `audit llm` report.json.

    "worst": the highest top-1 figure of any attack on either direction (reference rows, the
    vocabulary ceiling and the unigram guess, excluded); or one named attack's figure.
    """
    from lambdasplit.audit.report import NOT_ATTACKS

    try:
        report = json.loads(Path(path).read_text())
        rows = report["results"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LambdaSplitError(f"cannot read the audit report {path}: {error}") from None
    out: dict[str, tuple[float, str]] = {}
    for row in rows:
        if row.get("defense") != "none" or row.get("split") == "cloud" or row.get("positions") != "prompt":
            continue
        if row.get("attack") in NOT_ATTACKS or (attack != "worst" and row.get("attack") != attack):
            continue
        value = row.get("top1")
        if value is None:
            continue
        best = out.get(row["split"])
        if best is None or value > best[0]:
            out[row["split"]] = (float(value), row["attack"])
    if not out:
        raise LambdaSplitError(f"the audit report {path} has no per-split recovery figures"
                               + (f" for attack {attack!r}" if attack != "worst" else ""))
    return out
