"""Link emulation in the client's transport: rate (up and down), one-way delay, loss.

It runs in user space at the client, so it needs no root and works in CI. The
`scripts/netns_crosscheck.py` run compares it with the kernel's own shaping (tbf on a
veth pair between two network namespaces); see docs/benchmarks.md.

Syntax (`--link`): comma-separated items; each is `key=value`, a bare value, or a preset.

    up=81mbit,down=340mbit,delay=40ms   asymmetric rates, 40 ms one way
    rate=1000mbit                       the same rate both ways
    1000mbit,0ms                        bare values: a rate (bit/kbit/mbit/gbit) or a delay (us/ms/s)
    delay=40ms,loss=0.01                1% of packets lost (also written loss=1%)
    wan,loss=0.5%                       a preset, then overrides (later items win)

Units follow tc: `mbit` is 10^6 bit/s (tc's `mbps` would be megabytes, so it is refused).

Presets (PRESETS):
    paper   1000 Mbit/s both ways, no added delay (the Λ-Split paper's testbed)
    5g      81 Mbit/s up, 340 Mbit/s down (what the PPIDM paper assumes), no added delay
    wan     100 Mbit/s both ways, 40 ms one way

Rates are of the wire, as tc's are: a frame of B bytes occupies the link as
wire_bytes(B) = B + 66 bytes per 1448-byte TCP segment (Ethernet, IP and TCP headers,
4.6% more for large frames), which is what the kernel's tbf shaper counts too.

The model, for each frame of B bytes (B*8/rate below means wire_bytes(B)*8/rate):
    client -> server: the frame enters the uplink when it is free and takes B*8/up to
        serialize, then `delay` to propagate. The client writes it to the socket at once
        (so the real loopback transfer overlaps the emulated one instead of adding to
        it) and remembers how much later than now it would have arrived: the lag.
    server -> client: a reply cannot start arriving before its first byte really did
        (the kernel's receive stamp, see wire/transport.py, not the time the client read
        it), plus that lag (the server would have started late by that much), plus
        `delay`; it is handed to the caller after B*8/down more, and no earlier than the
        previous frame finished (frames queue on the downlink). The client sleeps until then.
    So a request/response costs, on top of the real exchange, up + down serialization
    and 2 x delay, with a single sleep per frame received. This is exact for a protocol
    in which the client waits for each reply, as lambdasplit's does, and for a stream of
    replies to one request (cloud mode's TOKEN frames): each is timed from its own real
    arrival, so the stream pays 2 x delay once.
    loss: the frame is cut into 1448-byte TCP segments; each is lost with probability
        `loss` (seeded, reproducible) and costs a fast retransmit: one round trip
        (2 x delay) plus its own serialization again. This is the optimistic case (no
        retransmission timeout, no congestion-window cut), so it is a lower bound.

Only bytes the client sends or receives are shaped; server compute is never counted as
link time, which is what lets the benchmark split wall time into compute and
communication.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

from lambdasplit.errors import LambdaSplitError

SEGMENT_BYTES = 1448  # TCP payload of one Ethernet frame (MTU 1500 minus IP/TCP headers with timestamps)
HEADER_BYTES = 66  # what each such segment adds on the wire: Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12

PRESETS = {
    "paper": "rate=1000mbit,delay=0ms",  # the Λ-Split paper's 1 Gbit/s LAN
    "5g": "up=81mbit,down=340mbit,delay=0ms",  # as the PPIDM paper assumes
    "wan": "rate=100mbit,delay=40ms",
}

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SPIN_SECONDS = 0.001  # below this, spin instead of sleep: time.sleep overshoots by ~0.1 ms


def parse_rate(text: str) -> float:
    """'100mbit' -> 1e8 (bit/s, tc's units; 'mbps' is refused: tc means megabytes by it)."""
    match = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|gbit)", text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise LambdaSplitError(f"bad rate {text!r}: write e.g. 100mbit, 500kbit, 1gbit (bit/s, as tc does)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_delay(text: str) -> float:
    """'40ms' -> 0.04 seconds; 'us', 'ms' and 's' are accepted, a bare number is refused (which unit?)."""
    match = re.fullmatch(r"([0-9.]+)\s*(ms|s|us)", text.strip().lower())
    if not match:
        raise LambdaSplitError(f"bad delay {text!r}: write e.g. 40ms, 0.5s, 200us")
    return float(match.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[match.group(2)]


def _loss(text: str) -> float:
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise LambdaSplitError(f"bad loss {text!r}: write e.g. 0.01 or 1%") from None
    if not 0 <= value < 1:
        raise LambdaSplitError(f"loss must be in [0, 1), got {text!r}")
    return value


def wait_until(deadline: float) -> None:
    """Sleep until `deadline` (a time.perf_counter value), spinning for the last millisecond.

    Frames on a fast link take microseconds; time.sleep would add ~0.1 ms to each.
    """
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_SECONDS:
        time.sleep(remaining - _SPIN_SECONDS)
    while time.perf_counter() < deadline:
        pass


@dataclass
class Link:
    """An emulated link. Rates in bit/s (None = unlimited), delay in seconds one way, loss a probability."""

    up_bps: float | None = None
    down_bps: float | None = None
    delay_s: float = 0.0
    loss: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget queued frames and restart the loss sequence (each session starts on an idle link)."""
        self._random = random.Random(self.seed)
        self._up_free_at = 0.0
        self._down_free_at = 0.0
        self._lag = 0.0  # how much later than really sent the last request would have reached the server

    @classmethod
    def parse(cls, text: "str | Link | None") -> "Link | None":
        """A Link from the `--link` syntax (module doc); None or "" means no emulation."""
        if text is None or isinstance(text, Link):
            return text
        if not text.strip():
            return None
        link = cls()
        items = [part.strip() for part in text.split(",") if part.strip()]
        expanded = []
        for item in items:  # presets expand in place, so later items override them
            preset = PRESETS.get(item.lower())
            expanded += preset.split(",") if preset else [item]
        for item in expanded:
            key, _, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not value:  # a bare "100mbit" or "40ms"
                key, value = ("rate", key) if key.endswith("bit") else ("delay", key)
            if key == "rate":
                link.up_bps = link.down_bps = parse_rate(value)
            elif key == "up":
                link.up_bps = parse_rate(value)
            elif key == "down":
                link.down_bps = parse_rate(value)
            elif key == "delay":
                link.delay_s = parse_delay(value)
            elif key == "loss":
                link.loss = _loss(value)
            elif key == "seed":
                link.seed = int(value)
            else:
                raise LambdaSplitError(
                    f"unknown link option {key!r}: use up=, down=, rate=, delay=, loss=, seed= "
                    f"or a preset ({', '.join(PRESETS)})")
        link.reset()
        return link

    def describe(self) -> str:
        def rate(bps):
            return "unlimited" if bps is None else f"{bps / 1e6:g} Mbit/s"

        text = f"up {rate(self.up_bps)}, down {rate(self.down_bps)}, delay {self.delay_s * 1e3:g} ms"
        return text + (f", loss {self.loss:g}" if self.loss else "")

    @staticmethod
    def wire_bytes(nbytes: int) -> int:
        """Bytes on the wire for `nbytes` of TCP payload: each 1448-byte segment carries 66 bytes of headers."""
        return nbytes + max(1, math.ceil(nbytes / SEGMENT_BYTES)) * HEADER_BYTES

    def transfer_seconds(self, nbytes: int, bps: float | None) -> float:
        """Serialization time of `nbytes` of payload, plus the cost of the segments lost on the way."""
        seconds = 0.0 if bps is None else self.wire_bytes(nbytes) * 8 / bps
        if self.loss:
            segments = max(1, math.ceil(nbytes / SEGMENT_BYTES))
            lost = sum(self._random.random() < self.loss for _ in range(segments))
            per_segment = 0.0 if bps is None else (min(nbytes, SEGMENT_BYTES) + HEADER_BYTES) * 8 / bps
            seconds += lost * (2 * self.delay_s + per_segment)
        return seconds

    def send(self, nbytes: int) -> None:
        """A frame the client sends: queue it on the uplink and note how late it would arrive."""
        now = time.perf_counter()
        self._up_free_at = max(now, self._up_free_at) + self.transfer_seconds(nbytes, self.up_bps)
        self._lag = self._up_free_at + self.delay_s - now

    def receive(self, nbytes: int, first_byte_at: float) -> None:
        """Hold a received frame until it would have arrived over the emulated link."""
        start = max(first_byte_at + self._lag + self.delay_s, self._down_free_at)
        self._down_free_at = start + self.transfer_seconds(nbytes, self.down_bps)
        wait_until(self._down_free_at)

    def minimum_seconds(self, bytes_up: int, bytes_down: int, round_trips: int) -> float:
        """The least communication time the emulation adds: serialization both ways plus 2 x delay per round trip.

        Approximate for many frames: headers are counted as if the bytes were one frame each way.
        """
        up = 0.0 if self.up_bps is None else self.wire_bytes(bytes_up) * 8 / self.up_bps
        down = 0.0 if self.down_bps is None else self.wire_bytes(bytes_down) * 8 / self.down_bps
        return up + down + 2 * self.delay_s * round_trips
