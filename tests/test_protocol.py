"""The server against bad input: every mistake gets a clear error for that session only.

Malformed, oversized and out-of-order frames, a wrong model, split or dtype, a missing
token, too many sessions, a KV cache over its limit, an idle session: each gets its own
error code, and a well-behaved session running alongside keeps being served.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest
import torch

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.errors import LambdaSplitError, RemoteError
from lambdasplit.llm import load_body
from lambdasplit.server import BodyServer, BodyService, Limits
from lambdasplit.wire.codecs import get_codec
from lambdasplit.wire.frames import FRAME_HEADER, FrameType, frame, json_frame, parse_json, step_frame

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(model):
    limits = Limits(max_sessions=4, max_kv_mb=0.01, idle_timeout=2.0, max_frame_mb=0.01)
    with BodyServer([BodyService(model, "2:4")], token=TOKEN, limits=limits) as server:
        yield server


@pytest.fixture(scope="module")
def device(model):
    return DeviceModel.load(model, "2:4")


def raw_session(server, frames: list[bytes]) -> dict:
    """Send raw bytes; return the first ERROR (or other) frame the server answers with."""
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for data in frames:
            sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    frames_out = []
    while len(received) >= FRAME_HEADER.size:
        length, type_byte = FRAME_HEADER.unpack_from(received)
        body = received[FRAME_HEADER.size:FRAME_HEADER.size - 1 + length]
        frames_out.append((FrameType(type_byte), body))
        received = received[FRAME_HEADER.size - 1 + length:]
    return {t.name: parse_json(b) if t in (FrameType.ERROR, FrameType.WELCOME) else b for t, b in frames_out}


def hello(device, **override):
    message = {"protocol": 2, "role": "body", "model": device.checkpoint.fingerprint, "layers": [2, 4],
               "dtype": "float32", "codec": "fp32", "token": TOKEN}
    message.update(override)
    return json_frame(FrameType.HELLO, {k: v for k, v in message.items() if v is not None})


def error_code(reply: dict) -> str:
    assert "ERROR" in reply, reply
    assert reply["ERROR"]["message"], "errors carry a human-readable message"
    return reply["ERROR"]["code"]


def test_handshake_refusals(server, device):
    assert error_code(raw_session(server, [hello(device, token=None)])) == "unauthorized"
    assert error_code(raw_session(server, [hello(device, token="wrong")])) == "unauthorized"
    assert error_code(raw_session(server, [hello(device, model="0" * 32)])) == "wrong_model"
    assert error_code(raw_session(server, [hello(device, layers=[1, 4])])) == "wrong_split"
    assert error_code(raw_session(server, [hello(device, dtype="bfloat16")])) == "wrong_dtype"
    assert error_code(raw_session(server, [hello(device, protocol=99)])) == "protocol_version"
    assert error_code(raw_session(server, [hello(device, role="cloud")])) == "wrong_role"
    assert error_code(raw_session(server, [hello(device, codec="int99")])) == "bad_codec"


def test_malformed_frames(server, device):
    d = 64
    good_step = step_frame(0, [torch.randn(1, 3, d)], get_codec("fp32"))
    cases = {
        "expected_hello": [good_step],
        "bad_frame": [frame(FrameType.HELLO, b"{not json")],
        "unexpected_frame": [hello(device), frame(FrameType.GENERATE, b"{}")],
        "bad_shape": [hello(device), step_frame(0, [torch.randn(1, 3, d + 1)], get_codec("fp32"))],
        "out_of_order": [hello(device), step_frame(5, [torch.randn(1, 1, d)], get_codec("fp32"))],
        "bad_tensor": [hello(device), frame(FrameType.STEP, struct.pack("<IIB", 1, 0, 1) + b"\x00\x20\x00\x03" + b"\x01" * 7)],
        "frame_too_large": [hello(device), FRAME_HEADER.pack(10**9, int(FrameType.STEP))],
        "kv_cache_limit": [hello(device), step_frame(0, [torch.randn(1, 40, d)], get_codec("fp32"))],
    }
    for code, frames_in in cases.items():
        assert error_code(raw_session(server, frames_in)) == code, code
    # Tensor blobs whose header fields do not fit together: each a bad_tensor, never an internal error.
    def blob(kind, bits, granularity, shape, extra=b""):
        return struct.pack("<BBBB", kind, bits, granularity, len(shape)) + struct.pack(f"<{len(shape)}I", *shape) + extra
    broken_blobs = [
        blob(3, 8, 1, (1, 3, 0), b"\x00" * 16),  # per-token int8 with empty vectors
        blob(3, 4, 2, (7,), b"\x00" * 64),  # per-channel with no channel dimension
        blob(3, 8, 1, (0, 3, 64), b"\x00" * 16),  # no values at all
        blob(0, 32, 0, (1, 2**31, 2**31)),  # far more values than bytes
    ]
    for broken in broken_blobs:
        reply = raw_session(server, [hello(device), frame(FrameType.STEP, struct.pack("<IIB", 1, 0, 1) + broken)])
        assert error_code(reply) == "bad_tensor", broken
    # A HELLO far larger than any real one is refused before it is read (no auth yet).
    huge_hello = FRAME_HEADER.pack(10**6, int(FrameType.HELLO))
    assert error_code(raw_session(server, [huge_hello])) == "frame_too_large"
    # An unknown frame type byte
    assert error_code(raw_session(server, [hello(device), FRAME_HEADER.pack(1, 200)])) == "bad_frame"


def test_good_session_survives_bad_neighbours(server, device):
    prompt = device.encode("hello there", chat=False)
    with RemoteBody.for_device(device, server.address, token=TOKEN) as body:
        first = device.generate(prompt, body=body, max_new_tokens=4, ignore_eos=True)
        raw_session(server, [b"\xff" * 64])  # garbage from someone else
        raw_session(server, [hello(device), FRAME_HEADER.pack(10**9, 3)])
        second = device.generate(prompt, body=body, max_new_tokens=4, ignore_eos=True)
    assert first.token_ids == second.token_ids


def test_idle_sessions_expire(server, device):
    with RemoteBody.for_device(device, server.address, token=TOKEN) as body:
        time.sleep(2.5)
        with pytest.raises((RemoteError, LambdaSplitError), match="idle_timeout|closed"):
            body.forward(torch.randn(1, 1, 64), 0)


def test_session_limit(model, device):
    limits = Limits(max_sessions=1)
    with BodyServer([BodyService(model, "2:4")], limits=limits) as server:
        with RemoteBody.for_device(device, server.address):
            with pytest.raises(RemoteError, match="too_many_sessions"):
                RemoteBody.for_device(device, server.address)


def wait_until_no_sessions(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.clients, server.clients


def test_kv_and_position_limits_are_per_client(model, device):
    """Two sessions of one client share its KV budget; positions are capped per session."""
    d = 64
    per_position = 2 * 2 * 2 * 16 * 4  # 2 layers x (K, V) x 2 KV heads x head_dim 16 x fp32
    limits = Limits(max_kv_mb=30 * per_position / 2**20, max_positions=24)
    with BodyServer([BodyService(model, "2:4")], limits=limits) as server:
        with RemoteBody.for_device(device, server.address) as first, \
                RemoteBody.for_device(device, server.address) as second:
            first.forward(torch.randn(1, 20, d), 0)  # 20 of the client's 30 positions' worth
            with pytest.raises(RemoteError, match="kv_cache_limit"):
                second.forward(torch.randn(1, 12, d), 0)  # alone it would fit; with the first it does not
        wait_until_no_sessions(server)  # closed sessions free their caches once the server reads CLOSE
        with RemoteBody.for_device(device, server.address) as body:
            body.forward(torch.randn(1, 20, d), 0)
            with pytest.raises(RemoteError, match="too_many_positions"):
                body.forward(torch.randn(1, 5, d), 20)  # 25 positions in one session > 24
        wait_until_no_sessions(server)
        with RemoteBody.for_device(device, server.address) as body:  # the server still serves
            assert body.forward(torch.randn(1, 3, d), 0).shape == (1, 3, d)


def test_cut_back_past_a_sliding_window_over_the_protocol(tiny_model_dir):
    """Sliding-window caches keep every position, so a step may cut back past the window."""
    folder = str(tiny_model_dir("mistral"))  # window 16
    device = DeviceModel.load(folder, "2:4")
    local = load_body(folder, 2, 4)
    hidden = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(3))
    with BodyServer([BodyService(folder, "2:4")]) as server:
        with RemoteBody.for_device(device, server.address) as body:
            body.forward(hidden, 0)
            cut = body.forward(hidden[:, 5:9], 5)  # back to 5 positions, then 4 new ones
    local.forward(hidden[:, :5], 0)
    torch.testing.assert_close(cut, local.forward(hidden[:, 5:9], 5), atol=1e-5, rtol=0)


def test_non_loopback_needs_tls_and_token(model):
    with pytest.raises(LambdaSplitError, match="TLS"):
        BodyServer([BodyService(model, "2:4")], host="0.0.0.0")


def test_tls_session_counts_tls_bytes(model, device, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    prompt = device.encode("hello there", chat=False)
    with BodyServer([BodyService(model, "2:4")], tls_cert=str(cert), tls_key=str(key), token=TOKEN) as server:
        with RemoteBody.for_device(device, server.address, token=TOKEN, tls_ca=str(cert)) as body:
            secure = device.generate(prompt, body=body, max_new_tokens=4, ignore_eos=True)
            tls_bytes = body.bytes_up
        with pytest.raises(LambdaSplitError, match="TLS"):  # no CA: the self-signed certificate is not trusted
            RemoteBody.for_device(device, server.address, token=TOKEN, tls_ca="/etc/ssl/certs/ca-certificates.crt")
    with BodyServer([BodyService(model, "2:4")]) as plain_server:
        with RemoteBody.for_device(device, plain_server.address) as body:
            plain = device.generate(prompt, body=body, max_new_tokens=4, ignore_eos=True)
            plain_bytes = body.bytes_up
    assert secure.token_ids == plain.token_ids
    assert tls_bytes > plain_bytes + 300  # handshake and record overhead are on the socket, and counted
