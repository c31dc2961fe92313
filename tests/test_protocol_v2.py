"""Protocol version 2 as docs/protocol.md writes it, spoken with tests/rawproto.py's own sockets.

A version-1 HELLO gets an error naming both versions; WELCOME lists the capabilities, a
session id and a resume token; body STEP/RESULT carry a sequence number, checked exactly.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

import rawproto
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.server import BodyServer, BodyService, Limits
from rawproto import Peer

D = 64


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with BodyServer([BodyService(folder, "2:4")], limits=Limits(max_batch=8, prefill_chunk=32)) as server:
        yield server, Checkpoint(folder).fingerprint


def hello(fingerprint, **override):
    return {"protocol": 2, "role": "body", "model": fingerprint, "layers": [2, 4], "dtype": "float32",
            "codec": "fp32", **override}


def test_a_version_1_client_gets_an_error_naming_both_versions(served):
    server, fingerprint = served
    with Peer(server.address) as peer:
        peer.send(rawproto.json_frame(rawproto.HELLO, hello(fingerprint, protocol=1)))
        kind, body = peer.receive()
        error = json.loads(body)
    assert kind == rawproto.ERROR and error["code"] == "protocol_version"
    assert "protocol 2" in error["message"] and "sent 1" in error["message"]


def test_welcome_lists_capabilities_session_and_resume_token(served):
    server, fingerprint = served
    with Peer(server.address) as first, Peer(server.address) as second:
        a, b = first.hello(hello(fingerprint)), second.hello(hello(fingerprint))
    assert a["protocol"] == 2 and isinstance(a["session"], int) and a["session"] != b["session"]
    assert re.fullmatch(r"[0-9a-f]{32}", a["resume_token"]) and a["resume_token"] != b["resume_token"]
    caps = a["capabilities"]
    assert caps["batching"] == {"max_batch": 8, "prefill_chunk": 32}
    assert caps["max_positions_per_step"] == Limits().max_positions and caps["resume"] is False
    assert {"fp32", "fp16", "bf16", "int8/token", "int4/channel"} <= set(caps["codecs"])


def test_results_echo_the_sequence_number_and_wrong_numbers_are_refused(served):
    server, fingerprint = served
    rng = np.random.default_rng(0)
    with Peer(server.address) as peer:
        peer.hello(hello(fingerprint))
        for seq, (position, n) in enumerate([(0, 5), (5, 1), (6, 1), (4, 2)], start=1):  # the last cuts back
            peer.send(rawproto.step_frame(position, [rawproto.fp32_blob(rng.standard_normal((1, n, D)))], seq=seq))
            kind, body = peer.receive()
            assert kind == rawproto.RESULT
            assert struct.unpack_from("<II", body, 0) == (seq, position)
            assert struct.unpack_from("<3I", body, 17) == (1, n, D)  # after compute_us, the count, the blob header
        peer.send(rawproto.step_frame(6, [rawproto.fp32_blob(np.ones((1, 1, D)))], seq=4))  # a repeat
        assert peer.outcome() == "bad_sequence"
    for first in (0, 2):
        with Peer(server.address) as peer:
            peer.hello(hello(fingerprint))
            peer.send(rawproto.step_frame(0, [rawproto.fp32_blob(np.ones((1, 1, D)))], seq=first))
            assert peer.outcome() == "bad_sequence"
    with Peer(server.address) as peer:  # a version-1 STEP (no seq) is short or misread: refused, never run
        peer.hello(hello(fingerprint))
        peer.send(rawproto.frame(rawproto.STEP, struct.pack("<IB", 0, 1) + rawproto.fp32_blob(np.ones((1, 1, D)))))
        assert peer.outcome() in ("bad_sequence", "bad_frame", "bad_tensor")
