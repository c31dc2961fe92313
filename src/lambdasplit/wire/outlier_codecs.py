"""Codecs for LLM hidden states with outliers: threshold split (`intN+ts`) and adaptive bits (`adaptiveK`).

Why: hidden states of most LLMs have a few values orders of magnitude above the rest
(SmolLM2: |x| ~ 25000 in channel 507 of the first position, a few hundred elsewhere, a
typical value ~20). A per-token affine scale spends its levels on those, and everything else
lands on a handful of levels. Here the grid step follows the bulk of each vector (its
robust spread sigma = 1.4826 x median absolute deviation, around its median), and the few
values the grid does not cover travel exactly (float32) with their indices.

Both kinds (after the common `u8 kind | u8 bits | u8 granularity | u8 ndim | u32 x ndim
shape` header of wire/codecs.py; granularity is always `token`; T vectors of D values):

    u8 flags                                 bit 0: codes deflated (kind 4 only)
    f32 x T steps, f32 x T centers
    kind 5 only: u8 x T Rice parameters
    u32 K, u32 x K flat indices (strictly increasing), f32 x K values     the exact values
    kind 4: u32 length, codes: N bits each, vector by vector (each vector starts on a byte)
    kind 5: u32 length, low bits: k_t bits each, vector by vector (each starts on a byte)
            u32 length, high parts in unary (q ones then a zero per value, all vectors)

Kind 4, `intN+ts` (threshold split): step = span / (2^(N-1) - 1), span = the largest
|x - center| within 8 sigma; code = round((x - center) / step) in N bits, so values beyond
8 sigma are the exact ones. `+z` deflates the codes.

Kind 5, `adaptiveK` (token-wise adaptive bits): step = sigma * sqrt(12) / 2^K, so each
vector's rounding error is about sigma / 2^K (K = the bound, `adaptive` = `adaptive8`).
The signed codes are Rice-coded with the parameter that makes that vector shortest (on the
wire: the bits per vector adapt to its spread and tails); values beyond 8 sigma are exact.

Every value decodes as center_t + step_t * code; the K exact values replace theirs. A
receiver checks every declared length against the bytes present before allocating.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from lambdasplit.errors import ProtocolError

THRESHOLD_SPLIT = 4
ADAPTIVE = 5
TS_SIGMAS = 8.0  # the grid covers this many robust standard deviations around the center
ADAPTIVE_DEFAULT = 8  # `adaptive` = `adaptive8`: rounding error about sigma / 2^8 per vector
MAX_BITS = 16  # intN+ts
MAX_BOUND = 14  # adaptiveK
MAX_RICE = 20  # Rice parameter, bits
MAX_UNARY = 32  # longest unary part of one value: longer ones travel exactly instead
FLAG_DEFLATE = 1


def parse_name(name: str):
    """(kind, bits, deflate) for `intN+ts[+z]` (N in 2..16) and `adaptive[K]` (K in 2..14), else None."""
    base, deflate = (name[:-2], True) if name.endswith("+z") else (name, False)
    if base.startswith("int") and base.endswith("+ts") and base[3:-3].isdigit():
        bits = int(base[3:-3])
        return (THRESHOLD_SPLIT, bits, deflate) if 2 <= bits <= MAX_BITS else None
    if base.startswith("adaptive") and (base[8:] == "" or base[8:].isdigit()):
        bits = int(base[8:] or ADAPTIVE_DEFAULT)
        return (ADAPTIVE, bits, False) if 2 <= bits <= MAX_BOUND and not deflate else None
    return None


def codec_name(kind: int, bits: int, deflate: bool) -> str:
    base = f"int{bits}+ts" if kind == THRESHOLD_SPLIT else ("adaptive" if bits == ADAPTIVE_DEFAULT else f"adaptive{bits}")
    return base + ("+z" if deflate else "")


# ---------------------------------------------------------------- encoding

def _robust_center_spread(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: median and 1.4826 x median absolute deviation (= the std of a normal bulk), outliers ignored."""
    center = x.median(dim=1).values
    spread = (x - center[:, None]).abs().median(dim=1).values * 1.4826
    return center, spread.clamp_min(torch.finfo(torch.float32).tiny)


def encode_payload(tensor: torch.Tensor, kind: int, bits: int, deflate: bool) -> tuple[bytes, int, int]:
    """Everything after the common header: (bytes, payload bytes, side-information bytes)."""
    rows = tensor.detach().float().reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.float().reshape(1, 1)
    tokens, width = rows.shape
    center, spread = _robust_center_spread(rows)
    deviation = rows - center[:, None]
    if kind == THRESHOLD_SPLIT:
        # the grid spans the inliers: up to 8 sigma, less when the vector's tails are shorter
        inlier = deviation.abs() <= TS_SIGMAS * spread[:, None]
        span = (deviation.abs() * inlier).amax(dim=1)
        step = span / (2 ** (bits - 1) - 1)
    else:
        step = spread * math.sqrt(12.0) * 2.0**-bits
    step = step.clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(deviation / step[:, None])
    exact = deviation.abs() > TS_SIGMAS * spread[:, None]
    if kind == THRESHOLD_SPLIT:
        exact |= codes.abs() > 2 ** (bits - 1) - 1
    codes = torch.where(exact, torch.zeros_like(codes), codes).to(torch.int64).numpy()
    if kind == ADAPTIVE:
        rice = _rice_parameters(codes)
        too_long = (_zigzag(codes) >> rice[:, None]) > MAX_UNARY
        if too_long.any():  # a rare value far out in a tight vector: cheaper exact than in unary
            exact |= torch.from_numpy(too_long)
            codes[too_long] = 0
    flat_exact = exact.reshape(-1).nonzero().reshape(-1)
    values = rows.reshape(-1)[flat_exact]

    side = step.numpy().astype("<f4").tobytes() + center.numpy().astype("<f4").tobytes()
    if kind == THRESHOLD_SPLIT:
        payload = _pack_rows(codes + 2 ** (bits - 1), np.full(tokens, bits))
        if deflate:
            payload = zlib.compress(payload, 6)
        streams = struct.pack("<I", len(payload)) + payload
    else:
        low, unary = _rice_encode(codes, rice)
        side += rice.astype(np.uint8).tobytes()
        streams = struct.pack("<I", len(low)) + low + struct.pack("<I", len(unary)) + unary
        payload = low + unary
    side += struct.pack("<I", len(flat_exact)) + flat_exact.numpy().astype("<u4").tobytes()
    side += values.numpy().astype("<f4").tobytes()
    body = struct.pack("<B", FLAG_DEFLATE if deflate else 0) + side + streams
    return body, len(payload), len(body) - len(payload)


def _zigzag(codes: np.ndarray) -> np.ndarray:
    return np.where(codes >= 0, 2 * codes, -2 * codes - 1)


def _rice_parameters(codes: np.ndarray) -> np.ndarray:
    """Per row, the Rice parameter k making it shortest: D (k + 1) + sum(z >> k) bits."""
    zigzag = _zigzag(codes)
    candidates = np.arange(MAX_RICE + 1)
    cost = np.stack([(zigzag >> k).sum(axis=1) for k in candidates], axis=1) + codes.shape[1] * (candidates + 1)
    return cost.argmin(axis=1)


def _rice_encode(codes: np.ndarray, rice: np.ndarray) -> tuple[bytes, bytes]:
    """Signed codes [T, D] with a parameter per row -> (low bits, unary high parts)."""
    zigzag = _zigzag(codes)
    low = _pack_rows(zigzag & ((1 << rice[:, None]) - 1), rice)
    high = (zigzag >> rice[:, None]).reshape(-1)
    bits = np.ones(int(high.sum()) + high.size, dtype=np.uint8)
    bits[np.cumsum(high + 1) - 1] = 0  # each value: `high` ones, then a zero
    return low, np.packbits(bits, bitorder="little").tobytes()


def _rice_decode(low: np.ndarray, unary: np.ndarray, rice: np.ndarray, width: int) -> np.ndarray:
    """The inverse of `_rice_encode`: signed codes [T, D] as float32."""
    count = len(rice) * width
    zeros = np.flatnonzero(np.unpackbits(unary, bitorder="little") == 0)
    if len(zeros) < count:
        raise ProtocolError("bad_tensor", f"unary stream ends after {len(zeros)} of {count} values")
    high = np.diff(zeros[:count], prepend=-1) - 1
    if high.max(initial=0) > MAX_UNARY:
        raise ProtocolError("bad_tensor", f"a unary part longer than {MAX_UNARY}")
    zigzag = (high.reshape(len(rice), width).astype(np.int64) << rice[:, None]) | _unpack_rows(low, rice, width)
    return np.where(zigzag & 1, -(zigzag + 1) // 2, zigzag // 2).astype(np.float32)


def _row_offsets(token_bits: np.ndarray, width: int) -> np.ndarray:
    """Byte offset of each row's codes (each row starts on a byte), plus the total at the end."""
    sizes = (token_bits.astype(np.int64) * width + 7) // 8
    return np.concatenate([[0], np.cumsum(sizes)])


def _pack_rows(codes: np.ndarray, token_bits: np.ndarray) -> bytes:
    """Codes [T, D] with b_t bits in row t, LSB first, rows back to back (each padded to a byte)."""
    tokens, width = codes.shape
    offsets = _row_offsets(token_bits, width)
    out = np.zeros(int(offsets[-1]), dtype=np.uint8)
    for bits in np.unique(token_bits):  # rows of equal width pack in one vectorised call
        rows = np.nonzero(token_bits == bits)[0]
        planes = ((codes[rows, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(len(rows), -1)
        packed = np.packbits(planes, axis=1, bitorder="little")
        size = packed.shape[1]
        out[(offsets[rows][:, None] + np.arange(size)).reshape(-1)] = packed.reshape(-1)
    return out.tobytes()


def _unpack_rows(raw: np.ndarray, token_bits: np.ndarray, width: int) -> np.ndarray:
    """The inverse of `_pack_rows`: codes [T, D] (uint32), unpacked a bounded number of rows at a time."""
    offsets = _row_offsets(token_bits, width)
    codes = np.empty((len(token_bits), width), dtype=np.uint32)
    chunk = max(1, _UNPACK_VALUES // width)
    for bits in np.unique(token_bits):
        bits = int(bits)
        size = (bits * width + 7) // 8
        all_rows = np.nonzero(token_bits == bits)[0]
        for first in range(0, len(all_rows), chunk):
            rows = all_rows[first:first + chunk]
            packed = raw[(offsets[rows][:, None] + np.arange(size)).reshape(-1)].reshape(len(rows), size)
            planes = np.unpackbits(packed, axis=1, bitorder="little")[:, : width * bits].reshape(len(rows), width, bits)
            value = np.zeros((len(rows), width), dtype=np.uint32)
            for plane in range(bits):
                value |= planes[:, :, plane].astype(np.uint32) << plane
            codes[rows] = value
    return codes


_UNPACK_VALUES = 1 << 18  # values unpacked at once: scratch stays a few MB whatever the blob declares


def _row_bytes(width: int, bits: int) -> int:
    return math.ceil(width * bits / 8)


# ---------------------------------------------------------------- header reading (nothing allocated)

def read_header(data: memoryview, start: int, offset: int, kind: int, bits: int, granularity: str,
                shape: tuple[int, ...]):
    """The signature of wire/codecs.py's readers: every declared size checked against the bytes present."""
    from lambdasplit.wire.codecs import BlobHeader, Codec, _need

    top = MAX_BITS if kind == THRESHOLD_SPLIT else MAX_BOUND
    if not 2 <= bits <= top or granularity != "token":
        raise ProtocolError("bad_tensor", f"a codec-{kind} tensor has 2..{top} bits and token granularity, "
                                          f"this one declares {bits} bits, {granularity}")
    numel = math.prod(shape)
    if numel == 0 or not shape:
        raise ProtocolError("bad_tensor", f"a codec-{kind} tensor of shape {list(shape)} has no vectors")
    width = shape[-1]
    tokens = numel // width
    _need(data, offset, 1 + 8 * tokens)
    flags = data[offset]
    if flags & ~FLAG_DEFLATE or (kind == ADAPTIVE and flags):
        raise ProtocolError("bad_tensor", f"codec-{kind} tensor with unknown flags {flags}")
    position = offset + 1 + 8 * tokens
    if kind == ADAPTIVE:
        _need(data, position, tokens)
        rice = np.frombuffer(data, dtype=np.uint8, count=tokens, offset=position)
        if rice.max(initial=0) > MAX_RICE:
            raise ProtocolError("bad_tensor", f"adaptive tensor declares a Rice parameter above {MAX_RICE}")
        coded = int(((rice.astype(np.int64) * width + 7) // 8).sum())
        position += tokens
    else:
        coded = tokens * ((bits * width + 7) // 8)
    _need(data, position, 4)
    (count,) = struct.unpack_from("<I", data, position)
    if count > numel:
        raise ProtocolError("bad_tensor", f"tensor declares {count} exact values for {numel} elements")
    position += 4
    _need(data, position, 8 * count + 4)
    position += 8 * count
    (length,) = struct.unpack_from("<I", data, position)
    position += 4
    if kind == THRESHOLD_SPLIT and not flags and length != coded:
        raise ProtocolError("bad_tensor", f"tensor codes are {length} bytes, its shape and bits need {coded}")
    if kind == THRESHOLD_SPLIT and flags and length > coded + 64 + coded // 8:  # deflate never grows more
        raise ProtocolError("bad_tensor", f"deflated codes of {length} bytes for {coded} bytes of codes")
    if kind == ADAPTIVE and length != coded:
        raise ProtocolError("bad_tensor", f"tensor low bits are {length} bytes, its Rice parameters need {coded}")
    _need(data, position, length)
    position += length
    if kind == ADAPTIVE:
        _need(data, position, 4)
        (unary,) = struct.unpack_from("<I", data, position)
        position += 4
        if not (numel + 7) // 8 <= unary <= (numel * (MAX_UNARY + 1) + 7) // 8:
            raise ProtocolError("bad_tensor", f"unary stream of {unary} bytes for {numel} values")
        _need(data, position, unary)
        position += unary
    codec = Codec(codec_name(kind, bits, bool(flags & FLAG_DEFLATE)), kind, bits, "token")
    return BlobHeader(codec, tuple(shape), start, offset, position)


# ---------------------------------------------------------------- decoding

def decode(data: memoryview, header) -> torch.Tensor:
    """Decode a blob `read_header` accepted: a float32 tensor of header.shape."""
    shape, kind, bits = header.shape, header.codec.kind, header.codec.bits
    width = shape[-1]
    tokens = header.numel // width
    position = header.data
    deflate = bool(data[position] & FLAG_DEFLATE)
    position += 1
    step = np.frombuffer(data, dtype="<f4", count=tokens, offset=position).astype(np.float32)
    center = np.frombuffer(data, dtype="<f4", count=tokens, offset=position + 4 * tokens).astype(np.float32)
    position += 8 * tokens
    if kind == ADAPTIVE:
        rice = np.frombuffer(data, dtype=np.uint8, count=tokens, offset=position).astype(np.int64)
        position += tokens
    (count,) = struct.unpack_from("<I", data, position)
    position += 4
    indices = np.frombuffer(data, dtype="<u4", count=count, offset=position).astype(np.int64)
    values = np.frombuffer(data, dtype="<f4", count=count, offset=position + 4 * count)
    position += 8 * count
    (length,) = struct.unpack_from("<I", data, position)
    position += 4
    stream = np.frombuffer(data, dtype=np.uint8, count=length, offset=position)
    position += length
    if kind == THRESHOLD_SPLIT:
        coded = tokens * ((bits * width + 7) // 8)
        if deflate:
            stream = np.frombuffer(_inflate(stream, coded), dtype=np.uint8)
        out = _unpack_rows(stream, np.full(tokens, bits), width).astype(np.float32)
        out -= np.float32(2 ** (bits - 1))
    else:
        (unary,) = struct.unpack_from("<I", data, position)
        out = _rice_decode(stream, np.frombuffer(data, dtype=np.uint8, count=unary, offset=position + 4), rice, width)
    if not (np.isfinite(step).all() and np.isfinite(center).all()):
        raise ProtocolError("bad_tensor", "tensor steps or centers are not finite")
    out *= step[:, None]
    out += center[:, None]
    if count:
        if np.any(np.diff(indices) <= 0) or indices[-1] >= header.numel:
            raise ProtocolError("bad_tensor", "exact-value indices must be strictly increasing and inside the tensor")
        out.reshape(-1)[indices] = values
    return torch.from_numpy(out).reshape(shape)


def _inflate(stream: np.ndarray, size: int) -> bytes:
    """Inflate to exactly `size` bytes, never more (a deflate bomb stops at the declared size)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stream.tobytes(), size)
    except zlib.error as error:
        raise ProtocolError("bad_tensor", f"deflated codes do not inflate: {error}") from None
    if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
        raise ProtocolError("bad_tensor", f"deflated codes do not inflate to their {size} bytes")
    return raw
