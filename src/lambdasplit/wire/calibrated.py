"""Calibrated transform codec `calK` (wire kind 6): LLM hidden states coded in a basis measured per model and split.

Why: measured on SmolLM2 (docs/benchmarks.md), a hidden state's channels are strongly
correlated; coded channel by channel (kinds 4 and 5) every value pays for what its neighbours
already say. A calibration (wire/calibrate.py) measures, per model, split and direction, on
text disjoint from the benchmark prompts:

    mean  [D]      per-channel median of x / sigma_t (sigma_t: the vector's robust spread)
    basis [D, D]   orthonormal eigenvectors of the covariance of x / sigma_t - mean (a KLT)
    weight [D]     relative step per component, 1 / sqrt(Fisher information) normalised to
                   geometric mean 1 and clipped to [1/4, 4] (sensitivity weighting)
    rice  [D]      per-component Rice parameter at K = 8

A vector x (D values) is coded as y = (x / sigma_t - mean) @ basis, codes q = round(y / (weight
* step)), step = sqrt(12) * 2^-K (K in quarter bits, `cal7.75`; rounding error about 2^-K of sigma_t per component, as
`adaptiveK`), and q Rice-coded with parameter rice_i + floor(K) - 8 + shift_t (shift_t per vector,
the one making it shortest). Both ends hold the same table (the device sends it, see
docs/protocol.md); each blob names it by an 8-byte digest.

Blob, after the common `u8 kind | u8 bits | u8 granularity | u8 ndim | u32 x ndim shape` header
(granularity token; T vectors of D values):

    u8[4] table digest | f16 x T sigma | i8 x T shift
    varint K, u32 x K flat indices (strictly increasing), f32 x K values    components sent exactly
    varint length, one bit stream (LSB first): the low bits (k_ti bits per component, all
        vectors), then the high parts in unary (q ones then a zero per value), padded to a byte

(varint: LEB128, 7 bits per byte, least significant group first, at most 5 bytes.) A decode
step's blob at D = 576 carries 27 bytes besides its codes: the 16-byte common header, 4 of
digest, 3 of sigma and shift, 1 + 2 of varints, and on average half a byte of padding.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from lambdasplit.errors import ProtocolError

CALIBRATED = 6
DEFAULT_BOUND = 8  # `cal` = `cal8`
MAX_BOUND = 14
QUARTERS = 4  # the header's bits field holds K in quarter bits: `cal7.75` is 31
MAX_RICE = 24
MAX_UNARY = 32
SHIFTS = range(-12, 21)  # per-vector Rice shift: a sink vector with massive values needs many more bits
MAX_WEIGHT = 4.0
MAX_TABLE_D = 16384
DIGEST_BYTES = 4


def parse_name(name: str):
    """4K (the header's bits field) for `cal` / `calK`, K in 2..14 in steps of 0.25 (`cal7.75`), else None."""
    if not name.startswith("cal"):
        return None
    text = name[3:] or str(DEFAULT_BOUND)
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or ("." in text and fraction not in ("25", "5", "75")):
        return None
    quarters = float(text) * QUARTERS
    if quarters != int(quarters) or not 2 * QUARTERS <= quarters <= MAX_BOUND * QUARTERS:
        return None
    return int(quarters)


def codec_name(quarters: int) -> str:
    return "cal" if quarters == DEFAULT_BOUND * QUARTERS else f"cal{quarters / QUARTERS:g}"


def at_bound(codec, quarters: int):
    """The same calK codec (its table too) at another bound: a prompt's step may travel finer (docs/protocol.md)."""
    from dataclasses import replace

    return replace(codec, name=codec_name(quarters), bits=quarters)


def _step(quarters: int) -> float:
    return math.sqrt(12.0) * 2.0 ** (-quarters / QUARTERS)


@dataclass(frozen=True, eq=False)
class Table:
    """One direction's calibration: what both ends of that direction must hold."""

    mean: np.ndarray  # [D] float32
    basis: np.ndarray  # [D, D] float32, columns are the components
    weight: np.ndarray  # [D] float32 in [1/MAX_WEIGHT, MAX_WEIGHT]
    rice: np.ndarray  # [D] uint8, at K = 8

    @property
    def width(self) -> int:
        return len(self.mean)

    def to_bytes(self) -> bytes:
        """u32 D | f32 x D mean | f32 x D*D basis (row-major) | f32 x D weight | u8 x D rice."""
        return (struct.pack("<I", self.width) + self.mean.astype("<f4").tobytes() + self.basis.astype("<f4").tobytes()
                + self.weight.astype("<f4").tobytes() + self.rice.astype(np.uint8).tobytes())

    @property
    def sha256(self) -> str:
        """The table's name in HELLO (hex): a server that already holds it needs no TABLES frame."""
        if not hasattr(self, "_sha256"):
            object.__setattr__(self, "_sha256", hashlib.sha256(self.to_bytes()).hexdigest())
        return self._sha256

    @property
    def digest(self) -> bytes:
        """The table's name in every blob (the first bytes of its sha256)."""
        return bytes.fromhex(self.sha256)[:DIGEST_BYTES]

    @staticmethod
    def size(width: int) -> int:
        return 4 + 4 * width + 4 * width * width + 4 * width + width

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, width: int) -> "Table":
        """Parse and validate a table for hidden size `width`; ProtocolError('bad_table') on anything off."""
        data = memoryview(data)
        if not 1 <= width <= MAX_TABLE_D or len(data) != cls.size(width):
            raise ProtocolError("bad_table", f"a calibration table for D = {width} is {cls.size(width)} bytes, "
                                             f"got {len(data)}")
        (declared,) = struct.unpack_from("<I", data, 0)
        if declared != width:
            raise ProtocolError("bad_table", f"calibration table is for D = {declared}, this model has D = {width}")
        offset = 4
        mean = np.frombuffer(data, "<f4", width, offset).astype(np.float32)
        offset += 4 * width
        basis = np.frombuffer(data, "<f4", width * width, offset).astype(np.float32).reshape(width, width)
        offset += 4 * width * width
        weight = np.frombuffer(data, "<f4", width, offset).astype(np.float32)
        rice = np.frombuffer(data, np.uint8, width, offset + 4 * width).copy()
        if not (np.isfinite(mean).all() and np.isfinite(basis).all() and np.isfinite(weight).all()):
            raise ProtocolError("bad_table", "calibration table has a value that is not finite")
        if np.abs(mean).max() > 1e6:
            raise ProtocolError("bad_table", "calibration table mean beyond 1e6 (values are in units of sigma)")
        if not ((weight >= 1 / MAX_WEIGHT - 1e-6).all() and (weight <= MAX_WEIGHT + 1e-6).all()):
            raise ProtocolError("bad_table", f"calibration table weights must lie in [1/{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        if rice.max() > MAX_RICE:
            raise ProtocolError("bad_table", f"calibration table Rice parameters must be at most {MAX_RICE}")
        gram = basis.astype(np.float64).T @ basis.astype(np.float64)
        if np.abs(gram - np.eye(width)).max() > 1e-3:
            raise ProtocolError("bad_table", "calibration table basis is not orthonormal")
        return cls(mean, basis, weight, rice)


# ---------------------------------------------------------------- coding

def _zigzag(codes: np.ndarray) -> np.ndarray:
    return np.where(codes >= 0, 2 * codes, -2 * codes - 1)


def _robust_spread(rows: np.ndarray) -> np.ndarray:
    center = np.median(rows, axis=1)
    spread = np.median(np.abs(rows - center[:, None]), axis=1) * 1.4826
    return np.maximum(spread, np.float32(1e-30)).astype(np.float32)


def _base(table: Table, quarters: int) -> np.ndarray:
    """Per component, the Rice parameter at this bound before the vector's shift: [1, D]."""
    return table.rice.astype(np.int64)[None, :] + (quarters - DEFAULT_BOUND * QUARTERS) // QUARTERS


def _parameters(table: Table, quarters: int, shift: np.ndarray) -> np.ndarray:
    """Rice parameter of every component of every vector: [T, D]."""
    return np.clip(_base(table, quarters) + shift.astype(np.int64)[:, None], 0, MAX_RICE)


def forward(rows: np.ndarray, table: Table, quarters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigma [T] as the receiver sees it, components y [T, D] in units of their step, steps [D])."""
    # fp16 on the wire, so clipped to its normal range (a wider vector gets larger codes: a larger shift)
    sigma = np.clip(_robust_spread(rows), 2.0**-14, 65504.0).astype(np.float16).astype(np.float32)
    steps = (table.weight * np.float32(_step(quarters))).astype(np.float32)
    y = ((rows / sigma[:, None] - table.mean[None, :]) @ table.basis) / steps[None, :]
    return sigma, y, steps


def encode_payload(tensor: torch.Tensor, bound: int, table: Table) -> tuple[bytes, int, int]:
    """Everything after the common header: (bytes, payload bytes, side-information bytes)."""
    rows = tensor.detach().float().reshape(-1, tensor.shape[-1]).numpy().astype(np.float32)
    if rows.shape[1] != table.width:
        raise ValueError(f"calibration table is for D = {table.width}, the tensor has D = {rows.shape[1]}")
    sigma, y, steps = forward(rows, table, bound)
    codes = np.round(y).astype(np.int64)
    zigzag = _zigzag(codes)
    base = _base(table, bound)
    shifts = np.array(list(SHIFTS))
    # cost of each shift per vector: sum(k + 1 + (z >> k)); chosen per vector, a byte on the wire
    cost = np.stack([(np.clip(base + s, 0, MAX_RICE) + 1 + (zigzag >> np.clip(base + s, 0, MAX_RICE))).sum(axis=1)
                     for s in shifts], axis=1)
    shift = shifts[cost.argmin(axis=1)].astype(np.int8)
    rice = _parameters(table, bound, shift)
    exact = (zigzag >> rice) > MAX_UNARY  # rare: cheaper exact than in unary
    codes[exact] = 0
    zigzag[exact] = 0
    flat_exact = np.flatnonzero(exact.reshape(-1))
    values = (y.reshape(-1)[flat_exact] * np.repeat(steps[None, :], len(rows), 0).reshape(-1)[flat_exact])
    high = (zigzag >> rice).reshape(-1)
    unary = np.ones(int(high.sum()) + high.size, dtype=np.uint8)
    unary[np.cumsum(high + 1) - 1] = 0
    stream = np.packbits(np.concatenate([_low_bits(zigzag & ((1 << rice) - 1), rice), unary]),
                         bitorder="little").tobytes()
    side = (table.digest + sigma.astype("<f2").tobytes() + shift.tobytes() + varint(len(flat_exact))
            + flat_exact.astype("<u4").tobytes() + values.astype("<f4").tobytes())
    body = side + varint(len(stream)) + stream
    return body, len(stream), len(body) - len(stream)


def varint(value: int) -> bytes:
    """LEB128: 7 bits per byte, least significant first, the high bit set on all but the last."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: memoryview, position: int) -> tuple[int, int]:
    """(value, position after it); at most 5 bytes (a u32), else bad_tensor."""
    value = 0
    for i in range(5):
        if position + i >= len(data):
            raise ProtocolError("bad_tensor", "tensor ends inside a varint")
        byte = data[position + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value >= 2**32:
                break
            return value, position + i + 1
    raise ProtocolError("bad_tensor", "a varint longer than a u32")


def _low_bits(values: np.ndarray, rice: np.ndarray) -> np.ndarray:
    """The low k_ti bits of every value, in order, LSB first, as 0/1 bytes (a bounded number of rows at a time)."""
    chunk = max(1, _UNPACK_VALUES // values.shape[1])
    pieces = [np.zeros(0, dtype=np.uint8)]
    for first in range(0, len(values), chunk):
        part, bits = values[first:first + chunk], rice[first:first + chunk]
        top = int(bits.max(initial=0))
        if top:
            planes = ((part[..., None] >> np.arange(top)) & 1).astype(np.uint8)
            pieces.append(planes[np.arange(top)[None, None, :] < bits[..., None]])
    return np.concatenate(pieces)


def _unpack_low(stream: np.ndarray, rice: np.ndarray) -> np.ndarray:
    """The inverse of `_pack_low`: scratch stays a few MB whatever the blob declares."""
    tokens, width = rice.shape
    out = np.zeros(rice.shape, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(rice.sum(axis=1))])  # each row's first bit in the stream
    chunk = max(1, _UNPACK_VALUES // width)
    for first in range(0, tokens, chunk):
        last = min(tokens, first + chunk)
        bits_here = rice[first:last]
        top = int(bits_here.max(initial=0))
        if not top:
            continue
        begin, end = int(starts[first]), int(starts[last])
        raw = stream[begin // 8:(end + 7) // 8]
        bits = np.unpackbits(raw, bitorder="little")[begin % 8:begin % 8 + end - begin]
        planes = np.zeros((last - first, width, top), dtype=np.uint8)
        planes[np.arange(top)[None, None, :] < bits_here[..., None]] = bits
        for plane in range(top):
            out[first:last] |= planes[..., plane].astype(np.int64) << plane
    return out


_UNPACK_VALUES = 1 << 16  # values (un)packed at once: scratch ~ 24 bytes each


# ---------------------------------------------------------------- header reading (nothing allocated)

def read_header(data: memoryview, start: int, offset: int, kind: int, bits: int, granularity: str,
                shape: tuple[int, ...]):
    """The signature of wire/codecs.py's readers: every declared size checked against the bytes present.

    The low-bit length depends on the table (checked exactly by `decode`); here it is bounded.
    """
    from lambdasplit.wire.codecs import BlobHeader, Codec, _need

    if not 2 * QUARTERS <= bits <= MAX_BOUND * QUARTERS or granularity != "token":
        raise ProtocolError("bad_tensor", f"a codec-6 tensor has {2 * QUARTERS}..{MAX_BOUND * QUARTERS} quarter "
                                          f"bits and token granularity, this one declares {bits}, {granularity}")
    numel = math.prod(shape)
    if numel == 0 or not shape:
        raise ProtocolError("bad_tensor", f"a codec-6 tensor of shape {list(shape)} has no vectors")
    tokens = numel // shape[-1]
    position = offset + DIGEST_BYTES + 3 * tokens
    _need(data, offset, DIGEST_BYTES + 3 * tokens + 1)
    shifts = np.frombuffer(data, np.int8, tokens, offset + DIGEST_BYTES + 2 * tokens)
    if shifts.min() < SHIFTS.start or shifts.max() >= SHIFTS.stop:
        raise ProtocolError("bad_tensor", f"codec-6 tensor with a Rice shift outside {SHIFTS.start}..{SHIFTS.stop - 1}")
    count, position = read_varint(data, position)
    if count > numel:
        raise ProtocolError("bad_tensor", f"tensor declares {count} exact values for {numel} elements")
    _need(data, position, 8 * count + 1)
    position += 8 * count
    length, position = read_varint(data, position)
    # every value has its unary zero; none more than MAX_RICE low bits and MAX_UNARY ones
    if not (numel + 7) // 8 <= length <= (numel * (MAX_RICE + MAX_UNARY + 1) + 7) // 8:
        raise ProtocolError("bad_tensor", f"a bit stream of {length} bytes for {numel} values")
    _need(data, position, length)
    position += length
    return BlobHeader(Codec(codec_name(bits), CALIBRATED, bits, "token"), tuple(shape), start, offset, position)


# ---------------------------------------------------------------- decoding

def decode(data: memoryview, header, table: Table | None) -> torch.Tensor:
    """Decode a blob `read_header` accepted, with the session's table for that direction."""
    sigma, codes, steps, indices, values = _components(data, header, table)
    return _reconstruct(codes * steps[None, :], indices, values, sigma, table, header.shape)


def _reconstruct(y, indices, values, sigma, table: Table, shape) -> torch.Tensor:
    if len(indices):
        y.reshape(-1)[indices] = values
    out = (y @ table.basis.T + table.mean[None, :]) * sigma[:, None]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def _components(data: memoryview, header, table: Table | None):
    """(sigma [T], codes [T, D] float, steps [D], exact indices, exact values) of a checked blob."""
    shape, bound = header.shape, header.codec.bits
    if table is None:
        raise ProtocolError("bad_tensor", "a cal tensor needs the session's calibration table, and there is none")
    width = shape[-1]
    if width != table.width:
        raise ProtocolError("bad_tensor", f"a cal tensor of D = {width}; the calibration table has D = {table.width}")
    if bytes(data[header.data:header.data + DIGEST_BYTES]) != table.digest:
        raise ProtocolError("bad_tensor", "the cal tensor was coded with another calibration table")
    tokens = header.numel // width
    position = header.data + DIGEST_BYTES
    sigma = np.frombuffer(data, "<f2", tokens, position).astype(np.float32)
    shift = np.frombuffer(data, np.int8, tokens, position + 2 * tokens)
    position += 3 * tokens
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ProtocolError("bad_tensor", "cal tensor spreads must be finite and positive")
    count, position = read_varint(data, position)
    indices = np.frombuffer(data, "<u4", count, position).astype(np.int64)
    values = np.frombuffer(data, "<f4", count, position + 4 * count).astype(np.float32)
    position += 8 * count
    if count and (np.any(np.diff(indices) <= 0) or indices[-1] >= header.numel or not np.isfinite(values).all()):
        raise ProtocolError("bad_tensor", "exact components must be finite, strictly increasing and inside the tensor")
    rice = _parameters(table, bound, shift)
    length, position = read_varint(data, position)
    stream = np.frombuffer(data, np.uint8, length, position)
    low_bits = int(rice.sum())
    if 8 * length < low_bits + header.numel:
        raise ProtocolError("bad_tensor", f"cal bit stream of {length} bytes; the table and shifts need "
                                          f"{low_bits} low bits and a unary part")
    low = _unpack_low(stream, rice)
    zeros = np.flatnonzero(np.unpackbits(stream, bitorder="little")[low_bits:] == 0)
    if len(zeros) < header.numel:
        raise ProtocolError("bad_tensor", f"unary stream ends after {len(zeros)} of {header.numel} values")
    if (low_bits + int(zeros[header.numel - 1]) + 8) // 8 != length:
        raise ProtocolError("bad_tensor", "cal bit stream longer than its values")
    high = np.diff(zeros[:header.numel], prepend=-1) - 1
    if high.max(initial=0) > MAX_UNARY:
        raise ProtocolError("bad_tensor", f"a unary part longer than {MAX_UNARY}")
    zigzag = (high.reshape(tokens, width).astype(np.int64) << rice) | low
    codes = np.where(zigzag & 1, -(zigzag + 1) // 2, zigzag // 2).astype(np.float32)
    steps = (table.weight * np.float32(_step(bound))).astype(np.float32)
    return sigma, codes, steps, indices, values


# ---------------------------------------------------------------- refinement (REFINE's answer, kind 7)
#
# A coarse blob's last vector, made 2^B times finer: per component, where inside its rounding
# cell the true value lies, in B bits (the components sent exactly need nothing). Both ends hold
# the coarse blob, so this costs B bits per component instead of a new blob (fp16: 16).
#
#   kind 7 header (bits = B in 1..8, granularity token, shape [1, 1, D]) | u8[4] table digest |
#   u8 the coarse blob's bits | B bits x D, LSB first, padded to a byte
#
# component y_i = (c_i + (r_i + 0.5) / 2^B - 0.5) x step_i, c_i the coarse code, r_i the refinement.

REFINEMENT = 7
REFINE_BITS = 4  # 16 times finer: cal7 refined is about cal11 (fp16's bulk precision is ~2^-11 of a value)


def refinement_blob(row: torch.Tensor, coarse: bytes | memoryview, table: Table, bits: int = REFINE_BITS) -> bytes:
    """The refinement of `coarse`'s last vector towards `row` ([..., D], the value coded there)."""
    from lambdasplit.wire.codecs import read_header as read_any

    coarse = memoryview(coarse)
    header = read_any(coarse)
    sigma, codes, steps, _, _ = _components(coarse, header, table)
    x = row.detach().float().reshape(-1, table.width)[-1].numpy()
    y = ((x / sigma[-1] - table.mean) @ table.basis) / steps
    cells = np.clip(np.floor((y - codes[-1] + 0.5) * (1 << bits)), 0, (1 << bits) - 1).astype(np.int64)
    planes = ((cells[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    head = struct.pack("<BBBB3I", REFINEMENT, bits, 1, 3, 1, 1, table.width)
    return head + table.digest + bytes([header.codec.bits]) + np.packbits(planes, bitorder="little").tobytes()


def read_refinement_header(data: memoryview, start: int, offset: int, kind: int, bits: int, granularity: str,
                           shape: tuple[int, ...]):
    from lambdasplit.wire.codecs import BlobHeader, Codec, _need

    if not 1 <= bits <= 8 or granularity != "token" or len(shape) != 3 or shape[:2] != (1, 1) or shape[2] < 1:
        raise ProtocolError("bad_tensor", f"a refinement (kind 7) has 1..8 bits, token granularity and shape "
                                          f"[1, 1, D]; this one declares {bits}, {granularity}, {list(shape)}")
    size = DIGEST_BYTES + 1 + (bits * shape[2] + 7) // 8
    _need(data, offset, size)
    return BlobHeader(Codec(f"refine{bits}", REFINEMENT, bits, "token"), tuple(shape), start, offset, offset + size)


def apply_refinement(coarse: bytes | memoryview, refinement: bytes | memoryview, table: Table) -> torch.Tensor:
    """`coarse`'s last vector refined ([1, 1, D]); bad_tensor when the two do not belong together."""
    from lambdasplit.wire.codecs import read_header as read_any

    coarse, refinement = memoryview(coarse), memoryview(refinement)
    header, fine = read_any(coarse), read_any(refinement)
    if header.codec.kind != CALIBRATED or fine.codec.kind != REFINEMENT:
        raise ProtocolError("bad_tensor", "a refinement applies to a cal tensor")
    if fine.shape[2] != header.shape[-1] or bytes(refinement[fine.data:fine.data + DIGEST_BYTES]) != table.digest \
            or refinement[fine.data + DIGEST_BYTES] != header.codec.bits:
        raise ProtocolError("bad_tensor", "the refinement does not refine that tensor (width, table or bound)")
    sigma, codes, steps, indices, values = _components(coarse, header, table)
    width, bits = header.shape[-1], fine.codec.bits
    packed = np.frombuffer(refinement, np.uint8, fine.end - fine.data - DIGEST_BYTES - 1, fine.data + DIGEST_BYTES + 1)
    planes = np.unpackbits(packed, bitorder="little")[:bits * width].reshape(width, bits).astype(np.int64)
    cells = (planes << np.arange(bits)).sum(axis=1)
    y = ((codes[-1] + (cells + 0.5) / (1 << bits) - 0.5) * steps)[None, :].astype(np.float32)
    last = (len(codes) - 1) * width
    keep = indices >= last  # the last vector's exact components
    return _reconstruct(y, indices[keep] - last, values[keep], sigma[-1:], table, (1, 1, width))
