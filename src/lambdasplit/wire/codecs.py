"""Codecs: a tensor <-> the bytes of one tensor blob on the wire.

Blob layout (little-endian), documented in docs/protocol.md:

    u8 kind (0 fp32, 1 fp16, 2 bf16, 3 affine int) | u8 bits | u8 granularity | u8 ndim
    u32 x ndim shape
    affine only: f32 x G scales, then f32 x G offsets (G groups, see granularity)
    payload: ceil(numel * bits / 8) bytes (affine values bit-packed, least significant bit first)

Affine quantisation: q = round((x - min) / scale), scale = (max - min) / (2^bits - 1), per
group; decoded as q * scale + min. Granularity names the groups: `tensor` (one),
`token` (one per vector along the last dim: the LLM hidden-state case), `channel` (one
per index of dim 1: the diffusion case).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from lambdasplit.errors import ProtocolError, UsageError

FLOAT_KINDS = {"fp32": (0, 32, torch.float32), "fp16": (1, 16, torch.float16), "bf16": (2, 16, torch.bfloat16)}
AFFINE = 3
GRANULARITIES = ("tensor", "token", "channel")
MAX_NDIM = 8


@dataclass(frozen=True)
class Codec:
    """A named way to put a tensor on the wire, e.g. `fp16`, `int8`, `int4/channel`."""

    name: str
    kind: int
    bits: int
    granularity: str = "tensor"

    @property
    def lossless(self) -> bool:
        return self.kind == 0

    def encode(self, tensor: torch.Tensor) -> "Encoded":
        return encode(tensor, self)


@dataclass(frozen=True)
class Encoded:
    """One tensor blob, with its byte accounting."""

    blob: bytes
    payload_bytes: int  # the tensor values themselves
    scale_bytes: int  # affine scales and offsets

    @property
    def header_bytes(self) -> int:
        return len(self.blob) - self.payload_bytes - self.scale_bytes


def get_codec(name: str, default_granularity: str = "token") -> Codec:
    """Parse a codec name: fp32, fp16, bf16, intN (N in 2..8), intN/tensor|token|channel."""
    if name in FLOAT_KINDS:
        kind, bits, _ = FLOAT_KINDS[name]
        return Codec(name, kind, bits)
    base, _, granularity = name.partition("/")
    granularity = granularity or default_granularity
    if base.startswith("int") and base[3:].isdigit() and 2 <= int(base[3:]) <= 8 and granularity in GRANULARITIES:
        return Codec(f"{base}/{granularity}", AFFINE, int(base[3:]), granularity)
    raise UsageError(
        f"unknown codec {name!r}: use fp32, fp16, bf16 or intN with N in 2..8, optionally /tensor, /token or /channel"
    )


def _groups(tensor: torch.Tensor, granularity: str) -> torch.Tensor:
    """View the tensor as [groups, values per group]."""
    if granularity == "tensor" or tensor.dim() == 0:
        return tensor.reshape(1, -1)
    if granularity == "token":
        return tensor.reshape(-1, tensor.shape[-1])
    if tensor.dim() < 2:
        raise ValueError("per-channel quantisation needs a tensor with a channel dimension (dim 1)")
    return tensor.movedim(1, 0).reshape(tensor.shape[1], -1)


def _ungroup(flat: torch.Tensor, shape: tuple[int, ...], granularity: str) -> torch.Tensor:
    if granularity == "channel" and len(shape) >= 2:
        moved = (shape[1], shape[0], *shape[2:])
        return flat.reshape(moved).movedim(0, 1)
    return flat.reshape(shape)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ints < 2**bits, `bits` each, least significant bit first."""
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    unpacked = np.unpackbits(values.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(unpacked.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count]
    unpacked = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = unpacked
    return np.packbits(padded, axis=1, bitorder="little").reshape(count)


def quantize(tensor: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine quantisation: (q as uint8 values [groups, n], scale [groups], offset [groups])."""
    grouped = _groups(tensor.detach().float(), codec.granularity)
    low, high = grouped.min(dim=1).values, grouped.max(dim=1).values
    levels = 2**codec.bits - 1
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((grouped - low[:, None]) / scale[:, None]).clamp_(0, levels)
    return q.to(torch.uint8), scale, low


def encode(tensor: torch.Tensor, codec: Codec) -> Encoded:
    tensor = tensor.detach().cpu()
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"tensors of more than {MAX_NDIM} dimensions are not supported")
    granularity_id = GRANULARITIES.index(codec.granularity)
    header = struct.pack("<BBBB", codec.kind, codec.bits, granularity_id, tensor.dim())
    header += struct.pack(f"<{tensor.dim()}I", *tensor.shape)
    if codec.kind != AFFINE:
        dtype = FLOAT_KINDS[codec.name][2]
        values = tensor.to(dtype).contiguous()
        payload = values.view(torch.uint8).numpy().tobytes() if values.numel() else b""
        return Encoded(header + payload, len(payload), 0)
    q, scale, offset = quantize(tensor, codec)
    scales = scale.numpy().astype("<f4").tobytes() + offset.numpy().astype("<f4").tobytes()
    payload = pack_bits(q.reshape(-1).numpy(), codec.bits)
    return Encoded(header + scales + payload, len(payload), len(scales))


def decode(blob: memoryview | bytes, offset: int = 0) -> tuple[torch.Tensor, Codec, int]:
    """Decode the blob starting at `offset`: (float32 tensor, codec, offset after the blob).

    Every length is checked against the bytes present: a malformed blob raises
    ProtocolError('bad_tensor'), never reads out of bounds.
    """
    data = memoryview(blob)
    try:
        kind, bits, granularity_id, ndim = struct.unpack_from("<BBBB", data, offset)
        offset += 4
        if ndim > MAX_NDIM or granularity_id >= len(GRANULARITIES):
            raise ProtocolError("bad_tensor", f"tensor header has ndim={ndim}, granularity={granularity_id}")
        shape = struct.unpack_from(f"<{ndim}I", data, offset)
        offset += 4 * ndim
        numel = math.prod(shape)
        granularity = GRANULARITIES[granularity_id]
        if kind in (0, 1, 2):
            name = ["fp32", "fp16", "bf16"][kind]
            dtype = FLOAT_KINDS[name][2]
            size = numel * FLOAT_KINDS[name][1] // 8
            _need(data, offset, size)
            raw = torch.frombuffer(bytearray(data[offset:offset + size]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
            tensor = raw.view(dtype).reshape(shape).float()
            return tensor, Codec(name, kind, FLOAT_KINDS[name][1]), offset + size
        if kind != AFFINE or not 2 <= bits <= 8:
            raise ProtocolError("bad_tensor", f"unknown codec kind {kind} with {bits} bits")
        codec = Codec(f"int{bits}/{granularity}", AFFINE, bits, granularity)
        if numel == 0 or (granularity == "channel" and ndim < 2):
            raise ProtocolError("bad_tensor", f"an int{bits}/{granularity} tensor of shape {list(shape)} has no groups to scale")
        groups = 1 if granularity == "tensor" or ndim == 0 else (numel // shape[-1] if granularity == "token" else shape[1])
        _need(data, offset, 8 * groups)
        scale = np.frombuffer(data, dtype="<f4", count=groups, offset=offset)
        low = np.frombuffer(data, dtype="<f4", count=groups, offset=offset + 4 * groups)
        offset += 8 * groups
        size = math.ceil(numel * bits / 8)
        _need(data, offset, size)
        q = unpack_bits(bytes(data[offset:offset + size]), bits, numel)
        grouped = torch.from_numpy(q.astype(np.float32)).reshape(groups, -1)
        values = grouped * torch.from_numpy(scale.copy())[:, None] + torch.from_numpy(low.copy())[:, None]
        return _ungroup(values, tuple(shape), granularity), codec, offset + size
    except struct.error as error:
        raise ProtocolError("bad_tensor", f"truncated tensor blob: {error}") from None
    except (ValueError, RuntimeError, IndexError, OverflowError) as error:  # inconsistent header fields
        raise ProtocolError("bad_tensor", f"malformed tensor blob: {error}") from None


def _need(data: memoryview, offset: int, size: int) -> None:
    if offset + size > len(data):
        raise ProtocolError("bad_tensor", f"tensor blob needs {size} bytes at offset {offset}, frame has {len(data) - offset}")


def roundtrip(tensor: torch.Tensor, codec: Codec) -> torch.Tensor:
    """What the receiver sees: encode then decode (float32)."""
    return decode(encode(tensor, codec).blob)[0]
