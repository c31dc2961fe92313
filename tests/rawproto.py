"""The session protocol written from docs/protocol.md with plain sockets, for hostile tests.

Deliberately independent of lambdasplit's own client and wire code: a test that attacks
the server must not share the server's assumptions. Frames: u32 length (type + body),
u8 type, body; tensor blobs: u8 kind, u8 bits, u8 granularity, u8 ndim, u32 x ndim
shape, [affine: f32 scales, f32 offsets], payload.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import numpy as np

HELLO, WELCOME, STEP, RESULT, ERROR, CLOSE, GENERATE, TOKEN, DONE = range(1, 10)
TABLES, REFINE = 12, 13

# Every ERROR code docs/protocol.md documents (internal_error is a bug, never expected).
DOCUMENTED_CODES = {
    "protocol_version", "unauthorized", "wrong_role", "wrong_model", "wrong_split", "wrong_dtype", "bad_codec",
    "bad_hello", "expected_hello", "bad_frame", "bad_tensor", "unexpected_frame", "bad_shape", "bad_step",
    "wrong_codec", "out_of_order", "too_many_positions", "frame_too_large", "kv_cache_limit", "too_many_sessions",
    "too_many_connections", "idle_timeout", "bad_request", "bad_sequence", "server_busy", "bad_table",
}
PROTOCOL = 2


def frame(kind: int, body: bytes = b"") -> bytes:
    return struct.pack("<IB", len(body) + 1, kind) + body


def json_frame(kind: int, obj) -> bytes:
    return frame(kind, json.dumps(obj).encode())


def fp32_blob(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    return struct.pack(f"<BBBB{array.ndim}I", 0, 32, 0, array.ndim, *array.shape) + array.tobytes()


def blob_header(kind: int, bits: int, granularity: int, shape) -> bytes:
    return struct.pack(f"<BBBB{len(shape)}I", kind, bits, granularity, len(shape), *shape)


def step_frame(position: int, blobs: list[bytes], seq: int = 1) -> bytes:
    """A body STEP of protocol 2: u32 seq (1 for a session's first STEP, +1 each), u32 position, u8 count, blobs."""
    return frame(STEP, struct.pack("<IIB", seq, position, len(blobs)) + b"".join(blobs))


def diffusion_step_frame(position: int, blobs: list[bytes]) -> bytes:
    """A diffusion STEP (the U-Net's sessions keep protocol 1's layout): u32 position, u8 count, blobs."""
    return frame(STEP, struct.pack("<IB", position, len(blobs)) + b"".join(blobs))


class Peer:
    """One raw connection: send bytes, read whole frames, see how the server ended it."""

    def __init__(self, address: str, *, timeout: float = 30.0, rcvbuf: int | None = None, source: str | None = None):
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.seq = 0  # STEPs sent by step()

    def send(self, data: bytes) -> bool:
        """False if the server had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def finish(self) -> None:
        """Half-close: the server reads end-of-stream after what was sent."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _exactly(self, n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(min(n - len(data), 1 << 20))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def receive(self) -> tuple[int, bytes] | None:
        """The next frame, or None once the server has closed the connection."""
        header = self._exactly(5)
        if header is None:
            return None
        length, kind = struct.unpack("<IB", header)
        body = self._exactly(length - 1) if length > 1 else b""
        return None if body is None else (kind, body)

    def outcome(self) -> str:
        """How the server answered: an ERROR's code, "closed", or the name of another frame type."""
        got = self.receive()
        if got is None:
            return "closed"
        kind, body = got
        if kind == ERROR:
            error = json.loads(body)
            assert error["message"], "every error carries a message"
            return error["code"]
        return {WELCOME: "WELCOME", RESULT: "RESULT", TOKEN: "TOKEN", DONE: "DONE"}.get(kind, f"type {kind}")

    def hello(self, message: dict) -> dict:
        self.send(json_frame(HELLO, message))
        got = self.receive()
        assert got is not None and got[0] == WELCOME, got
        return json.loads(got[1])

    def step(self, position: int, hidden: np.ndarray) -> np.ndarray:
        """One STEP (numbered after this peer's previous ones); the RESULT's fp32 tensor."""
        self.seq += 1
        self.send(step_frame(position, [fp32_blob(hidden)], seq=self.seq))
        got = self.receive()
        assert got is not None and got[0] == RESULT, got if got is None or got[0] != ERROR else json.loads(got[1])
        body = got[1]  # u32 seq, u32 position, u32 compute_us, u8 count, blob
        seq, echoed = struct.unpack_from("<II", body, 0)
        assert (seq, echoed) == (self.seq, position) and body[12] == 1
        kind, bits, granularity, ndim = struct.unpack_from("<BBBB", body, 13)
        assert (kind, ndim) == (0, 3)
        shape = struct.unpack_from("<3I", body, 17)
        return np.frombuffer(body, dtype="<f4", offset=29).reshape(shape).copy()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM) from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
