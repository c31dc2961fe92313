"""The client transport (wire/transport.py) against tiny fake servers on loopback.

Two defences and one timing rule: a frame header announcing more than `max_frame_bytes`
is refused before anything is allocated; a zero length is refused; and frames a server
streams (cloud mode: one TOKEN frame per token) are charged the emulated delay once per
request, not once per frame, because each frame is timed by when its first byte really
arrived (kernel receive stamps), not when the client got round to reading it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time

import pytest

from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.wire.frames import FRAME_HEADER, FrameType, frame, token_frame
from lambdasplit.wire.link import Link
from lambdasplit.wire.transport import DEFAULT_MAX_FRAME_BYTES, Transport


@contextlib.contextmanager
def fake_server(handler, tls_context: ssl.SSLContext | None = None):
    """A one-connection server on a thread: `handler(connection)` talks to the client; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors = []

    def serve():
        try:
            connection, _ = listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls_context is not None:
                connection = tls_context.wrap_socket(connection, server_side=True)
            with connection:
                handler(connection)
        except Exception as error:  # surfaced in the test, not lost in the thread
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()
    assert not errors, errors


def read_frame(connection) -> bytes:
    """One whole frame from the client (the request), as the server would read it."""
    data = b""
    while len(data) < FRAME_HEADER.size or len(data) < FRAME_HEADER.size - 1 + FRAME_HEADER.unpack_from(data)[0]:
        chunk = connection.recv(65536)
        assert chunk, "the client closed the connection"
        data += chunk
    return data


def announce(length: int):
    """A handler that sends one frame header announcing `length` bytes, then a few bytes of body."""
    def handler(connection):
        connection.sendall(FRAME_HEADER.pack(length, int(FrameType.TOKEN)) + b"abcd")
        time.sleep(0.2)  # let the client read before the connection closes
    return handler


def test_a_frame_over_the_limit_is_refused_before_allocating():
    assert DEFAULT_MAX_FRAME_BYTES == 256 * 2**20
    with fake_server(announce(2**32 - 1)) as port:  # 4 GiB announced, 4 bytes sent
        transport = Transport("127.0.0.1", port)
        with pytest.raises(ProtocolError, match="frame_too_large.*4294967295 bytes.*268435456") as caught:
            transport.receive()
        assert caught.value.code == "frame_too_large"
    with fake_server(announce(0)) as port:
        with pytest.raises(ProtocolError, match="bad_frame"):
            Transport("127.0.0.1", port).receive()


def test_the_limit_is_an_option():
    def handler(connection):
        connection.sendall(frame(FrameType.TOKEN, b"x" * 999) + frame(FrameType.TOKEN, b"x" * 1000))
        time.sleep(0.2)

    with fake_server(handler) as port:
        transport = Transport("127.0.0.1", port, max_frame_bytes=1000)  # length counts the type byte
        frame_type, body = transport.receive()
        assert frame_type == FrameType.TOKEN and len(body) == 999
        with pytest.raises(LambdaSplitError, match="1001 bytes, above this client's limit of 1000"):
            transport.receive()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("gap", [0.0, 0.005], ids=["all-at-once", "one-every-5ms"])
def test_streamed_frames_pay_the_delay_once(tls, gap, tls_files):
    """One request, then N frames: the emulated cost is 2 x delay once, not N x 2 x delay."""
    delay, count = 0.020, 30

    def handler(connection):
        read_frame(connection)  # the request
        frames = [token_frame(i, f" piece{i}") for i in range(count)]
        if not gap:
            connection.sendall(b"".join(frames))
        for piece in frames if gap else []:
            connection.sendall(piece)
            time.sleep(gap)
        read_frame(connection)  # the client's goodbye: keeps the socket open until it is done

    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls_files)
    with fake_server(handler, context) as port:
        transport = Transport("127.0.0.1", port, link=Link(delay_s=delay), tls_ca=str(tls_files[0]) if tls else None)
        if not transport.kernel_stamps:
            pytest.skip("no kernel receive stamps here: the read time stands in and over-charges streamed frames")
        began = time.perf_counter()
        transport.send(frame(FrameType.GENERATE, b"{}"))
        for i in range(count):
            frame_type, body = transport.receive()
            assert frame_type == FrameType.TOKEN and bytes(body[4:]) == f" piece{i}".encode()
        elapsed = time.perf_counter() - began
        transport.send(frame(FrameType.CLOSE))
    streaming = (count - 1) * gap  # how long the server really took to send them all
    assert elapsed >= 2 * delay
    # Charging every frame again would take count x 2 x delay = 1.2 s.
    assert elapsed <= streaming * 1.5 + 2 * delay + 0.1, elapsed
