"""Link emulation (wire/link.py): the `--link` syntax, presets, and the timing model itself.

End-to-end checks through a real server (delay adds 2 x delay per round trip and a cloud
row's streamed tokens pay it once, a 10 Mbit/s link makes the no-cache rows take
bytes / rate) are in tests/test_bench_llm.py; streamed frames against a fake server, with
and without TLS, in tests/test_transport.py.
"""

from __future__ import annotations

import time

import pytest

from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.link import PRESETS, SEGMENT_BYTES, Link, parse_delay, parse_rate


def test_presets_match_the_papers():
    paper, fiveg, wan = Link.parse("paper"), Link.parse("5g"), Link.parse("wan")
    assert (paper.up_bps, paper.down_bps, paper.delay_s) == (1e9, 1e9, 0.0)
    assert (fiveg.up_bps, fiveg.down_bps, fiveg.delay_s) == (81e6, 340e6, 0.0)
    assert (wan.up_bps, wan.down_bps, wan.delay_s) == (100e6, 100e6, 0.040)
    assert set(PRESETS) == {"paper", "5g", "wan"}


@pytest.mark.parametrize("text, up, down, delay, loss", [
    ("up=81mbit,down=340mbit,delay=40ms", 81e6, 340e6, 0.040, 0.0),
    ("rate=500kbit", 500e3, 500e3, 0.0, 0.0),
    ("1000mbit,0ms", 1e9, 1e9, 0.0, 0.0),
    ("1gbit, 2s", 1e9, 1e9, 2.0, 0.0),
    ("delay=250us,loss=0.01", None, None, 250e-6, 0.01),
    ("wan,loss=1%", 100e6, 100e6, 0.040, 0.01),
    ("wan,delay=5ms,down=1gbit", 100e6, 1e9, 0.005, 0.0),  # later items override the preset
])
def test_syntax(text, up, down, delay, loss):
    link = Link.parse(text)
    assert (link.up_bps, link.down_bps, link.loss) == (up, down, loss)
    assert link.delay_s == pytest.approx(delay)


@pytest.mark.parametrize("text, message", [
    ("rate=10mbps", "bad rate"),  # tc's mbps means megabytes: refused rather than guessed
    ("up=fast", "bad rate"),
    ("delay=40", "bad delay"),
    ("loss=1.5", "loss must be in"),
    ("loss=lots", "bad loss"),
    ("jitter=5ms", "unknown link option 'jitter'"),
    ("rate=0mbit", "bad rate"),
])
def test_bad_syntax_is_explained(text, message):
    with pytest.raises(LambdaSplitError, match=message):
        Link.parse(text)


def test_the_parsers_scripts_reuse():
    """scripts/netns_crosscheck.py parses --delay and the rates with these, as --link does."""
    assert parse_delay("500us") == pytest.approx(500e-6)
    assert parse_delay("20ms") == pytest.approx(0.020) and parse_delay("0.5s") == 0.5
    assert parse_rate("10mbit") == 10e6 and parse_rate("1.5gbit") == 1.5e9
    for bare in ("40", "0.04"):  # seconds or milliseconds? refused rather than guessed
        with pytest.raises(LambdaSplitError, match="bad delay"):
            parse_delay(bare)


def test_no_link():
    assert Link.parse(None) is None and Link.parse("") is None
    link = Link(delay_s=0.001)
    assert Link.parse(link) is link


def test_describe():
    assert Link.parse("5g").describe() == "up 81 Mbit/s, down 340 Mbit/s, delay 0 ms"
    assert Link.parse("wan,loss=0.02").describe() == "up 100 Mbit/s, down 100 Mbit/s, delay 40 ms, loss 0.02"


def test_a_reply_waits_for_the_request_serialization_and_two_delays():
    link = Link.parse("up=8mbit,delay=5ms")  # 1 MB/s: 10 kB take 10 ms (10.5 with headers)
    began = time.perf_counter()
    link.send(10_000)  # written at once: the real transfer overlaps the emulated one
    assert time.perf_counter() - began < 0.005
    link.receive(100, time.perf_counter())  # the reply: 10 ms up + 5 ms there + 5 ms back
    elapsed = time.perf_counter() - began
    assert 0.020 <= elapsed < 0.5  # upper bound loose: a loaded machine wakes sleepers late


def test_received_frames_queue_on_the_downlink():
    link = Link.parse("down=8mbit,delay=2ms")
    first_byte_at = time.perf_counter()
    link.receive(5_000, first_byte_at)  # arrives at +2 ms + 5 ms
    link.receive(5_000, first_byte_at)  # its bytes follow the first frame's: +12 ms
    assert time.perf_counter() - first_byte_at >= 0.012


def test_minimum_seconds_count_the_headers_of_every_segment():
    link = Link.parse("up=10mbit,down=20mbit,delay=10ms")
    wire = 1_448_000 + 1000 * 66  # 1000 full segments, 66 header bytes each
    assert Link.wire_bytes(1_448_000) == wire and Link.wire_bytes(10) == 76
    assert link.minimum_seconds(1_448_000, 1_448_000, 3) == pytest.approx(wire * 8 / 10e6 + wire * 8 / 20e6 + 0.06)


def test_loss_costs_a_round_trip_per_lost_segment_and_is_reproducible():
    lossless = Link.parse("rate=100mbit,delay=10ms")
    lossy = Link.parse("rate=100mbit,delay=10ms,loss=0.1,seed=7")
    nbytes = 1000 * SEGMENT_BYTES
    base = lossless.transfer_seconds(nbytes, lossless.up_bps)
    extra = lossy.transfer_seconds(nbytes, lossy.up_bps) - base
    per_loss = 2 * 0.010 + (SEGMENT_BYTES + 66) * 8 / 100e6
    lost = extra / per_loss
    assert lost == pytest.approx(round(lost), abs=1e-6)  # a whole number of lost segments
    assert 60 <= lost <= 140  # about 10% of 1000
    again = Link.parse("rate=100mbit,delay=10ms,loss=0.1,seed=7")
    assert again.transfer_seconds(nbytes, again.up_bps) - base == pytest.approx(extra)
