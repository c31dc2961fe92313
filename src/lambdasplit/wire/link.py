"""Link emulation in the transport: rate (up and down), one-way delay, loss.

Syntax (`--link`): comma-separated `key=value` items, or a preset name.

    up=81mbit,down=340mbit,delay=40ms     asymmetric rates, 40 ms one way
    rate=1000mbit                         same rate both ways (alias: a bare `1000mbit`)
    delay=40ms,loss=0.01                  1% packet loss, each loss costing a retransmission
    paper | 5g | wan                      presets (see PRESETS)

The model is applied at the client, which sees every frame of the session: a frame of
B bytes sent at time t reaches the server at t + B*8/up + delay; a frame the server
sends reaches the client no earlier than delay + B*8/down after it left, and no earlier
than the previous frame finished arriving (frames queue on the link). A lost packet
(1448-byte segments, each lost with probability `loss`) costs one round trip
(2 x delay) plus its own transmission again, like a fast retransmit.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

from lambdasplit.errors import LambdaSplitError

SEGMENT_BYTES = 1448  # TCP payload per Ethernet frame

PRESETS = {
    "paper": "rate=1000mbit,delay=0ms",  # the Λ-Split paper's 1 Gbit/s LAN
    "5g": "up=81mbit,down=340mbit,delay=0ms",  # as the PPIDM paper assumes
    "wan": "rate=100mbit,delay=40ms",
}

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def _rate(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|gbit)", text.strip().lower())
    if not match:
        raise LambdaSplitError(f"bad rate {text!r}: write e.g. 100mbit, 500kbit, 1gbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)\s*(ms|s|us)", text.strip().lower())
    if not match:
        raise LambdaSplitError(f"bad delay {text!r}: write e.g. 40ms, 0.5s")
    return float(match.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[match.group(2)]


@dataclass
class Link:
    """An emulated link. Rates in bit/s (None = unlimited), delay in seconds one way."""

    up_bps: float | None = None
    down_bps: float | None = None
    delay_s: float = 0.0
    loss: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self._random = random.Random(self.seed)
        self._down_free_at = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "Link | None":
        if not text:
            return None
        text = PRESETS.get(text.strip().lower(), text)
        link = cls()
        for item in [part for part in text.split(",") if part.strip()]:
            key, _, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not value:  # a bare "100mbit" or "40ms"
                key, value = ("delay", key) if key.endswith("s") and not key.endswith("bits") else ("rate", key)
            if key == "rate":
                link.up_bps = link.down_bps = _rate(value)
            elif key == "up":
                link.up_bps = _rate(value)
            elif key == "down":
                link.down_bps = _rate(value)
            elif key == "delay":
                link.delay_s = _seconds(value)
            elif key == "loss":
                link.loss = float(value)
                if not 0 <= link.loss < 1:
                    raise LambdaSplitError("loss must be in [0, 1)")
            else:
                raise LambdaSplitError(f"unknown link option {key!r} (use up, down, rate, delay, loss or a preset)")
        link.__post_init__()
        return link

    def describe(self) -> str:
        def rate(bps):
            return "unlimited" if bps is None else f"{bps / 1e6:g} Mbit/s"

        return f"up {rate(self.up_bps)}, down {rate(self.down_bps)}, delay {self.delay_s * 1e3:g} ms, loss {self.loss:g}"

    def _transfer(self, nbytes: int, bps: float | None) -> float:
        seconds = 0.0 if bps is None else nbytes * 8 / bps
        if self.loss:
            segments = max(1, math.ceil(nbytes / SEGMENT_BYTES))
            lost = sum(self._random.random() < self.loss for _ in range(segments))
            per_segment = 0.0 if bps is None else SEGMENT_BYTES * 8 / bps
            seconds += lost * (2 * self.delay_s + per_segment)
        return seconds

    def send(self, nbytes: int) -> None:
        """Hold a frame the client sends until it would have reached the server."""
        time.sleep(self._transfer(nbytes, self.up_bps) + self.delay_s)

    def receive(self, nbytes: int, first_byte_at: float) -> None:
        """Hold a received frame until it would have arrived over the emulated link."""
        start = max(first_byte_at + self.delay_s, self._down_free_at)
        arrival = start + self._transfer(nbytes, self.down_bps)
        self._down_free_at = arrival
        wait = arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
