"""The client's transport: one TCP connection (optionally TLS) that counts every byte.

Counts are of the bytes written to and read from the TCP socket, so with TLS they
include TLS records and handshakes, exactly what a packet capture of the payload would
show. TLS is driven through `ssl.MemoryBIO` for that reason: the TLS layer never touches
the socket itself, we move its records and count them.

With a Link (wire/link.py), the socket asks the kernel for receive timestamps
(SO_TIMESTAMPNS), because the link model needs the time a frame's first byte really
arrived, not the time we got round to reading it: a streamed TOKEN frame that arrived
while the client was holding back the previous one must not be charged the delay again.
Small reads go through a buffer: one recvmsg takes whatever the kernel holds (up to 64 KiB)
with its stamp, and every frame cut from those bytes keeps that stamp. Reading each frame
by itself instead would ask the kernel for a stamp in the middle of a segment, which some
kernels do not give (CI saw every frame of one coalesced segment charged again). Large
bodies are read straight into their own buffer. Where stamps are unavailable, the read
time stands in.

A frame header announcing more than `max_frame_bytes` (default 256 MiB) is refused with
a ProtocolError before anything is allocated, so a hostile server cannot make the
client allocate without bound.

Every socket failure is a NetworkError naming the server and what happened (refused,
reset, closed, timed out after `timeout` seconds without a byte, TLS failure and why);
the CLI prints it as one line and exits with code 3.
"""

from __future__ import annotations

import platform
import socket
import ssl
import struct
import sys
import time

from lambdasplit.errors import NetworkError, ProtocolError
from lambdasplit.wire.frames import FRAME_HEADER, FrameType
from lambdasplit.wire.link import Link

DEFAULT_MAX_FRAME_BYTES = 256 * 2**20
DEFAULT_TIMEOUT = 60.0  # seconds to connect, and to wait for the server's next bytes

# Python does not export SO_TIMESTAMPNS. 35 is its value (SO_TIMESTAMPNS_OLD, = SCM_TIMESTAMPNS)
# in asm-generic/socket.h, which x86 and arm use; other architectures differ, so no stamps there.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", None)
if _SO_TIMESTAMPNS is None and sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64"):
    _SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")  # struct timespec on 64-bit Linux: seconds, nanoseconds (CLOCK_REALTIME)
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
_READ_CHUNK = 1 << 20
_SMALL_READ = 1 << 16  # reads below this go through the stamped buffer (module doc)


class Transport:
    """Frames over a byte-counting socket, with optional TLS and link emulation."""

    def __init__(self, host: str, port: int, *, tls_ca: str | None = None, tls: bool = False,
                 link: Link | None = None, timeout: float = DEFAULT_TIMEOUT, capture: list | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.server = f"{host}:{port}"
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self.link = link
        self.max_frame_bytes = max_frame_bytes
        self.capture = capture  # when a list, every (direction, raw bytes) is appended: what a sniffer sees
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as error:
            raise NetworkError(f"cannot connect to {self.server}: unknown host ({error.strerror})") from None
        except ConnectionRefusedError:
            raise NetworkError(f"cannot connect to {self.server}: connection refused (is a server running there?)") from None
        except TimeoutError:
            raise NetworkError(f"cannot connect to {self.server}: timed out after {timeout:g} s") from None
        except OSError as error:
            raise NetworkError(f"cannot connect to {self.server}: {error.strerror or error}") from None
        self._opened_at = time.perf_counter()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.kernel_stamps = False  # whether arrival times come from the kernel (else: read time)
        if link is not None and _SO_TIMESTAMPNS is not None and _ANCILLARY:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                self.kernel_stamps = True
            except OSError:
                pass
        self._tls = None
        self._tls_arrived = 0.0  # arrival time of the last socket chunk fed to TLS
        self._buffer = memoryview(bytearray(_SMALL_READ))
        self._buffered = memoryview(b"")  # received, not yet handed out: a tail of _buffer
        self._buffered_arrived = 0.0  # when the kernel got those bytes
        if tls or tls_ca:
            context = ssl.create_default_context(cafile=tls_ca)
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = context.wrap_bio(self._in, self._out, server_hostname=host)
            self._scratch = memoryview(bytearray(_READ_CHUNK))
            self._handshake()

    # ---- raw socket, counted ----
    def _failure(self, error: OSError, doing: str) -> NetworkError:
        """One line naming the server and what happened."""
        if isinstance(error, TimeoutError):
            what = f"timed out: no answer for {self.timeout:g} s while {doing} (the timeout is an option: --timeout)"
        elif isinstance(error, ConnectionResetError):
            what = f"connection reset while {doing} (the server went away)"
        elif isinstance(error, (BrokenPipeError, ConnectionAbortedError)):
            what = f"connection closed by the server while {doing}"
        else:
            what = f"{error.strerror or error} while {doing}"
        return NetworkError(f"server {self.server}: {what}")

    def _sock_send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise self._failure(error, "sending") from None
        self.bytes_sent += len(data)
        if self.capture is not None:
            self.capture.append(("up", bytes(data)))

    def _sock_read(self, view: memoryview) -> tuple[int, float]:
        """Read into `view`: (bytes read, perf_counter time they arrived; 0 bytes = closed)."""
        try:
            if not self.kernel_stamps:
                count = self.sock.recv_into(view)
                arrived = time.perf_counter()
            else:
                count, ancillary, _, _ = self.sock.recvmsg_into([view], _ANCILLARY)
                arrived = self._arrival(ancillary)
        except OSError as error:
            raise self._failure(error, "waiting for its answer") from None
        self.bytes_received += count
        if self.capture is not None and count:
            self.capture.append(("down", bytes(view[:count])))
        return count, arrived

    def _arrival(self, ancillary) -> float:
        """The kernel's CLOCK_REALTIME receive stamp, moved to the perf_counter clock; else now."""
        now, wall = time.perf_counter(), time.time()
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                age = wall - (seconds + nanoseconds * 1e-9)
                # Bytes cannot predate the connection; a stamp outside that range is not trusted.
                if -0.001 <= age <= now - self._opened_at:
                    return now - max(0.0, age)
        return now

    # ---- TLS through memory BIOs ----
    def _flush_tls(self) -> None:
        pending = self._out.read()
        if pending:
            self._sock_send(pending)

    def _feed_tls(self) -> bool:
        """Move one socket chunk into the TLS layer; False if the server closed the connection."""
        count, self._tls_arrived = self._sock_read(self._scratch)
        if count:
            self._in.write(self._scratch[:count])
        return count > 0

    def _handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                self._flush_tls()
                return
            except ssl.SSLWantReadError:
                self._flush_tls()
                if not self._feed_tls():
                    raise NetworkError(f"server {self.server}: TLS handshake failed: the server closed the connection "
                                       "(is it serving TLS on this port?)")
            except ssl.SSLError as error:
                reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
                raise NetworkError(f"server {self.server}: TLS handshake failed: {reason}") from None

    def _send_bytes(self, data: bytes) -> None:
        if self._tls is None:
            self._sock_send(data)
        else:
            self._tls.write(data)
            self._flush_tls()

    def _read_some(self, view: memoryview) -> tuple[int, float]:
        """Decrypted (or plain) bytes into `view`: (count, arrival time; 0 = closed).

        With TLS, bytes are stamped with the socket chunk that delivered them: TLS is fed
        only when it has nothing left to decrypt, so that is the last chunk fed (approximately:
        a record can straddle two chunks).
        """
        if self._tls is None:
            return self._plain_read(view)
        while True:
            try:
                return self._tls.read(len(view), view), self._tls_arrived
            except ssl.SSLWantReadError:
                if not self._feed_tls():
                    return 0, 0.0
            except ssl.SSLZeroReturnError:
                return 0, 0.0
            except ssl.SSLError as error:
                raise NetworkError(f"server {self.server}: TLS failure: {error.reason or error}") from None

    def _plain_read(self, view: memoryview) -> tuple[int, float]:
        """Plain bytes into `view`, small reads cut from the stamped buffer (module doc)."""
        if not self._buffered:
            if len(view) >= _SMALL_READ:
                return self._sock_read(view)
            count, self._buffered_arrived = self._sock_read(self._buffer)
            if not count:
                return 0, 0.0
            self._buffered = self._buffer[:count]
        count = min(len(view), len(self._buffered))
        view[:count] = self._buffered[:count]
        self._buffered = self._buffered[count:]
        return count, self._buffered_arrived

    def _read_exactly(self, nbytes: int) -> tuple[bytearray, float]:
        """Exactly `nbytes` of the stream, and the arrival time of the first of them."""
        data = bytearray(nbytes)
        view = memoryview(data)
        done, first_arrived = 0, None
        while done < nbytes:
            count, arrived = self._read_some(view[done:done + _READ_CHUNK])
            if not count:
                raise NetworkError(f"server {self.server}: {self._closed_reason()}")
            if first_arrived is None:
                first_arrived = arrived
            done += count
        return data, first_arrived if first_arrived is not None else time.perf_counter()

    def _closed_reason(self) -> str:
        if self._tls is None and self.bytes_received == 0:
            return ("the server closed the connection without answering (if it serves TLS, pass --tls-ca "
                    "or LAMBDASPLIT_TLS_CA)")
        return "the server closed the connection"

    # ---- frames ----
    def send(self, frame: bytes) -> None:
        if self.link is not None:
            self.link.send(len(frame))
        self._send_bytes(frame)

    def receive(self) -> tuple[FrameType, memoryview]:
        """The next whole frame: (type, body)."""
        first_frame = self.bytes_received == 0
        header, first_byte_at = self._read_exactly(FRAME_HEADER.size)
        if first_frame and self._tls is None and header[0] in (0x15, 0x16) and header[1] == 0x03:
            self.close()  # a TLS record (alert or handshake), not a frame
            raise NetworkError(f"server {self.server} answered with TLS: pass --tls-ca CAFILE (or LAMBDASPLIT_TLS_CA)")
        length, type_byte = FRAME_HEADER.unpack(header)
        if length < 1 or length > self.max_frame_bytes:
            self.close()  # the stream cannot be resynchronised
            if length < 1:
                raise ProtocolError("bad_frame", "frame header announces length 0 (it must count the type byte)")
            raise ProtocolError("frame_too_large", f"the server announced a frame of {length} bytes, above this "
                                                   f"client's limit of {self.max_frame_bytes} bytes (max_frame_bytes)")
        body, _ = self._read_exactly(length - 1) if length > 1 else (bytearray(), 0.0)
        if self.link is not None:
            self.link.receive(FRAME_HEADER.size - 1 + length, first_byte_at)
        try:
            frame_type = FrameType(type_byte)
        except ValueError:
            raise ProtocolError("bad_frame", f"unknown frame type {type_byte}") from None
        return frame_type, memoryview(body)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
