"""The client's transport: one TCP connection (optionally TLS) that counts every byte.

Counts are of the bytes written to and read from the TCP socket, so with TLS they
include TLS records and handshakes, exactly what a packet capture of the payload would
show. TLS is driven through `ssl.MemoryBIO` for that reason: the TLS layer never touches
the socket itself, we move its records and count them.
"""

from __future__ import annotations

import socket
import ssl
import time

from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.wire.frames import FRAME_HEADER, FrameType
from lambdasplit.wire.link import Link


class Transport:
    """Frames over a byte-counting socket, with optional TLS and link emulation."""

    def __init__(self, host: str, port: int, *, tls_ca: str | None = None, tls: bool = False,
                 link: Link | None = None, timeout: float = 300.0, capture: list | None = None):
        self.bytes_sent = 0
        self.bytes_received = 0
        self.link = link
        self.capture = capture  # when a list, every (direction, raw bytes) is appended: what a sniffer sees
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as error:
            raise LambdaSplitError(f"cannot connect to {host}:{port}: {error}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tls = None
        if tls or tls_ca:
            context = ssl.create_default_context(cafile=tls_ca)
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = context.wrap_bio(self._in, self._out, server_hostname=host)
            self._handshake()
        self._buffer = bytearray()

    # ---- raw socket, counted ----
    def _sock_send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.bytes_sent += len(data)
        if self.capture is not None:
            self.capture.append(("up", bytes(data)))

    def _sock_recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        self.bytes_received += len(data)
        if self.capture is not None and data:
            self.capture.append(("down", bytes(data)))
        return data

    # ---- TLS through memory BIOs ----
    def _flush_tls(self) -> None:
        pending = self._out.read()
        if pending:
            self._sock_send(pending)

    def _handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                self._flush_tls()
                return
            except ssl.SSLWantReadError:
                self._flush_tls()
                data = self._sock_recv()
                if not data:
                    raise LambdaSplitError("TLS handshake failed: the server closed the connection")
                self._in.write(data)
            except ssl.SSLError as error:
                raise LambdaSplitError(f"TLS handshake failed: {error}") from None

    def _send_bytes(self, data: bytes) -> None:
        if self._tls is None:
            self._sock_send(data)
        else:
            self._tls.write(data)
            self._flush_tls()

    def _recv_some(self) -> bytes:
        if self._tls is None:
            return self._sock_recv()
        while True:
            try:
                return self._tls.read(1 << 20)
            except ssl.SSLWantReadError:
                data = self._sock_recv()
                if not data:
                    return b""
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    # ---- frames ----
    def send(self, frame: bytes) -> None:
        if self.link is not None:
            self.link.send(len(frame))
        self._send_bytes(frame)

    def receive(self) -> tuple[FrameType, memoryview]:
        """The next whole frame: (type, body)."""
        first_byte_at = None
        while len(self._buffer) < FRAME_HEADER.size or len(self._buffer) < FRAME_HEADER.size - 1 + self._frame_length():
            data = self._recv_some()
            if first_byte_at is None:
                first_byte_at = time.perf_counter()
            if not data:
                raise LambdaSplitError("the server closed the connection")
            self._buffer += data
        length = self._frame_length()
        total = FRAME_HEADER.size - 1 + length
        raw = bytes(self._buffer[:total])
        del self._buffer[:total]
        if self.link is not None:
            self.link.receive(total, first_byte_at if first_byte_at is not None else time.perf_counter())
        try:
            frame_type = FrameType(raw[FRAME_HEADER.size - 1])
        except ValueError:
            raise ProtocolError("bad_frame", f"unknown frame type {raw[FRAME_HEADER.size - 1]}") from None
        return frame_type, memoryview(raw)[FRAME_HEADER.size:]

    def _frame_length(self) -> int:
        length, _ = FRAME_HEADER.unpack_from(self._buffer, 0)
        return length

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
