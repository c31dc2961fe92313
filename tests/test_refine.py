"""The near-tie guard: REFINE (docs/protocol.md) on the wire, and StepModel's use of it.

Raw frames (tests/rawproto.py): after a STEP, REFINE with its seq returns that RESULT's last
row again as an fp16 blob, equal to the fp32 answer rounded to fp16; a REFINE of another seq,
before any STEP, or of the wrong length is refused with one line and the server serves on.
Over a real session with a lossy codec, a guard that refines every step gives the same tokens
as the in-process guard of `bench codecs` (bench/codecs.py CodedBody), one more round trip per
refinement, and no guard at all for a float codec.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import pytest

import rawproto
from lambdasplit.bench.codecs import CodedBody
from lambdasplit.client.device import DeviceModel
from lambdasplit.client.remote import FailoverBody
from lambdasplit.client.run import default_refine_gap
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.segments import load_body
from lambdasplit.server import BodyServer, BodyService, Limits
from lambdasplit.wire.codecs import get_codec
from rawproto import Peer

D = 64
REFINE = rawproto.REFINE
EVERY_STEP = 1e9  # a gap every step is below: the guard refines them all


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with BodyServer([BodyService(folder, "2:4")], limits=Limits(max_batch=4, prefill_chunk=32)) as server:
        yield server, folder


def hello(fingerprint):
    return {"protocol": 2, "role": "body", "model": fingerprint, "layers": [2, 4], "dtype": "float32", "codec": "fp32"}


def test_refine_resends_the_last_row_in_fp16_and_bad_ones_are_refused(served):
    server, folder = served
    fingerprint = Checkpoint(folder).fingerprint
    rng = np.random.default_rng(0)
    with Peer(server.address) as peer:
        welcome = peer.hello(hello(fingerprint))
        assert welcome["capabilities"]["refine"] is True
        peer.send(rawproto.step_frame(0, [rawproto.fp32_blob(rng.standard_normal((1, 5, D)))], seq=1))
        kind, body = peer.receive()
        assert kind == rawproto.RESULT
        answer = np.frombuffer(body, "<f4", 5 * D, 12 + 1 + 16).reshape(5, D)
        peer.send(rawproto.frame(REFINE, struct.pack("<I", 1)))
        kind, body = peer.receive()
        assert kind == rawproto.RESULT
        assert struct.unpack_from("<II", body, 0) == (1, 4)  # the seq, and the row's own position
        assert struct.unpack_from("<BBBB3I", body, 13) == (1, 16, 0, 3, 1, 1, D)  # fp16, [1, 1, D]
        refined = np.frombuffer(body, "<f2", D, 13 + 16).astype(np.float32)
        assert np.array_equal(refined, answer[-1].astype(np.float16).astype(np.float32))
        assert len(body) == 13 + 16 + 2 * D
        peer.send(rawproto.frame(REFINE, struct.pack("<I", 2)))  # no STEP 2 yet
        assert peer.outcome() == "bad_sequence"
    with Peer(server.address) as peer:
        peer.hello(hello(fingerprint))
        peer.send(rawproto.frame(REFINE, struct.pack("<I", 1)))  # before any STEP
        assert peer.outcome() == "bad_sequence"
    with Peer(server.address) as peer:
        peer.hello(hello(fingerprint))
        peer.send(rawproto.step_frame(0, [rawproto.fp32_blob(rng.standard_normal((1, 2, D)))], seq=1))
        assert peer.receive()[0] == rawproto.RESULT
        peer.send(rawproto.frame(REFINE, struct.pack("<IB", 1, 0)))  # 5 bytes
        assert peer.outcome() == "bad_frame"
    with Peer(server.address) as peer:  # and the server serves on
        peer.hello(hello(fingerprint))
        peer.send(rawproto.step_frame(0, [rawproto.fp32_blob(np.ones((1, 1, D)))], seq=1))
        assert peer.receive()[0] == rawproto.RESULT


def test_a_guard_over_the_wire_equals_the_in_process_guard(served):
    server, folder = served
    device = DeviceModel.load(folder, "2:4")
    codec = get_codec("int4", default_granularity="token")
    new_tokens = 12
    expected = {}
    for gap in (0.0, EVERY_STEP):
        coded = CodedBody(load_body(device.checkpoint, 2, 4), codec, codec)
        result = device.generate("the quick brown fox", body=coded, max_new_tokens=new_tokens, ignore_eos=True,
                                 refine_gap=gap)
        expected[gap] = (result.token_ids, result.refined)
    for gap in (0.0, EVERY_STEP):
        with FailoverBody.for_device(device, server.address, codec="int4") as body:
            assert body.can_refine
            result = device.generate("the quick brown fox", body=body, max_new_tokens=new_tokens, ignore_eos=True,
                                     refine_gap=gap)
            assert (result.token_ids, result.refined) == expected[gap]
            assert result.refined == (new_tokens if gap else 0)  # every step, the prompt's included
            assert body.round_trips == new_tokens + result.refined
            assert body.live.refinements == result.refined


def test_float_codecs_have_no_guard(served):
    server, folder = served
    assert default_refine_gap("fp32") == default_refine_gap("fp16") == 0.0 and default_refine_gap("cal7") > 0
    device = DeviceModel.load(folder, "2:4")
    with FailoverBody.for_device(device, server.address, codec="fp16") as body:
        assert not body.can_refine
        result = device.generate("the quick brown fox", body=body, max_new_tokens=4, ignore_eos=True,
                                 refine_gap=EVERY_STEP)
        assert result.refined == 0 and body.round_trips == 4


def test_a_refine_after_the_server_died_replays_on_the_next_and_answers_the_same(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    device = DeviceModel.load(folder, "2:4")
    first = BodyServer([BodyService(folder, "2:4")]).start_in_thread()
    with BodyServer([BodyService(folder, "2:4")]) as second:
        with FailoverBody.for_device(device, [first.address, second.address], codec="int4") as body:
            device.generate("the quick brown fox", body=body, max_new_tokens=5, ignore_eos=True)
            before = body.refine()
            first.stop()
            after = body.refine()  # the first server is gone: a new session, the history replayed, then REFINE
            assert torch.equal(before, after)
            assert body.failovers == 1 and body.servers == [first.address, second.address]
            assert body.live.refinements == 1 and body.live.round_trips == 2  # the replay, the REFINE
