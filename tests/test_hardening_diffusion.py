"""Issue 10's hardening for the diffusion server (`serve --component unet|pipeline`): a STEP's tensors
are checked from their blob headers before anything is decoded, so a maximal hostile frame costs the
server at most a small multiple of its own size, and every hostile input is a documented ERROR while
a legitimate session beside it keeps being served.

Hostile peers use tests/rawproto.py (plain sockets, written from docs/protocol.md).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import rawproto
from rawproto import Peer
from lambdasplit.diffusion.split import PipelineInfo
from lambdasplit.diffusion.tiny import build_tiny_pipeline
from lambdasplit.server.process import ServerProcess

FRAME_BYTES = 64 * 2**20  # the server's default --max-frame-mb
TIMESTEPS = [999, 500]
SCHEDULER: dict = {}  # the tiny pipeline's scheduler config (cloud-latent sends it in its HELLO)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("hardening-diffusion") / "sd", "sd")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    SCHEDULER.update(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    return folder, PipelineInfo.read(str(folder)).fingerprint, unet["in_channels"], unet["cross_attention_dim"]


@pytest.fixture(scope="module")
def unet_server(pipeline):
    with ServerProcess(["--model", str(pipeline[0]), "--component", "unet"]) as server:
        yield server


def unet_hello(fingerprint: str, protocol: str) -> dict:
    hello = {"protocol": rawproto.PROTOCOL, "role": "unet", "model": fingerprint, "dtype": "float32", "codec": "fp32",
             "diffusion": protocol, "guidance": 1.0}
    if protocol == "client-latent":
        return {**hello, "timesteps": TIMESTEPS, "timestep_dtype": "int64"}
    return {**hello, "steps": 2, "cloud_steps": 2,
            "scheduler": {"class": SCHEDULER["_class_name"], "config": SCHEDULER}}


def int2_blob(shape: list[int]) -> bytes:
    """An affine int2 blob (one scale for the whole tensor) with all the payload its shape declares."""
    payload = (int(np.prod(shape)) * 2 + 7) // 8
    return rawproto.blob_header(3, 2, 0, shape) + struct.pack("<ff", 1.0, 0.0) + bytes(payload)


def honest_client_latent_step(address: str, fingerprint: str, channels: int, width: int) -> np.ndarray:
    """One legitimate client-latent step; the predicted noise it gets back."""
    with Peer(address, timeout=60) as peer:
        peer.hello(unet_hello(fingerprint, "client-latent"))
        latent = rawproto.fp32_blob(np.full((1, channels, 8, 8), 0.5, np.float32))
        embeds = rawproto.fp32_blob(np.full((1, 5, width), 0.1, np.float32))
        peer.send(rawproto.diffusion_step_frame(0, [latent, embeds]))
        got = peer.receive()
        assert got is not None and got[0] == rawproto.RESULT, got
        body = got[1]
        assert struct.unpack_from("<B", body, 8)[0] == 1  # one tensor: the guided noise
        kind, bits, _, ndim = struct.unpack_from("<BBBB", body, 9)
        shape = struct.unpack_from(f"<{ndim}I", body, 13)
        assert (kind, bits) == (0, 32)
        return np.frombuffer(body, dtype="<f4", offset=13 + 4 * ndim).reshape(shape)


def test_maximal_hostile_frames_cost_at_most_three_times_their_size(pipeline, unet_server):
    """64 MiB STEPs whose int2 tensors declare ~268 M values (1 GiB once decoded) are refused from
    their headers: the latent of client-latent, the prompt embeddings of cloud-latent."""
    folder, fingerprint, channels, width = pipeline
    pid = unet_server.process.pid
    before_noise = honest_client_latent_step(unet_server.address, fingerprint, channels, width)
    before = rawproto.peak_rss_bytes(pid)  # after a real step, so the baseline includes compute
    small_latent = rawproto.fp32_blob(np.zeros((1, channels, 8, 8), np.float32))
    attacks = [
        ("client-latent", [int2_blob([1, channels, 2**13, 2**15 // channels - 16])]),  # latent sides > 256
        ("cloud-latent", [int2_blob([1, (2**28 - 2**20) // width, width]), small_latent]),  # > 1024 tokens
    ]
    for protocol, blobs in attacks:
        step = rawproto.diffusion_step_frame(0, blobs)
        assert FRAME_BYTES - 2**20 < len(step) - 4 <= FRAME_BYTES, len(step)
        with Peer(unet_server.address, timeout=120) as peer:
            peer.hello(unet_hello(fingerprint, protocol))
            peer.send(step)
            assert peer.outcome() == "bad_shape", protocol
    grown = rawproto.peak_rss_bytes(pid) - before
    print(f"two 64 MiB hostile diffusion frames raised the server's peak RSS by {grown / 2**20:.1f} MiB")
    assert grown <= 3 * FRAME_BYTES, f"the server's peak memory grew by {grown / 2**20:.0f} MiB"
    # and the server still serves, with the same answer as before
    np.testing.assert_array_equal(honest_client_latent_step(unet_server.address, fingerprint, channels, width),
                                  before_noise)


def test_hostile_diffusion_steps_get_documented_errors(pipeline, unet_server):
    folder, fingerprint, channels, width = pipeline

    def f32(*shape, value=0.0):
        return rawproto.fp32_blob(np.full(shape, value, np.float32))

    latent, embeds = f32(1, channels, 8, 8), f32(1, 5, width)
    cases = [
        ("client-latent", [latent, f32(1, 5, width + 1)], "bad_shape"),  # wrong embedding width
        ("client-latent", [f32(1, channels + 1, 8, 8), embeds], "bad_shape"),  # wrong channels
        ("client-latent", [f32(1, channels, 8, 8, value=np.nan), embeds], "bad_tensor"),
        ("client-latent", [latent, f32(1, 5, width, value=np.inf)], "bad_tensor"),
        ("client-latent", [latent], "bad_step"),  # no conditioning in step 0
        ("client-latent", [latent, embeds, embeds], "bad_step"),
        ("client-latent", [], "bad_step"),
        ("client-latent", [rawproto.blob_header(3, 2, 0, [1, channels, 8, 8]) + bytes(3)], "bad_tensor"),  # cut
        ("cloud-latent", [embeds], "bad_step"),  # no initial latent
        ("cloud-latent", [f32(1, 2000, width), latent], "bad_shape"),  # too many prompt tokens
    ]
    for protocol, blobs, expected in cases:
        with Peer(unet_server.address, timeout=60) as peer:
            peer.hello(unet_hello(fingerprint, protocol))
            peer.send(rawproto.diffusion_step_frame(0, blobs))
            assert peer.outcome() == expected, (protocol, len(blobs), expected)
    honest_client_latent_step(unet_server.address, fingerprint, channels, width)


def test_cloud_only_pipeline_refuses_an_image_size_that_would_exhaust_memory(pipeline):
    from lambdasplit.server import BodyServer
    from lambdasplit.diffusion.server import PipelineService

    folder, fingerprint, _, _ = pipeline
    with BodyServer([PipelineService(str(folder))]) as server:
        hello = {"protocol": rawproto.PROTOCOL, "role": "diffusion-cloud", "model": fingerprint, "dtype": "float32"}
        request = {"prompt": "a red cat", "steps": 1, "seed": 0, "guidance": 1.0}
        with Peer(server.address, timeout=60) as peer:
            peer.hello(hello)
            peer.send(rawproto.json_frame(rawproto.GENERATE, {**request, "size": [2**16, 2**16]}))
            assert peer.outcome() == "bad_request"
        with Peer(server.address, timeout=60) as peer:
            peer.hello(hello)
            peer.send(rawproto.json_frame(rawproto.GENERATE, {**request, "size": [16, 16]}))
            assert peer.outcome() == "RESULT"
