"""The numbered defects of issue 10, one test (or a few) each, plus serve's stumbles of issue 13.

Each test failed on the main branch before the fix. Hostile peers use tests/rawproto.py
(plain sockets); well-behaved ones use the real client. Liveness is bounded by client
timeouts, never asserted as a speed.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import rawproto
from rawproto import Peer
from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.errors import LambdaSplitError, NetworkError, RemoteError
from lambdasplit.server import BodyServer, BodyService, Limits
from lambdasplit.server.process import ServerProcess
from lambdasplit.server.services import Service, SessionHandler

TOKEN = "hardening-token"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))  # 6 layers, hidden size 64


@pytest.fixture(scope="module")
def service(model):
    return BodyService(model, "2:4")


@pytest.fixture(scope="module")
def device(model):
    return DeviceModel.load(model, "2:4")


def body_hello(fingerprint: str, **override) -> dict:
    message = {"protocol": 2, "role": "body", "model": fingerprint, "layers": [2, 4], "dtype": "float32",
               "codec": "fp32", "token": TOKEN}
    message.update(override)
    return {k: v for k, v in message.items() if v is not None}


def outcome_of(address: str, frames: list[bytes]) -> str:
    with Peer(address, timeout=30) as peer:
        for data in frames:
            if not peer.send(data):
                break
        return peer.outcome()


# ---------------------------------------------------------------- 1. clients that never read
def test_clients_that_never_read_do_not_stall_the_server(tiny_model_dir):
    """Four sessions pipeline big-result STEPs and never read; a fifth is served meanwhile, they are dropped."""
    wide = str(tiny_model_dir("llama", num_layers=2, hidden_size=256))
    with BodyServer([BodyService(wide, "1:2")], limits=Limits(write_timeout=3.0), workers=4) as server:
        hello = body_hello(server.services[0].fingerprint, layers=[1, 2], token=None)
        # 12 steps of 512 positions (each rewinds to 0, so compute stays cheap): 6 MiB of results
        # per session, more than the socket buffers hold.
        frames = b"".join(rawproto.step_frame(0, [rawproto.fp32_blob(np.zeros((1, 512, 256), np.float32))], seq=seq)
                          for seq in range(1, 13))
        stallers = []
        for _ in range(4):
            peer = Peer(server.address, rcvbuf=4096, timeout=60)
            peer.hello(hello)
            threading.Thread(target=peer.send, args=(frames,), daemon=True).start()
            stallers.append(peer)
        time.sleep(2)  # let the attack take hold (on the old server: every compute thread blocked)
        with Peer(server.address, timeout=30) as honest:  # a stalled server would time this out
            honest.hello(hello)
            out = honest.step(0, np.ones((1, 3, 256), dtype=np.float32))
            assert out.shape == (1, 3, 256)
        # Each non-reader is dropped once its reply has waited write_timeout (reading it now would
        # unblock it), then its connection ends.
        assert rawproto.wait_for(lambda: not server.clients, 30)
        for peer in stallers:
            ended = False
            while not ended:
                try:
                    ended = not peer.sock.recv(1 << 20)
                except OSError:
                    ended = True
            peer.close()


# ---------------------------------------------------------------- 2. check before allocating
def test_a_maximal_hostile_frame_costs_at_most_three_times_its_size(model, device):
    """A 64 MiB STEP declaring an int2 tensor of ~268 M values is refused from its header."""
    with ServerProcess(["--model", model, "--layers", "2:4"]) as server:
        pid = server.process.pid
        with Peer(server.address) as warm:  # one real step first, so the baseline includes compute
            warm.hello(body_hello(device.checkpoint.fingerprint, token=None))
            warm.step(0, np.ones((1, 4, 64), dtype=np.float32))
        before = rawproto.peak_rss_bytes(pid)
        frame_bytes = 64 * 2**20
        for shape in ([1, 2**22 - 16, 64], [1, 1, 2**28 - 1024]):  # too many positions; wrong width
            header = rawproto.blob_header(3, 2, 0, shape)  # affine int2, one scale for the whole tensor
            payload = (int(np.prod(shape)) * 2 + 7) // 8
            body = struct_step(header, payload)
            assert len(body) + 5 <= frame_bytes + 5
            with Peer(server.address, timeout=120) as peer:
                peer.hello(body_hello(device.checkpoint.fingerprint, token=None, codec="int2/tensor"))
                peer.send(rawproto.frame(rawproto.STEP, body))
                assert peer.outcome() in ("too_many_positions", "bad_shape")
        grown = rawproto.peak_rss_bytes(pid) - before
        print(f"two 64 MiB hostile frames raised the server's peak RSS by {grown / 2**20:.1f} MiB")
        assert grown <= 3 * frame_bytes, f"the server's peak memory grew by {grown / 2**20:.0f} MiB"


def struct_step(blob_header: bytes, payload_bytes: int) -> bytes:
    import struct

    scales = struct.pack("<ff", 1.0, 0.0)
    return struct.pack("<IIB", 1, 0, 1) + blob_header + scales + bytes(payload_bytes)  # seq 1, position 0


# ---------------------------------------------------------------- 3. KV reserved atomically
def test_concurrent_sessions_never_get_more_kv_cache_than_the_client_budget(service, device):
    per_position = service.per_position_bytes
    positions = 300
    limits = Limits(max_kv_mb=1.6 * positions * per_position / 2**20)  # room for one such step, not two
    with BodyServer([service], limits=limits, workers=4) as server:
        for attempt in range(5):
            peers = [Peer(server.address) for _ in range(4)]
            for peer in peers:
                peer.hello(body_hello(device.checkpoint.fingerprint, token=None))
            hidden = np.random.default_rng(attempt).standard_normal((1, positions, 64)).astype(np.float32)
            frame = rawproto.step_frame(0, [rawproto.fp32_blob(hidden)])
            barrier = threading.Barrier(4)
            outcomes = [None] * 4

            def run(i):
                barrier.wait()
                peers[i].send(frame)
                outcomes[i] = peers[i].outcome()

            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(outcomes).count("RESULT") == 1, outcomes
            assert set(outcomes) == {"RESULT", "kv_cache_limit"}, outcomes
            for peer in peers:
                peer.close()
            assert rawproto.wait_for(lambda: not server.clients, 10)
            assert server.admission.granted_bytes() == 0


# ---------------------------------------------------------------- 4. server-wide limits
def test_server_wide_session_and_connection_limits(service, device):
    limits = Limits(max_sessions=10, max_total_sessions=3, max_pending=2, max_pending_per_client=10)
    hello = body_hello(device.checkpoint.fingerprint, token=None)
    with BodyServer([service], limits=limits) as server:
        open_peers = []
        for _ in range(3):  # one at a time: at most two may be between connecting and WELCOME
            open_peers.append(Peer(server.address))
            open_peers[-1].hello(hello)
        with Peer(server.address) as fourth:
            fourth.send(rawproto.json_frame(rawproto.HELLO, hello))
            assert fourth.outcome() == "too_many_sessions"
        for peer in open_peers:
            peer.close()
        assert rawproto.wait_for(lambda: not server.clients, 10)
        silent = [Peer(server.address) for _ in range(2)]  # connected, no HELLO yet
        assert rawproto.wait_for(lambda: sum(server.pending.values()) == 2, 10)
        with Peer(server.address) as third:
            assert third.outcome() == "too_many_connections"
        for peer in silent:
            peer.close()
        assert rawproto.wait_for(lambda: not server.pending, 10)


def test_loopback_addresses_are_one_client(service, device):
    hello = body_hello(device.checkpoint.fingerprint, token=None)
    with BodyServer([service], limits=Limits(max_sessions=2)) as server:
        first, second = Peer(server.address, source="127.0.0.2"), Peer(server.address, source="127.0.0.3")
        first.hello(hello)
        second.hello(hello)
        with Peer(server.address, source="127.0.0.4") as third:
            third.send(rawproto.json_frame(rawproto.HELLO, hello))
            assert third.outcome() == "too_many_sessions"
        first.close()
        second.close()


def test_server_wide_kv_budget(service, device):
    per_position = service.per_position_bytes
    limits = Limits(max_total_kv_mb=10 * per_position / 2**20)
    with BodyServer([service], limits=limits) as server:
        with RemoteBody.for_device(device, server.address) as body:
            with pytest.raises(RemoteError, match="kv_cache_limit.*budget"):
                body.forward(torch.ones(1, 11, 64), 0)


# ---------------------------------------------------------------- 5. defaults and when to retry
def test_defaults_do_not_lock_a_client_out_for_minutes_and_the_error_says_when_to_retry(service, device):
    defaults = Limits()
    assert defaults.idle_timeout <= 60 and defaults.max_sessions >= 32 and defaults.hello_timeout <= 10
    hello = body_hello(device.checkpoint.fingerprint, token=None)
    with BodyServer([service], limits=Limits(max_sessions=1, idle_timeout=40)) as server:
        with Peer(server.address) as holder:
            holder.hello(hello)
            with Peer(server.address) as late:
                late.send(rawproto.json_frame(rawproto.HELLO, hello))
                kind, body = late.receive()
                error = json.loads(body)
        assert error["code"] == "too_many_sessions"
        seconds = int(re.search(r"retry .* in (\d+) s", error["message"]).group(1))
        assert 0 < seconds <= 40


# ---------------------------------------------------------------- 6. hostile JSON
@pytest.fixture(scope="module")
def guarded(service):
    with BodyServer([service], token=TOKEN) as server:
        yield server


@pytest.mark.parametrize("body, expected", [
    (b"[" * 60000, "bad_frame"),
    (b'{"protocol": 2, "n": ' + b"7" * 5000 + b"}", "bad_frame"),
    (b'{"protocol": 2, "role": "body", "token": "\\ud800"}', "bad_frame"),
    (b'{"protocol": 2, "role": "body", "token": 12345}', "unauthorized"),
    (b'{"protocol": 2, "role": "body", "token": ["hardening-token"]}', "unauthorized"),
    (b'{"a": ' * 20 + b"1" + b"}" * 20, "bad_frame"),
])
def test_hostile_json_is_bad_frame_or_unauthorized(guarded, body, expected):
    assert outcome_of(guarded.address, [rawproto.frame(rawproto.HELLO, body)]) == expected


# ---------------------------------------------------------------- 7. internal errors say nothing
class BrokenService(Service):
    role = "broken"
    fingerprint = "f" * 32
    description = "a service with a bug"

    def check_hello(self, hello):
        return None

    def open(self, hello, limits):
        return BrokenSession()


class BrokenSession(SessionHandler):
    def handle(self, frame_type, body, emit):
        raise RuntimeError("secret detail at /srv/models/private")


def test_internal_errors_send_an_incident_id_and_log_the_trace(caplog):
    with BodyServer([BrokenService()]) as server, caplog.at_level(logging.ERROR, logger="lambdasplit.server"):
        with Peer(server.address) as peer:
            peer.hello({"protocol": 2, "role": "broken", "model": "f" * 32})
            peer.send(rawproto.step_frame(0, []))
            kind, body = peer.receive()
        error = json.loads(body)
    assert error["code"] == "internal_error"
    assert "secret" not in error["message"] and "/srv" not in error["message"]
    incident = re.search(r"incident ([0-9a-f]{8})", error["message"]).group(1)
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info and "secret detail" in str(logged[0].exc_info[1])


# ---------------------------------------------------------------- 8. exactly as strict as the spec
@pytest.mark.parametrize("override, expected", [
    ({"protocol": True}, "protocol_version"),
    ({"protocol": 2.0}, "protocol_version"),
    ({"protocol": "2"}, "protocol_version"),
    ({"layers": [2.0, 4.0]}, "bad_hello"),
    ({"layers": [True, 4]}, "bad_hello"),
    ({"layers": [2, 4, 6]}, "bad_hello"),
    ({"dtype": 32}, "bad_hello"),
    ({"codec": "int8/"}, "bad_codec"),
    ({"codec": "INT8"}, "bad_codec"),
    ({"codec": 8}, "bad_codec"),
    ({"role": 1}, "bad_hello"),
])
def test_hello_fields_are_exactly_as_strict_as_the_spec(guarded, device, override, expected):
    hello = body_hello(device.checkpoint.fingerprint, **override)
    assert outcome_of(guarded.address, [rawproto.json_frame(rawproto.HELLO, hello)]) == expected


def test_a_step_in_another_codec_than_the_sessions_is_refused(guarded, device):
    fp16 = rawproto.blob_header(1, 16, 0, [1, 2, 64]) + bytes(2 * 2 * 64)
    with Peer(guarded.address) as peer:
        peer.hello(body_hello(device.checkpoint.fingerprint))
        peer.send(rawproto.step_frame(0, [fp16]))
        assert peer.outcome() == "wrong_codec"


# ---------------------------------------------------------------- 9. secrets and paths
def test_welcome_does_not_reveal_the_servers_paths(guarded, device, model):
    with Peer(guarded.address) as peer:
        welcome = peer.hello(body_hello(device.checkpoint.fingerprint))
    assert model not in json.dumps(welcome) and "/tmp" not in welcome["service"]
    assert device.checkpoint.fingerprint[:12] in welcome["service"]
    with Peer(guarded.address) as peer:
        peer.send(rawproto.json_frame(rawproto.HELLO, body_hello("0" * 32)))
        kind, body = peer.receive()
    assert model not in json.loads(body)["message"]


def test_the_client_will_not_send_a_token_in_clear_text_to_another_host():
    with pytest.raises(LambdaSplitError, match="refusing to send the token to 192.0.2.1 in clear text"):
        RemoteBody("192.0.2.1:9", fingerprint="0" * 32, split=(1, 2), token="t")


def test_serve_reads_the_token_from_a_file(tmp_path):
    from lambdasplit.cli import build_parser
    from lambdasplit.server.commands import read_token

    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    assert read_token(build_parser().parse_args(["serve", "--token-file", str(path)])) == "from-a-file"
    with pytest.raises(LambdaSplitError, match="is empty"):
        (tmp_path / "empty").write_text("")
        read_token(build_parser().parse_args(["serve", "--token-file", str(tmp_path / "empty")]))


# ---------------------------------------------------------------- 10. the client and dead servers
def run_cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lambdasplit", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and lines[0].startswith("lambdasplit: error: ") and "Traceback" not in out.stderr, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_server_killed_mid_generation_is_one_line(model):
    server = ServerProcess(["--model", model, "--layers", "2:4"]).start()
    client = subprocess.Popen(
        [sys.executable, "-m", "lambdasplit", "generate", "--model", model, "--split", "2:4", "--server",
         server.address, "--prompt", "hello", "--max-new-tokens", "6000", "--ignore-eos"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.read(1)  # generation is under way
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        _, stderr = client.communicate(timeout=120)
    finally:
        client.kill()
        server.stop()
    out = subprocess.CompletedProcess(client.args, client.returncode, "", stderr)
    one_line_error(out, 3, server.address)


def test_refused_hung_and_tls_servers_are_one_line_each(model, device, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    with pytest.raises(NetworkError, match=f"cannot connect to {address}: connection refused") as refused:
        RemoteBody.for_device(device, address)
    assert refused.value.exit_code == 3
    listener.listen(1)  # accepts (the kernel does), never answers
    with pytest.raises(NetworkError, match=f"server {address}: timed out: no answer for 0.5 s"):
        RemoteBody.for_device(device, address, timeout=0.5)
    listener.close()

    cert, key = tls_pair(tmp_path)
    with BodyServer([BodyService(model, "2:4")], tls_cert=cert, tls_key=key) as server:
        with pytest.raises(NetworkError, match="--tls-ca"):
            RemoteBody.for_device(device, server.address, tls_ca="")  # no CA: plain TCP to a TLS port
        with pytest.raises(NetworkError, match="TLS handshake failed: self-signed certificate"):
            RemoteBody.for_device(device, server.address, tls_ca=str(other_ca(tmp_path)))


def tls_pair(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


def other_ca(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    return tls_pair(folder)[0]


# ---------------------------------------------------------------- issue 13: serve's stumbles
def test_serve_on_a_busy_port_says_so_before_loading_the_model_and_token_warns(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:  # the model does not exist: had serve loaded it first, the error would be about the model
        out = run_cli("serve", "--port", str(port), "--model", str(tmp_path / "no-such"), "--layers", "1:2",
                      "--token", "abc")
    finally:
        busy.close()
    warning, error = out.stderr.strip().splitlines()
    assert "--token is visible to every local user" in warning
    one_line_error(subprocess.CompletedProcess(out.args, out.returncode, "", error), 2, f"port {port}",
                   "already in use")


def test_serve_help_shows_defaults_and_says_kv_is_per_client():
    out = run_cli("serve", "--help")
    text = " ".join(out.stdout.split())
    assert "KV cache per client" in text and "per session (MiB)" not in text
    assert "(default: 1024.0)" in text and "(default: 60.0)" in text
