"""Fuzz and fault suite: a real server process attacked over loopback with plain sockets.

Speaks docs/protocol.md with its own socket code (tests/rawproto.py), not lambdasplit's
client. Bounded and seeded: a fixed number of cases from `random.Random(SEED)`, each
socket with a timeout, the whole module in well under 90 s here. For every attack the
answer must be an ERROR frame with a documented code, or a clean close; never
`internal_error`. A legitimate "witness" session runs its steps between the attacks and
must get bit-for-bit the outputs it gets alone; the server's memory must stay bounded,
and every attacker's session and KV grant must be gone at the end.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time

import numpy as np
import pytest

import rawproto
from rawproto import DOCUMENTED_CODES, REFINE, Peer
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.server.process import ServerProcess

SEED = 20261202
D = 64  # the tiny llama's hidden size
LAYERS = [2, 4]
MAX_POSITIONS = 64
TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def fingerprint(model):
    return Checkpoint(model).fingerprint


@pytest.fixture(scope="module")
def server(model):
    args = ["--model", model, "--layers", "2:4", "--max-positions", str(MAX_POSITIONS), "--max-frame-mb", "1",
            "--idle-timeout", "3", "--hello-timeout", "2", "--write-timeout", "2", "--max-sessions", "64",
            "--max-pending-per-client", "32"]
    with ServerProcess(args, env={"LAMBDASPLIT_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}) as process:
        yield process


def hello(fingerprint, **override) -> dict:
    message = {"protocol": 2, "role": "body", "model": fingerprint, "layers": LAYERS, "dtype": "float32",
               "codec": "fp32", "token": TOKEN}
    message.update(override)
    return {k: v for k, v in message.items() if v is not None}


class Witness:
    """A well-behaved session, stepping through a fixed input between attacks."""

    def __init__(self, address: str, fingerprint: str):
        rng = np.random.default_rng(SEED)
        self.inputs = [rng.standard_normal((1, 5, D)).astype(np.float32)] + \
            [rng.standard_normal((1, 1, D)).astype(np.float32) for _ in range(54)]
        self.address, self.fingerprint = address, fingerprint

    def run_alone(self) -> list[np.ndarray]:
        with Peer(self.address) as peer:
            peer.hello(hello(self.fingerprint))
            return self._steps(peer, range(len(self.inputs)))

    def _steps(self, peer, indices) -> list[np.ndarray]:
        outputs = []
        for i in indices:
            position = 0 if i == 0 else 4 + i
            outputs.append(peer.step(position, self.inputs[i]))
        return outputs


def expect_refusal(outcome: str, case: str) -> None:
    assert outcome != "internal_error", case
    assert outcome == "closed" or outcome in DOCUMENTED_CODES, f"{case}: answered {outcome}"


def attack(address: str, frames: list[bytes], case: str, *, after_hello: dict | None = None) -> str:
    """Send the frames, then end our side (a truncated frame is then cut, not waited for)."""
    with Peer(address, timeout=15) as peer:
        if after_hello is not None:
            peer.hello(after_hello)
        for data in frames:
            if not peer.send(data):
                break
        peer.finish()
        outcome = peer.outcome()
        while outcome == "RESULT":  # legitimate steps before the hostile one
            outcome = peer.outcome()
    expect_refusal(outcome, case)
    return outcome


def hostile_handshakes(fingerprint: str, rng: random.Random) -> list[tuple[str, list[bytes]]]:
    good = hello(fingerprint)
    cases = []
    for _ in range(40):  # random bytes, with and without a plausible header
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        cases.append(("random bytes", [junk]))
    for length in (0, 2**32 - 1, 2**20, 70000):  # lying lengths (0; huge; beyond the HELLO limit)
        cases.append((f"length {length}", [struct.pack("<IB", length, rawproto.HELLO) + b"{}"]))
    body = json.dumps(good).encode()
    for cut in sorted(rng.sample(range(1, len(body)), 4)):  # truncated HELLOs
        cases.append((f"HELLO cut at {cut}", [struct.pack("<IB", len(body) + 1, rawproto.HELLO) + body[:cut]]))
    for text in (b"[" * 50000, b'{"protocol":' + b"9" * 4000 + b"}", b'"just a string"', b"{", b"\xff\xfe",
                 b'{"protocol": 2, "token": "\\udfff"}', b"[]", b"null", b'{"a":' * 40 + b"0" + b"}" * 40):
        cases.append((f"bad JSON {text[:20]!r}", [rawproto.frame(rawproto.HELLO, text)]))
    wrong_values = {
        "protocol": [0, 1, 3, True, 2.0, "2", None, [2]], "role": ["", "unet", 3, None, {"a": 1}],
        "model": ["", "0" * 32, 5, None], "layers": [[2, 5], [4, 2], [2.0, 4.0], [True, 4], "2:4", [2], None],
        "dtype": ["float64", "", 32], "codec": ["int8/", "int9", "fp8", "", 8, "fp16/token", "INT8"],  # optional
        "token": ["wrong", "", 7, None, ["fuzz-token"], "fuzz-token\x00"],
    }
    for key, values in wrong_values.items():  # every field of HELLO wrong in turn
        for value in values:
            message = dict(good)
            if value is None:
                del message[key]
            else:
                message[key] = value
            cases.append((f"HELLO {key}={value!r}", [rawproto.json_frame(rawproto.HELLO, message)]))
    for kind in (rawproto.STEP, rawproto.CLOSE, rawproto.GENERATE, rawproto.RESULT, 0, 200):  # not HELLO first
        cases.append((f"type {kind} before HELLO", [rawproto.frame(kind, b"\x00" * 8)]))
    return cases


def hostile_steps(rng: random.Random) -> list[tuple[str, list[bytes]]]:
    def blob(shape, values=None):
        array = np.zeros(shape, dtype=np.float32) if values is None else values
        return rawproto.fp32_blob(array)

    ok = blob((1, 2, D))
    cases = [
        ("wrong width", [rawproto.step_frame(0, [blob((1, 2, D + 1))])]),
        ("batch of 2", [rawproto.step_frame(0, [blob((2, 2, D))])]),
        ("2-D tensor", [rawproto.step_frame(0, [blob((2, D))])]),
        ("zero positions", [rawproto.step_frame(0, [blob((1, 0, D))])]),
        ("no tensor", [rawproto.step_frame(0, [])]),
        ("two tensors", [rawproto.step_frame(0, [ok, ok])]),
        ("NaN", [rawproto.step_frame(0, [blob((1, 2, D), np.full((1, 2, D), np.nan, np.float32))])]),
        ("Inf", [rawproto.step_frame(0, [blob((1, 2, D), np.full((1, 2, D), np.inf, np.float32))])]),
        ("position beyond the cache", [rawproto.step_frame(5, [ok])]),
        ("position 2^32-1", [rawproto.step_frame(2**32 - 1, [ok])]),
        ("too many positions", [rawproto.step_frame(0, [blob((1, MAX_POSITIONS + 1, D))])]),
        ("positions past the limit in steps", [rawproto.step_frame(0, [blob((1, MAX_POSITIONS - 1, D))]),
                                               rawproto.step_frame(MAX_POSITIONS - 1, [ok], seq=2)]),
        ("sequence number 0", [rawproto.step_frame(0, [ok], seq=0)]),
        ("sequence number 2 first", [rawproto.step_frame(0, [ok], seq=2)]),
        ("sequence number repeated", [rawproto.step_frame(0, [ok]), rawproto.step_frame(2, [ok], seq=1)]),
        ("sequence number 2^32-1", [rawproto.step_frame(0, [ok], seq=2**32 - 1)]),
        ("fp16 in an fp32 session", [rawproto.step_frame(0, [rawproto.blob_header(1, 16, 0, [1, 2, D]) +
                                                             bytes(4 * D)])]),
        ("int2 declaring 2^30 values", [rawproto.step_frame(0, [rawproto.blob_header(3, 2, 0, [1, 2**24, D]) +
                                                                bytes(8) + bytes(1000)])]),
        ("unknown codec kind", [rawproto.step_frame(0, [rawproto.blob_header(9, 8, 0, [1, 2, D]) + bytes(128)])]),
        ("ndim 200", [rawproto.step_frame(0, [bytes([0, 32, 0, 200]) + bytes(64)])]),
        ("shape that overflows", [rawproto.step_frame(0, [rawproto.blob_header(0, 32, 0, [2**32 - 1] * 8)])]),
        ("truncated payload", [rawproto.step_frame(0, [ok[:-7]])]),
        ("bytes after the tensor", [rawproto.step_frame(0, [ok + b"\x00"])]),
        ("STEP shorter than its position", [rawproto.frame(rawproto.STEP, b"\x00\x00")]),
        ("oversized frame", [struct.pack("<IB", 2 * 2**20, rawproto.STEP)]),
        ("GENERATE to a body", [rawproto.json_frame(rawproto.GENERATE, {"prompt": "x", "max_new_tokens": 1})]),
        ("second HELLO", [rawproto.json_frame(rawproto.HELLO, {"protocol": 2})]),
        ("unknown frame type", [rawproto.frame(77, b"")]),
        ("REFINE before any STEP", [rawproto.frame(REFINE, struct.pack("<I", 1))]),
        ("REFINE of a future STEP", [rawproto.step_frame(0, [ok]), rawproto.frame(REFINE, struct.pack("<I", 2))]),
        ("REFINE of 3 bytes", [rawproto.step_frame(0, [ok]), rawproto.frame(REFINE, b"\x01\x00\x00")]),
        ("REFINE of 400 bytes", [rawproto.step_frame(0, [ok]), rawproto.frame(REFINE, bytes(400))]),
        ("a refinement (kind 7) as a STEP's tensor", [rawproto.step_frame(0, [rawproto.blob_header(7, 4, 1, [1, 1, D])
                                                                              + bytes(5 + D // 2)])]),
        ("length 0", [struct.pack("<IB", 0, rawproto.STEP)]),
    ]
    for _ in range(10):  # random bytes as a REFINE body, after a good STEP
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 12)))
        cases.append(("random REFINE body", [rawproto.step_frame(0, [ok]), rawproto.frame(REFINE, body)]))
    for _ in range(30):  # random bytes as a STEP body
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600)))
        cases.append(("random STEP body", [rawproto.frame(rawproto.STEP, body)]))
    for _ in range(20):  # a good STEP with one random byte changed
        frame = bytearray(rawproto.step_frame(0, [ok]))
        index = rng.randrange(5, 30)
        frame[index] = rng.getrandbits(8)
        cases.append((f"flipped byte {index}", [bytes(frame)]))
    return cases


def test_fuzz_and_faults_leave_a_legitimate_session_exact(server, fingerprint):
    began = time.monotonic()
    rng = random.Random(SEED)
    witness = Witness(server.address, fingerprint)
    alone = witness.run_alone()
    before = rawproto.peak_rss_bytes(server.process.pid)

    with Peer(server.address) as honest:
        honest.hello(hello(fingerprint))
        beside = witness._steps(honest, [0])
        cases_done = 0
        handshakes = hostile_handshakes(fingerprint, rng)
        steps = hostile_steps(rng)
        for i, (case, frames) in enumerate(handshakes):
            attack(server.address, frames, case)
            if i % 8 == 0:
                beside += witness._steps(honest, [len(beside)])
            cases_done += 1
        for i, (case, frames) in enumerate(steps):
            attack(server.address, frames, case, after_hello=hello(fingerprint))
            if i % 3 == 0:
                beside += witness._steps(honest, [len(beside)])
            cases_done += 1
        # Cut-backs are legal (they rewind the cache); past the cache they are out_of_order.
        with Peer(server.address) as rewinder:
            rewinder.hello(hello(fingerprint))
            rewinder.step(0, np.ones((1, 4, D), np.float32))
            rewinder.step(1, np.ones((1, 1, D), np.float32))  # cut back to 1, then 2 cached
            rewinder.send(rawproto.step_frame(3, [rawproto.fp32_blob(np.ones((1, 1, D), np.float32))], seq=3))
            assert rewinder.outcome() == "out_of_order"
        beside += witness._steps(honest, range(len(beside), len(witness.inputs)))
    assert cases_done >= 170
    for got, want in zip(beside, alone, strict=True):
        assert np.array_equal(got, want), "the witness's outputs changed beside the attacks"
    grown = rawproto.peak_rss_bytes(server.process.pid) - before
    assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB during the fuzz"
    assert time.monotonic() - began < 300  # a runaway bound, not a speed goal


def test_slow_writers_are_timed_out_while_others_are_served(server, fingerprint):
    """Slowloris: a HELLO a byte at a time, a STEP that never completes (never-reading clients:
    test_hardening.py::test_clients_that_never_read_do_not_stall_the_server)."""
    witness = Witness(server.address, fingerprint)
    slow_hello = Peer(server.address, timeout=20)
    body = json.dumps(hello(fingerprint)).encode()
    slow_hello.send(struct.pack("<IB", len(body) + 1, rawproto.HELLO) + body[:3])
    half_step = Peer(server.address, timeout=20)
    half_step.hello(hello(fingerprint))
    half_step.send(rawproto.step_frame(0, [rawproto.fp32_blob(np.ones((1, 4, D), np.float32))])[:40])
    stop = threading.Event()

    def trickle():  # one byte every 0.5 s: never a whole HELLO within the 2 s hello timeout
        for byte in body[3:]:
            if stop.wait(0.5) or not slow_hello.send(bytes([byte])):
                return

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    served = witness.run_alone()  # while both slow peers hold their connections
    for got, want in zip(served, Witness(server.address, fingerprint).run_alone(), strict=True):
        assert np.array_equal(got, want)
    assert slow_hello.outcome() in ("idle_timeout", "closed")
    assert half_step.outcome() in ("idle_timeout", "closed")
    stop.set()
    slow_hello.close()
    half_step.close()


def test_many_sessions_and_connections_are_refused_by_name(server, fingerprint):
    peers = []
    try:
        outcomes = []
        for _ in range(70):  # the server allows 64 sessions per client here
            peer = Peer(server.address, timeout=15)
            peer.send(rawproto.json_frame(rawproto.HELLO, hello(fingerprint)))
            outcomes.append(peer.outcome())
            peers.append(peer)
        assert outcomes.count("WELCOME") == 64 and set(outcomes[64:]) == {"too_many_sessions"}
    finally:
        for peer in peers:
            peer.close()
    silent = [Peer(server.address, timeout=15) for _ in range(40)]  # 32 pending allowed per client
    try:
        refused = [p.outcome() for p in silent[32:]]
        assert set(refused) == {"too_many_connections"}, refused
    finally:
        for peer in silent:
            peer.close()
