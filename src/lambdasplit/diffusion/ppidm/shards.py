"""The device's handle on one shard server: a network session, or the same handler in-process.

Both build the same STEP frames and read the same RESULT frames, so byte counts and
numerics are identical; `LocalShard` only skips the socket (fast tests, quick studies).
"""

from __future__ import annotations

import struct

import torch

from lambdasplit.client.remote import Session
from lambdasplit.diffusion import protocols as proto
from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.ppidm.service import ROLE
from lambdasplit.errors import ProtocolError, RemoteError
from lambdasplit.wire.codecs import encode
from lambdasplit.wire.frames import FRAME_HEADER, FrameType, parse_json


def request_frame(position: int, ops: list[wire_ops.Op], up_codec) -> bytes:
    blobs = [encode(wire_ops.header_tensor(ops), proto.diffusion_codec("fp32")).blob]
    blobs += [encode(t.contiguous(), up_codec).blob for op in ops for t in op.tensors]
    return proto.tensors_frame(FrameType.STEP, struct.pack("<I", position), blobs)


def read_result(body: memoryview, position: int) -> tuple[list[torch.Tensor], float]:
    if len(body) < 8:
        raise ProtocolError("bad_frame", "RESULT frame too short")
    got, compute_us = struct.unpack_from("<II", body, 0)
    if got != position:
        raise ProtocolError("bad_result", f"expected the answer to request {position}, got {got}")
    return [t for t, _, _ in proto.parse_blobs(body, 8)], compute_us / 1e6


class RemoteShard(Session):
    def __init__(self, address: str, *, fingerprint: str, codec: str, up_codec: str, **options):
        self.up_codec = proto.diffusion_codec(up_codec)
        self.position = 0
        self.address = address
        # Nothing about the other servers or this one's place in the grid: the paper's
        # arrangement argument (what a server can still infer is measured by the audit).
        hello = {"role": ROLE, "model": fingerprint, "dtype": "float32", "codec": proto.diffusion_codec(codec).name}
        super().__init__(address, hello, **options)

    def send(self, ops: list[wire_ops.Op]) -> int:
        data = request_frame(self.position, ops, self.up_codec)
        self.transport.send(data)
        return len(data)

    def receive(self) -> tuple[list[torch.Tensor], int, float]:
        body = self.expect(FrameType.RESULT)
        tensors, seconds = read_result(body, self.position)
        self.position += 1
        self.round_trips += 1
        self.cloud_seconds += seconds
        return tensors, FRAME_HEADER.size + len(body), seconds


class LocalShard:
    """A UNetShardService's handler called directly with the frames a RemoteShard would send."""

    def __init__(self, service, *, codec: str = "fp32", up_codec: str = "fp32"):
        self.handler = service.open({"codec": codec}, None)
        self.up_codec = proto.diffusion_codec(up_codec)
        self.position, self.pending, self.bytes_up, self.bytes_down, self.round_trips = 0, b"", 0, 0, 0
        self.cloud_seconds = 0.0

    def send(self, ops: list[wire_ops.Op]) -> int:
        data = request_frame(self.position, ops, self.up_codec)
        out = []
        self.handler.handle(FrameType.STEP, memoryview(data)[FRAME_HEADER.size:], out.append)
        self.pending = out[0]
        self.bytes_up += len(data)
        return len(data)

    def receive(self) -> tuple[list[torch.Tensor], int, float]:
        kind = self.pending[FRAME_HEADER.size - 1]
        body = memoryview(self.pending)[FRAME_HEADER.size:]
        if kind == FrameType.ERROR:
            error = parse_json(body)
            raise RemoteError(str(error.get("code")), str(error.get("message")))
        tensors, seconds = read_result(body, self.position)
        self.position += 1
        self.round_trips += 1
        self.bytes_down += len(self.pending)
        self.cloud_seconds += seconds
        return tensors, len(self.pending), seconds

    def close(self) -> None:
        pass


def blob_bytes(shape: tuple[int, ...], codec) -> int:
    """Bytes of one tensor blob (wire/codecs.py layout) without encoding anything."""
    from math import ceil, prod

    from lambdasplit.wire.codecs import AFFINE

    numel = prod(shape)
    if codec.kind == AFFINE:
        groups = shape[1] if codec.granularity == "channel" else (numel // shape[-1] if codec.granularity == "token" else 1)
        return 4 + 4 * len(shape) + 8 * groups + ceil(numel * codec.bits / 8)
    return 4 + 4 * len(shape) + numel * codec.bits // 8


class ShapeShard:
    """A shard on the meta device: the same operations on shapes only, frame sizes computed.

    For paper-scale traffic tables (Stable Diffusion 1.5 at 512 px) without its weights or compute.
    """

    def __init__(self, convs: list, *, codec: str = "fp32", up_codec: str = "fp32"):
        self.convs = convs
        self.codec, self.up_codec = proto.diffusion_codec(codec), proto.diffusion_codec(up_codec)
        self.stats_codec = proto.diffusion_codec("fp32")
        self.pending: tuple[list[torch.Tensor], int] = ([], 0)
        self.stored: dict[int, tuple] = {}

    def send(self, ops: list[wire_ops.Op]) -> int:
        size = FRAME_HEADER.size + 4 + 1 + blob_bytes((len(ops), 6), self.stats_codec)
        size += sum(blob_bytes(tuple(t.shape), self.up_codec) for op in ops for t in op.tensors)
        outs, down = [], FRAME_HEADER.size + 8 + 1
        for op in ops:
            if op.kind in wire_ops.CONV_KINDS:
                out = wire_ops.conv_block(op.tensors[0], self.convs[op.header[0]], tuple(op.header[1:5]))
                outs.append(out)
                down += blob_bytes(tuple(out.shape), self.codec)
                if op.kind == wire_ops.CONV_STATS:
                    outs.append(torch.empty(out.shape[0], out.shape[1], 2, device="meta"))
                    down += blob_bytes(tuple(outs[-1].shape), self.stats_codec)
            elif op.kind == wire_ops.GROUP_NORM:
                x = op.tensors[0]
                outs.append(torch.empty(x.shape[0], op.header[1], 2, device="meta"))
                down += blob_bytes(tuple(outs[-1].shape), self.stats_codec)
            else:
                if op.header[1] == wire_ops.KV_STORE:
                    self.stored[op.header[0]] = op.tensors[1:]
                outs.append(torch.empty_like(op.tensors[0]))
                down += blob_bytes(tuple(outs[-1].shape), self.codec)
        self.pending = (outs, down)
        return size

    def receive(self) -> tuple[list[torch.Tensor], int, float]:
        return self.pending[0], self.pending[1], 0.0

    def close(self) -> None:
        pass
