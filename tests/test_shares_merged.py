"""Merged layers of the secret-shared mode (layers.merge_plan, shares/merged.py): 2 requests per decoder
layer. Agreement with the plain path and local generation, requests counted in the servers' real
captures, the merged bounds at their edge (refused by the merged layer's name), the device's input
shift for residual outliers and its limit, and the families that are refused by name."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lambdasplit.client.device import DeviceModel
from lambdasplit.errors import LambdaSplitError, RemoteError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.families import family_for
from lambdasplit.server import BodyServer
from lambdasplit.shares.audit import parse_capture
from lambdasplit.shares.device import SharedDevice
from lambdasplit.shares.layers import FixedPointError, MergedSpec, merge_plan, merged_matrix
from lambdasplit.shares.merged import MAX_INPUT_SHIFT
from lambdasplit.shares.run import run_shared
from lambdasplit.shares.service import SharesService
from lambdasplit.audit.capture import split_frames
from lambdasplit.wire.frames import FrameType

PROMPTS = ["the quick brown fox", "seven birds sing in the old tree"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def serve(path: str, merge, lm_head: bool = True):
    return [BodyServer([SharesService(path, i, lm_head=lm_head, merge=merge)], port=0).start_in_thread() for i in (0, 1)]


@pytest.fixture(scope="module")
def merged(model):
    hosts = serve(str(model), True)
    yield SharedDevice.load_shared(str(model), merge=True), [h.address for h in hosts]
    for host in hosts:
        host.stop()


@pytest.fixture(scope="module")
def plain(model):
    hosts = serve(str(model), False)
    yield SharedDevice.load_shared(str(model), merge=False), [h.address for h in hosts]
    for host in hosts:
        host.stop()


def test_merged_equals_plain_and_local_and_costs_2_requests_per_layer(model, merged, plain):
    local_device = DeviceModel.load(str(model))
    (device, servers), (plain_device, plain_servers) = merged, plain
    layers = device.num_layers
    for prompt in PROMPTS:
        local = local_device.generate(prompt, max_new_tokens=8, keep_logits=True, ignore_eos=True)
        captures = [[], []]
        record = run_shared(model=None, device=device, prompt=prompt, servers=servers, max_new_tokens=8,
                            ignore_eos=True, keep_logits=True, captures=captures)
        unmerged = run_shared(model=None, device=plain_device, prompt=prompt, servers=plain_servers, max_new_tokens=8,
                              ignore_eos=True, keep_logits=True)
        assert record["merged"] and not unmerged["merged"]
        assert record["token_ids"] == unmerged["token_ids"] == local.token_ids
        for logits in (record["_logits"], unmerged["_logits"]):
            error = max(float((a - b).nan_to_num(0).abs().max()) for a, b in zip(local.logits, logits))
            assert error < 1e-3, error
        # what each server's socket carried: its describe request, then 1 (layer 0's q/k/v) + 2 per layer
        # + 1 (the LM head) requests per step, and as many answers
        for capture in captures:
            requests, answers = parse_capture(capture)
            assert len(requests) - 1 == len(answers) - 1 == record["steps"] * (2 * layers + 2)
        assert record["round_trips"] == record["steps"] * (2 * layers + 2)
        assert unmerged["round_trips"] == unmerged["steps"] * (4 * layers + 1)
        # the same bytes up: [a ; r] and [m ; h] are as wide as the plain q/k/v, o, gate/up and down inputs
        assert record["bytes_up_per_server"][0] <= unmerged["bytes_up_per_server"][0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_decode_step_equals_the_modules_and_plans_server_1(tiny_model_dir, family):
    """shares/decode.py (one position as array code, one PLAN per step to server 1) against the family's own
    layers with the merged modules: the same tokens, logits within float32 rounding, the same requests."""
    path = str(tiny_model_dir(family))
    hosts = serve(path, True)
    try:
        device = SharedDevice.load_shared(path, merge=True)
        assert device.body().decode is not None
        runs = {}
        for decode_step in (True, False):
            device.decode_step = decode_step
            captures = [[], []]
            runs[decode_step] = run_shared(model=None, device=device, prompt=PROMPTS[1], servers=[h.address for h in hosts],
                                           max_new_tokens=8, ignore_eos=True, keep_logits=True, captures=captures)
            frames_to_b = sum(1 for kind, _ in split_frames(b"".join(d for way, d in captures[1] if way == "up"))
                              if kind == FrameType.STEP)
            requests, answers = parse_capture(captures[1])
            per_step = 2 * device.num_layers + 2
            assert len(requests) - 1 == len(answers) - 1 == runs[decode_step]["steps"] * per_step
            # describe, the prompt step's requests one by one, then one PLAN per decode step (or every request)
            steps = runs[decode_step]["steps"]
            assert frames_to_b == 1 + per_step + (steps - 1 if decode_step else (steps - 1) * per_step)
        fast, modules = runs[True], runs[False]
        assert fast["token_ids"] == modules["token_ids"]
        error = max(float((a - b).nan_to_num(0).abs().max()) for a, b in zip(fast["_logits"], modules["_logits"]))
        assert error < 1e-4, error
        assert fast["round_trips"] == modules["round_trips"]
    finally:
        for host in hosts:
            host.stop()


def test_speculation_mixes_verify_steps_and_decode_steps_exactly(model, merged):
    """Drafted blocks go through the modules, single positions through the decode step, rejected positions are
    cut from the one cache both use: greedy tokens equal local generation's."""
    device, servers = merged
    prompt = "one two three one two three one two three one two"
    local = DeviceModel.load(str(model)).generate(prompt, max_new_tokens=12, ignore_eos=True)
    captures = [[], []]
    record = run_shared(model=None, device=device, prompt=prompt, servers=servers, max_new_tokens=12, ignore_eos=True,
                        speculate="lookup", draft_tokens=3, captures=captures)
    assert record["token_ids"] == local.token_ids
    requests, _ = parse_capture(captures[0])
    after_prompt = [r["rows"] for r in requests[1 + 2 * device.num_layers + 2:]]
    assert 1 in after_prompt and max(after_prompt) > 1  # both kinds of step ran


def test_sliding_window_layers_keep_the_modules(tiny_model_dir):
    path = str(tiny_model_dir("mistral"))
    device = SharedDevice.load_shared(path, merge=True)
    body = device.body()
    assert body.decode is None and "sliding" in body.decode_refusal


def test_lm_head_on_the_device_is_2_requests_per_layer_plus_1(model):
    path = str(model)
    hosts = serve(path, True, lm_head=False)
    try:
        device = SharedDevice.load_shared(path, lm_head=False, merge=True)
        record = run_shared(model=None, device=device, prompt=PROMPTS[0], servers=[h.address for h in hosts],
                            max_new_tokens=4, ignore_eos=True, lm_head="device")
        assert record["token_ids"] == DeviceModel.load(path).generate(PROMPTS[0], max_new_tokens=4,
                                                                      ignore_eos=True).token_ids
        assert record["round_trips"] == record["steps"] * (2 * device.num_layers + 1)
    finally:
        for host in hosts:
            host.stop()


def test_merged_bound_edge_is_refused_by_the_merged_name(model, tmp_path):
    """The merged gate / up rows carry g: scale layer 2's post-attention norm so that their largest row L1 norm
    is just below 2048 (inputs up to 4096 = MIN_INPUT_BOUND: accepted) or just above (refused, not run)."""
    checkpoint = Checkpoint(str(model))
    family = family_for(checkpoint.config)
    skeleton = checkpoint.skeleton()
    specs = [e for e in merge_plan(skeleton, family, True) if isinstance(e, MergedSpec) and e.norm and
             e.norm == "model.layers.2.post_attention_layernorm"]
    assert [s.left for s in specs] == ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
    checkpoint.load_modules(skeleton, sorted({m for s in specs for m in (s.left, s.right, s.norm)}))
    l1 = max(float(merged_matrix(skeleton, s).abs().sum(dim=1).max()) for s in specs)
    for factor, refused in ((0.999, False), (1.001, True)):
        folder = tmp_path / f"scaled-{factor}"
        shutil.copytree(model, folder)
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.2.post_attention_layernorm.weight"] *= 2048 / l1 * factor
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        if refused:
            with pytest.raises(FixedPointError, match=r"model\.layers\.2\.mlp\.(gate|up)_proj\(post_attention_layernorm"
                                                      r"\(o_proj \+ residual\)\) would overflow the ring"):
                SharesService(str(folder), 0, merge=True)
            SharesService(str(folder), 0, merge=False)  # the plain layers do not carry g: still fine
        else:
            service = SharesService(str(folder), 0, merge=True)
            bound = min(layer.x_bound for layer in service.layers if "layers.2.mlp" in layer.name and "(" in layer.name)
            assert 4096 <= bound < 4096 * 1.002


def test_merged_input_beyond_the_bound_is_shifted_up_to_the_limit_then_refused(merged):
    device, servers = merged
    pair = device.connect(servers)
    try:
        o_index = device.shared_names.index("model.layers.1.self_attn.o_proj")
        indices = [o_index, o_index + 1, o_index + 2]  # o_proj, gate, up of layer 1: one request on [a ; r]
        bound = min(pair.x_bounds[i] for i in indices)
        a, r = torch.randn(1, 1, pair.table[o_index]["in"] // 2), torch.randn(1, 1, pair.table[o_index]["in"] // 2)
        peak = float(torch.cat([a, r], -1).abs().max())
        small = pair.run(indices, [a, r], max_shift=MAX_INPUT_SHIFT)
        scale = 3 * bound / peak  # beyond the bound: encoded with 2 fewer fractional bits, still exact in the ring
        large = pair.run(indices, [a * scale, r * scale], max_shift=MAX_INPUT_SHIFT)
        for s, big in zip(small, large):
            assert torch.allclose(big / scale, s, atol=1e-4, rtol=1e-4)
        with pytest.raises(LambdaSplitError, match="beyond the fixed-point bound"):
            pair.run(indices, [a * scale, r * scale])  # without a shift allowance: refused
        requests = pair.costs.requests
        too_far = bound * 2 ** MAX_INPUT_SHIFT * 1.01 / peak
        with pytest.raises(LambdaSplitError, match=r"model\.layers\.1\.self_attn\.o_proj.*beyond the fixed-point bound"):
            pair.run(indices, [a * too_far, r * too_far], max_shift=MAX_INPUT_SHIFT)
        assert pair.costs.requests == requests  # nothing was sent
    finally:
        pair.close()


def test_families_that_cannot_merge_are_refused_by_name_and_run_plain(tiny_model_dir):
    qwen2, gpt2 = str(tiny_model_dir("qwen2")), str(tiny_model_dir("gpt2"))
    with pytest.raises(LambdaSplitError, match=r"model\.layers\.0\.self_attn\.q_proj has a bias"):
        SharedDevice.load_shared(qwen2, merge=True)
    with pytest.raises(FixedPointError, match=r"gpt2: only llama-shaped decoder layers"):
        SharesService(gpt2, 0, merge=True)
    assert not SharedDevice.load_shared(qwen2).merge and not SharesService(qwen2, 0).merge  # auto: plain


def test_a_merged_device_on_plain_servers_is_refused_in_one_line(merged, plain):
    device, _ = merged
    _, plain_servers = plain
    with pytest.raises(RemoteError, match="computes the plain layers") as refused:
        run_shared(model=None, device=device, prompt=PROMPTS[0], servers=plain_servers, max_new_tokens=1)
    assert len(str(refused.value).splitlines()) == 1


def test_the_pooled_mask_stream_is_the_chacha20_keystream_in_order():
    """MaskStream expands its keystream in blocks: whatever the request sizes, the words are the cipher's, in order,
    never reused (server 1 and the device draw the same words)."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from lambdasplit.shares import ring

    key = bytes(range(32))
    masks = ring.MaskStream(key)
    sizes = [1, 5, ring.MaskStream.POOL_WORDS - 3, 7, 2 * ring.MaskStream.POOL_WORDS + 11, 1]
    drawn = np.concatenate([masks.next(size).copy() for size in sizes])
    keystream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    assert np.array_equal(drawn, np.frombuffer(keystream, dtype="<u8")) and masks.drawn == sum(sizes)
