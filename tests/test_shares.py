"""Secret-shared mode (issue #15): ring exactness, fixed-point bounds, agreement with local
generation through two real server processes, fresh randomness, indistinguishability, and
the audit on one server's capture (at chance) against the same sessions unmasked (~100%)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lambdasplit.client.device import DeviceModel
from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.server import BodyServer
from lambdasplit.server.process import ServerProcess
from lambdasplit.shares import ring
from lambdasplit.shares.audit import audit_shares
from lambdasplit.shares.device import SharedDevice
from lambdasplit.shares.layers import MIN_INPUT_BOUND, FixedPointError, fixed_linear
from lambdasplit.shares.run import run_shared
from lambdasplit.shares.service import PLAN_MARK, SharesService
from rawproto import ERROR, PROTOCOL, RESULT, STEP, Peer, frame

PROMPTS = ["the quick brown fox", "seven birds sing in the old tree", "a lazy dog sleeps near our house"]
ATTACKER_PROMPTS = ["over the hills and far away we go", "one two three four five six seven eight",
                    "she sells sea shells by the sea shore", "all that glitters is not gold my friend"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def servers(model):
    """Two real `serve --component shares` processes, share 0 and share 1."""
    with ServerProcess(["--model", str(model), "--component", "shares", "--share", "0"]) as first, \
            ServerProcess(["--model", str(model), "--component", "shares", "--share", "1"]) as second:
        yield [first.address, second.address]


@pytest.fixture(scope="module")
def shared_device(model):
    return SharedDevice.load_shared(str(model))


@pytest.fixture(scope="module")
def plain_servers(model):
    """The plain layers (4 requests per decoder layer); the default, merged, is tested in test_shares_merged.py."""
    plain = ["--shares-merge", "off"]
    with ServerProcess(["--model", str(model), "--component", "shares", "--share", "0", *plain]) as first, \
            ServerProcess(["--model", str(model), "--component", "shares", "--share", "1", *plain]) as second:
        yield [first.address, second.address]


@pytest.fixture(scope="module")
def plain_device(model):
    return SharedDevice.load_shared(str(model), merge=False)


@pytest.fixture(scope="module")
def local_device(model):
    return DeviceModel.load(str(model))


# ---------------------------------------------------------------- the ring


def test_ring_matmul_is_exact_modulo_2_64():
    rng = np.random.default_rng(1)
    w = rng.integers(-2**24, 2**24, (7, 300))
    bias = rng.integers(-2**40, 2**40, 7)
    shares = rng.integers(0, 2**64, (3, 300), dtype=np.uint64)
    bits = ring.limb_bits_for(int(np.abs(w).max()), 300)
    assert bits == 16
    out = ring.RingMatmul(w, bias, bits)(shares, add_bias=True)
    for i in range(3):
        for j in range(7):
            expected = (sum(int(shares[i, k]) * int(w[j, k]) for k in range(300)) + int(bias[j])) % 2**64
            assert int(out[i, j]) == expected


def test_shares_add_up_and_decode():
    x = torch.tensor([[1.5, -2.25, 1000.0, -0.000001]])
    masks_device, masks_server = ring.MaskStream(b"k" * 32), ring.MaskStream(b"k" * 32)
    x_ring = ring.encode(x, ring.FRAC_X)
    s0 = ring.share(x_ring, masks_device)
    s1 = masks_server.next(x_ring.size).reshape(x_ring.shape)
    assert np.array_equal(s0 + s1, x_ring)
    assert np.allclose(ring.decode(s0 + s1, ring.FRAC_X), x.numpy(), atol=2.0 ** -ring.FRAC_X)
    assert not np.array_equal(ring.share(x_ring, masks_device), s0)  # the stream never repeats a mask


def test_limb_width_edges():
    # 2^b * max|W| * in < 2^53: with 2^30 weights and 2^6 inputs, 16 bits leave 2^52 -> 16; larger weights shrink b
    assert ring.limb_bits_for(2**30, 64) == 16
    assert ring.limb_bits_for(2**36, 64) == 10
    assert ring.limb_bits_for(2**38, 64) == 8
    assert ring.limb_bits_for(2**39, 64) == 0  # would need < 8-bit limbs: refused


# ---------------------------------------------------------------- fixed-point bounds at their edges


def test_bound_edge_accepts_just_below_and_refuses_at_the_limit():
    # A row L1 norm of 2048 allows inputs up to 2^63 / 2^40 / 2048 = 4096 = MIN_INPUT_BOUND, minus rounding: refused.
    assert MIN_INPUT_BOUND == 4096
    below = torch.full((2, 64), 31.99)
    layer = fixed_linear(0, "model.layers.0.mlp.down_proj", below, None)
    assert MIN_INPUT_BOUND <= layer.x_bound < MIN_INPUT_BOUND * 1.001
    with pytest.raises(FixedPointError, match=r"model\.layers\.3\.mlp\.down_proj would overflow the ring"):
        fixed_linear(0, "model.layers.3.mlp.down_proj", torch.full((2, 64), 32.0), None)
    with pytest.raises(FixedPointError, match="non-finite"):
        fixed_linear(0, "x", torch.tensor([[float("nan")]]), None)


def test_overflowing_checkpoint_layer_is_refused_by_name(model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"] *= 1e4
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FixedPointError, match=r"model\.layers\.2\.mlp\.down_proj would overflow"):
        SharesService(str(broken), 0)


def test_input_beyond_the_bound_is_refused_not_run(shared_device, servers, local_device):
    pair = shared_device.connect(servers)
    try:
        bound = pair.x_bounds[0]
        with pytest.raises(LambdaSplitError, match="beyond the fixed-point bound"):
            pair.run([0, 1, 2], torch.full((1, 1, pair.table[0]["in"]), bound * 1.01))
        requests = pair.costs.requests
        assert requests == 0  # nothing was sent
    finally:
        pair.close()


# ---------------------------------------------------------------- exactness through two real servers


def test_agreement_and_logit_error_vs_local(plain_device, local_device, plain_servers):
    shared_device, servers = plain_device, plain_servers
    for prompt in PROMPTS:
        local = local_device.generate(prompt, max_new_tokens=10, keep_logits=True, ignore_eos=True)
        record = run_shared(model=None, device=shared_device, prompt=prompt, servers=servers, max_new_tokens=10,
                            ignore_eos=True, keep_logits=True)
        assert record["token_ids"] == local.token_ids
        error = max(float((a - b).nan_to_num(0).abs().max()) for a, b in zip(local.logits, record["_logits"]))
        assert error < 1e-3, error
        assert record["round_trips_per_server"][0] == record["round_trips_per_server"][1] == record["round_trips"]
        # a llama layer is 4 requests (qkv, o, gate+up, down) plus the LM head's, per step
        layers = shared_device.num_layers
        assert record["round_trips"] == record["steps"] * (4 * layers + 1)
        # server 1 never gets the inputs: its uplink is a few header bytes per request
        assert record["bytes_up_per_server"][1] < record["bytes_up_per_server"][0] / 20


def test_cli_generate_shared_json(model, servers, local_device):
    prompt = PROMPTS[0]
    out = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", "--mode", "shared", "--model", str(model),
                          "--servers", ",".join(servers), "--prompt", prompt, "--max-new-tokens", "6",
                          "--ignore-eos", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["mode"] == "shared"
    assert record["token_ids"] == local_device.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids
    assert len(record["bytes_up_per_server"]) == 2 and record["device_cpu_seconds"] > 0
    one = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", "--mode", "shared", "--model", str(model),
                          "--servers", servers[0], "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert one.returncode != 0 and "exactly two" in one.stderr and len(one.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["gpt2", "phi3", "qwen3", "gemma2", "mistral", "qwen2"])
def test_other_families_agree(tiny_model_dir, family):
    """Conv1D (gpt2), fused projections (phi3), q/k norms (qwen3), soft-capping and sliding windows (gemma2,
    mistral), biases (qwen2); LM head on the device for one of them."""
    path = str(tiny_model_dir(family))
    lm_head = family != "phi3"
    hosts = [BodyServer([SharesService(path, i, lm_head=lm_head)], port=0).start_in_thread() for i in (0, 1)]
    try:
        device = SharedDevice.load_shared(path, lm_head=lm_head)
        local = DeviceModel.load(path).generate(PROMPTS[1], max_new_tokens=8, ignore_eos=True)
        record = run_shared(model=None, device=device, prompt=PROMPTS[1], servers=[h.address for h in hosts],
                            max_new_tokens=8, ignore_eos=True, lm_head="shared" if lm_head else "device")
        assert record["token_ids"] == local.token_ids
    finally:
        for host in hosts:
            host.stop()


# ---------------------------------------------------------------- privacy, measured


@pytest.fixture(scope="module")
def audit(shared_device, servers):
    return audit_shares(shared_device, servers, prompts=PROMPTS[:2], attacker_prompts=ATTACKER_PROMPTS,
                        max_new_tokens=6)


def test_attacks_at_chance_on_either_server_and_near_100_on_plain(audit):
    chance = max(5 * audit["chance"]["uniform"], audit["chance"]["most_common_token"])
    for view in ("server 0", "server 1"):
        for attack, score in audit["attacks"][view].items():
            if attack != "positions":
                assert score <= chance, (view, attack, score)
    plain = audit["attacks"]["plain"]
    assert plain["inversion_top1"] >= 0.95 and plain["probe_top1"] >= 0.9 and plain["public_tail_top1"] == 1.0


def test_shares_are_uniform_fresh_and_independent_of_the_prompt(audit):
    s = audit["stats"]
    assert s["bytes"] > 100_000
    assert s["byte_chi2_p"] > 1e-4  # the bytes server 0 receives are uniform
    assert s["two_prompts_ks_p"] > 1e-4  # two different prompts: indistinguishable share distributions
    assert s["same_prompt_equal_words"] == 0.0  # the same prompt twice: captures differ entirely
    assert abs(s["share_vs_input_correlation"]) < 0.05


# ---------------------------------------------------------------- bad input: one-line errors, the server keeps serving


def test_bad_requests_are_refused_and_the_server_keeps_serving(servers, shared_device):
    fingerprint = Checkpoint(str(shared_device.checkpoint.folder)).fingerprint
    hello = {"protocol": PROTOCOL, "role": "shares", "model": fingerprint, "share": 0, "lm_head": True, "dtype": "float32",
             "merge": shared_device.merge}
    with Peer(servers[0]) as peer:
        peer.hello(hello)
        peer.send(frame(STEP, struct.pack("<IHH", 0, 1, 60000) + struct.pack("<I", 1) + bytes(8 * 64)))
        assert peer.outcome() == "bad_step"
    with Peer(servers[0]) as peer:
        peer.hello(hello)
        peer.send(frame(STEP, struct.pack("<IHH", 0, 1, 0) + struct.pack("<I", 2) + bytes(8 * 64)))  # 1 row short
        assert peer.outcome() == "bad_step"
    with Peer(servers[1]) as peer:
        peer.send(frame(1, json.dumps(hello).encode()))  # share 0's HELLO to the share-1 server
        assert peer.outcome() == "wrong_split"
    with Peer(servers[1]) as peer:  # share 1 before its key
        peer.hello({**hello, "share": 1})
        peer.send(frame(STEP, struct.pack("<IHH", 0, 1, 0) + struct.pack("<I", 1)))
        assert peer.outcome() == "bad_step"
    pair = shared_device.connect(servers)  # everyone else is still served
    try:
        assert len(pair.run([0, 1, 2], torch.ones(1, 1, pair.table[0]["in"]))) == 3
    finally:
        pair.close()
    assert ERROR  # (a refusal is an ERROR frame; Peer.outcome reads its code)


def plan_frame(seq: int, rows: int, groups: list[list[int]]) -> bytes:
    body = struct.pack("<IHIH", seq, PLAN_MARK, rows, len(groups))
    for indices in groups:
        body += struct.pack(f"<H{len(indices)}H", len(indices), *indices)
    return frame(STEP, body)


def test_plans_are_share_1_only_checked_whole_and_bounded(model, servers, shared_device):
    from lambdasplit.server.server import Limits

    fingerprint = shared_device.checkpoint.fingerprint
    hello = {"protocol": PROTOCOL, "role": "shares", "model": fingerprint, "share": 0, "lm_head": True, "dtype": "float32",
             "merge": shared_device.merge}
    describe = frame(STEP, struct.pack("<IH", 0, 0) + struct.pack("<I", 0))
    with Peer(servers[0]) as peer:  # share 0's inputs come with each request: no plans
        peer.hello(hello)
        peer.send(describe)
        assert peer.receive()[0] == RESULT
        peer.send(plan_frame(1, 1, [[0, 1, 2]]))
        assert peer.outcome() == "bad_step"
    with Peer(servers[1]) as peer:  # the second request names a layer that does not exist: nothing is answered
        peer.hello({**hello, "share": 1})
        peer.send(frame(STEP, struct.pack("<IH", 0, 0) + struct.pack("<I", 0) + bytes(32)))
        assert peer.receive()[0] == RESULT
        peer.send(plan_frame(1, 1, [[0, 1, 2], [60000]]))
        assert peer.outcome() == "bad_step"
    with Peer(servers[1]) as peer:  # a valid plan: one RESULT per request, in sequence
        peer.hello({**hello, "share": 1})
        peer.send(frame(STEP, struct.pack("<IH", 0, 0) + struct.pack("<I", 0) + bytes(32)))
        assert peer.receive()[0] == RESULT
        peer.send(plan_frame(1, 2, [[0, 1, 2], [3, 4, 5]]))
        seqs = [struct.unpack_from("<I", peer.receive()[1])[0] for _ in range(2)]
        assert seqs == [1, 2]
    lm_head = len(shared_device.shared_names) - 1
    pair = shared_device.connect(servers)
    pair.close()
    over = 2**19 // (8 * pair.table[lm_head]["out"]) + 1  # requests whose answers add up to more than 0.5 MiB
    host = BodyServer([SharesService(str(model), 1)], port=0, limits=Limits(max_unsent_mb=0.5)).start_in_thread()
    try:
        with Peer(host.address) as peer:  # its answers would exceed what the server lets wait unread
            peer.hello({**hello, "share": 1})
            peer.send(frame(STEP, struct.pack("<IH", 0, 0) + struct.pack("<I", 0) + bytes(32)))
            assert peer.receive()[0] == RESULT
            peer.send(plan_frame(1, 1, [[lm_head]] * over))
            assert peer.outcome() == "frame_too_large"
    finally:
        host.stop()


def test_a_planned_request_equals_an_unplanned_one_and_settle_keeps_the_pair_in_step(servers, shared_device):
    pair = shared_device.connect(servers)
    pair.close()
    width = pair.table[0]["in"]
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    pair = shared_device.connect(servers)
    try:
        expected = pair.exchange((0, 1, 2), x)
    finally:
        pair.close()
    pair = shared_device.connect(servers)
    try:
        pair.plan([((0, 1, 2), 1), ((0, 1, 2), 1), ((0, 1, 2), 1)])
        b_up = pair.bytes_up[1]
        assert np.array_equal(pair.exchange((0, 1, 2), x), expected)  # W x exactly, whatever the masks
        assert pair.bytes_up[1] == b_up  # server 1 was sent nothing more
        with pytest.raises(LambdaSplitError, match="out of the planned order"):
            pair.exchange((3, 4, 5), x)
        pair.settle()  # the two planned requests no one took: read, dropped, their masks consumed
        assert not pair.broken
        assert np.array_equal(pair.exchange((0, 1, 2), x), expected)  # both servers still in step
    finally:
        pair.close()


def test_an_answer_beyond_the_frame_limit_is_refused_before_compute(model, shared_device):
    """Server 1 gets no payload, so only the answer's size can bound what a request makes it allocate."""
    from lambdasplit.server.server import Limits

    fingerprint = shared_device.checkpoint.fingerprint
    lm_head = len(shared_device.shared_names) - 1
    host = BodyServer([SharesService(str(model), 1)], port=0, limits=Limits(max_frame_mb=1.0)).start_in_thread()
    with Peer(host.address) as peer:
        peer.hello({"protocol": PROTOCOL, "role": "shares", "model": fingerprint, "share": 1, "lm_head": True,
                    "dtype": "float32", "merge": shared_device.merge})
        peer.send(frame(STEP, struct.pack("<IH", 0, 0) + struct.pack("<I", 0) + bytes(32)))  # describe + key
        assert peer.receive()[0] == RESULT
        peer.send(frame(STEP, struct.pack("<IHH", 1, 1, lm_head) + struct.pack("<I", 8000)))
        assert peer.outcome() == "frame_too_large"
    host.stop()


def test_each_server_has_its_own_token(model, shared_device, local_device):
    from lambdasplit.errors import RemoteError

    hosts = [BodyServer([SharesService(str(model), i)], port=0, token=t).start_in_thread()
             for i, t in ((0, "token-of-a"), (1, "token-of-b"))]
    try:
        addresses = [h.address for h in hosts]
        record = run_shared(model=None, device=shared_device, prompt=PROMPTS[0], servers=addresses, max_new_tokens=3,
                            ignore_eos=True, token=["token-of-a", "token-of-b"])
        assert record["token_ids"] == local_device.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True).token_ids
        with pytest.raises(RemoteError, match="unauthorized"):
            run_shared(model=None, device=shared_device, prompt=PROMPTS[0], servers=addresses, max_new_tokens=1,
                       token="token-of-a")
    finally:
        for host in hosts:
            host.stop()


def test_python_api_run_generation_shared(model, servers, local_device):
    from lambdasplit.client.run import run_generation

    record = run_generation(model=str(model), mode="shared", prompt=PROMPTS[2], server=",".join(servers),
                            max_new_tokens=3, ignore_eos=True)
    assert record["mode"] == "shared"
    assert record["token_ids"] == local_device.generate(PROMPTS[2], max_new_tokens=3, ignore_eos=True).token_ids
