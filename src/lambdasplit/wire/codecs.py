"""Codecs: a tensor <-> the bytes of one tensor blob on the wire.

Blob layout (little-endian), documented in docs/protocol.md:

    u8 kind (0 fp32, 1 fp16, 2 bf16, 3 affine int, 4 threshold split, 5 adaptive) | u8 bits | u8 granularity | u8 ndim
    u32 x ndim shape
    affine only: f32 x G scales, then f32 x G offsets (G groups, see granularity)
    payload: ceil(numel * bits / 8) bytes (affine values bit-packed, least significant bit first)

Affine quantisation: q = round((x - min) / scale), scale = (max - min) / (2^bits - 1), per
group; decoded as q * scale + min. Granularity names the groups: `tensor` (one),
`token` (one per vector along the last dim: the LLM hidden-state case), `channel` (one
per index of dim 1: the diffusion case).

Kinds 4 and 5 (`intN+ts`, `adaptive`: LLM hidden states with outliers) live in
wire/outlier_codecs.py and register their header reader, decoder and encoder below. Kind 6
(`calK`, a basis calibrated per model and split) lives in wire/calibrated.py; its codec carries
the direction's calibration table (`Codec.table`), and decoding it needs that table.
`LLM_CODECS` lists the names `generate --codec` and `bench codecs` offer for hidden states.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from lambdasplit.errors import ProtocolError, UsageError
from lambdasplit.wire import calibrated, outlier_codecs

FLOAT_KINDS = {"fp32": (0, 32, torch.float32), "fp16": (1, 16, torch.float16), "bf16": (2, 16, torch.bfloat16)}
AFFINE = 3
GRANULARITIES = ("tensor", "token", "channel")
MAX_NDIM = 8
# Hidden-state codecs worth offering for LLMs, cheapest-to-richest within each family.
LLM_CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "int4+ts", "int8+ts", "int8+ts+z", "int10+ts+z", "adaptive6",
              "adaptive7", "adaptive", "adaptive9", "cal7", "cal", "cal9")


@dataclass(frozen=True)
class Codec:
    """A named way to put a tensor on the wire, e.g. `fp16`, `int8`, `int4/channel`."""

    name: str
    kind: int
    bits: int
    granularity: str = "tensor"
    # kind 6 only: the calibration table this direction codes with (not part of the codec's identity)
    table: object = field(default=None, compare=False, repr=False)

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
    bound = calibrated.parse_name(name)
    if bound is not None:
        return Codec(calibrated.codec_name(bound), calibrated.CALIBRATED, bound, "token")
    parsed = outlier_codecs.parse_name(name)
    if parsed is not None:
        kind, bits, deflate = parsed
        return Codec(outlier_codecs.codec_name(kind, bits, deflate), kind, bits, "token")
    base, _, granularity = name.partition("/")
    granularity = granularity or default_granularity
    if base.startswith("int") and base[3:].isdigit() and 2 <= int(base[3:]) <= 8 and granularity in GRANULARITIES:
        return Codec(f"{base}/{granularity}", AFFINE, int(base[3:]), granularity)
    raise UsageError(
        f"unknown codec {name!r}: use fp32, fp16, bf16, intN with N in 2..8 (optionally /tensor, /token or "
        f"/channel), intN+ts[+z] with N in 2..16, adaptive[K] or cal[K] with K in 2..14"
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
    if codec.kind == calibrated.CALIBRATED:
        if codec.table is None:
            raise UsageError(f"codec {codec.name} needs a calibration table (lambdasplit calibrate)")
        body, payload, side = calibrated.encode_payload(tensor, codec.bits, codec.table)
        return Encoded(header + body, payload, side)
    if codec.kind in OUTLIER_KINDS:
        deflate = codec.name.endswith("+z")
        body, payload, side = outlier_codecs.encode_payload(tensor, codec.kind, codec.bits, deflate)
        return Encoded(header + body, payload, side)
    if codec.kind != AFFINE:
        dtype = FLOAT_KINDS[codec.name][2]
        values = tensor.to(dtype).contiguous()
        payload = values.view(torch.uint8).numpy().tobytes() if values.numel() else b""
        return Encoded(header + payload, len(payload), 0)
    q, scale, offset = quantize(tensor, codec)
    scales = scale.numpy().astype("<f4").tobytes() + offset.numpy().astype("<f4").tobytes()
    payload = pack_bits(q.reshape(-1).numpy(), codec.bits)
    return Encoded(header + scales + payload, len(payload), len(scales))


@dataclass(frozen=True)
class BlobHeader:
    """What a tensor blob declares, read from its header alone (nothing decoded or allocated).

    A receiver checks this against what it expects (shape, codec) before `decode_blob`
    allocates anything: a hostile blob can only cost what its header says, and the header
    is checked against the bytes present. Each codec kind has its own header reader in
    `HEADER_READERS`; a new kind adds one there and a decoder in `DECODERS`.
    """

    codec: Codec
    shape: tuple[int, ...]
    start: int  # offset of the blob's first byte
    data: int  # offset of what follows the shape (affine scales, payload)
    end: int  # offset after the blob

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded_bytes(self) -> int:
        """Bytes the decoded float32 tensor takes (decoding allocates this, plus bounded scratch)."""
        return 4 * self.numel


def _float_header(data, start, offset, kind, bits, granularity, shape) -> BlobHeader:
    name = ["fp32", "fp16", "bf16"][kind]
    size = math.prod(shape) * FLOAT_KINDS[name][1] // 8
    _need(data, offset, size)
    return BlobHeader(Codec(name, kind, FLOAT_KINDS[name][1]), shape, start, offset, offset + size)


def _affine_header(data, start, offset, kind, bits, granularity, shape) -> BlobHeader:
    if not 2 <= bits <= 8:
        raise ProtocolError("bad_tensor", f"an affine tensor has 2..8 bits, this one declares {bits}")
    numel, ndim = math.prod(shape), len(shape)
    if numel == 0 or (granularity == "channel" and ndim < 2):
        raise ProtocolError("bad_tensor", f"an int{bits}/{granularity} tensor of shape {list(shape)} has no groups to scale")
    size = 8 * _affine_groups(shape, granularity) + math.ceil(numel * bits / 8)
    _need(data, offset, size)
    return BlobHeader(Codec(f"int{bits}/{granularity}", AFFINE, bits, granularity), shape, start, offset, offset + size)


def _affine_groups(shape: tuple[int, ...], granularity: str) -> int:
    if granularity == "tensor" or not shape:
        return 1
    return math.prod(shape) // shape[-1] if granularity == "token" else shape[1]


def _decode_float(data: memoryview, header: BlobHeader) -> torch.Tensor:
    dtype = FLOAT_KINDS[header.codec.name][2]
    out = torch.empty(header.shape, dtype=torch.float32)
    if header.numel:
        # One copy from the frame into the float32 result, through a view of the frame's bytes.
        raw = np.frombuffer(data, dtype="<u2" if header.codec.bits == 16 else "<f4", count=header.numel,
                            offset=header.data)
        with warnings.catch_warnings():  # a read-only frame is fine: the view is only read
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(raw)
        if header.codec.bits == 16:
            view = view.view(dtype)
        out.copy_(view.reshape(header.shape))
    return out


def _decode_affine(data: memoryview, header: BlobHeader) -> torch.Tensor:
    codec, shape = header.codec, header.shape
    groups = _affine_groups(shape, codec.granularity)
    scale = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=groups, offset=header.data).copy())
    low = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=groups, offset=header.data + 4 * groups).copy())
    per_group = header.numel // groups
    flat = torch.empty(header.numel, dtype=torch.float32)
    payload = header.data + 8 * groups
    # Unpack in chunks of whole bytes (8 values = `bits` bytes), so scratch memory is bounded.
    step = _UNPACK_CHUNK
    for first in range(0, header.numel, step):
        count = min(step, header.numel - first)
        begin = payload + first * codec.bits // 8
        chunk = data[begin:begin + math.ceil(count * codec.bits / 8)]
        flat[first:first + count] = torch.from_numpy(unpack_bits(chunk, codec.bits, count).astype(np.float32))
    grouped = flat.view(groups, per_group)
    grouped.mul_(scale[:, None]).add_(low[:, None])
    return _ungroup(grouped, tuple(shape), codec.granularity)


_UNPACK_CHUNK = 1 << 20  # values per unpacking chunk (a multiple of 8)
OUTLIER_KINDS = (outlier_codecs.THRESHOLD_SPLIT, outlier_codecs.ADAPTIVE)
HEADER_READERS = {0: _float_header, 1: _float_header, 2: _float_header, AFFINE: _affine_header,
                  outlier_codecs.THRESHOLD_SPLIT: outlier_codecs.read_header,
                  outlier_codecs.ADAPTIVE: outlier_codecs.read_header, calibrated.CALIBRATED: calibrated.read_header,
                  calibrated.REFINEMENT: calibrated.read_refinement_header}
DECODERS = {0: _decode_float, 1: _decode_float, 2: _decode_float, AFFINE: _decode_affine,
            outlier_codecs.THRESHOLD_SPLIT: outlier_codecs.decode, outlier_codecs.ADAPTIVE: outlier_codecs.decode}


def read_header(blob: memoryview | bytes, offset: int = 0) -> BlobHeader:
    """Parse one blob's header at `offset` and check its declared sizes against the bytes present.

    Raises ProtocolError('bad_tensor') for anything that does not add up; allocates nothing
    in proportion to what the blob declares.
    """
    data = memoryview(blob)
    start = offset
    try:
        kind, bits, granularity_id, ndim = struct.unpack_from("<BBBB", data, offset)
        offset += 4
        if ndim > MAX_NDIM or granularity_id >= len(GRANULARITIES):
            raise ProtocolError("bad_tensor", f"tensor header has ndim={ndim}, granularity={granularity_id}")
        shape = struct.unpack_from(f"<{ndim}I", data, offset)
        offset += 4 * ndim
    except struct.error as error:
        raise ProtocolError("bad_tensor", f"truncated tensor blob: {error}") from None
    reader = HEADER_READERS.get(kind)
    if reader is None:
        raise ProtocolError("bad_tensor", f"unknown codec kind {kind} with {bits} bits")
    return reader(data, start, offset, kind, bits, GRANULARITIES[granularity_id], tuple(shape))


def decode_blob(blob: memoryview | bytes, header: BlobHeader, table=None) -> torch.Tensor:
    """Decode a blob whose header `read_header` returned (and the caller has accepted).

    `table`: the calibration table of the blob's direction (kind 6 needs it, others ignore it).
    """
    if header.codec.kind == calibrated.CALIBRATED:
        return calibrated.decode(memoryview(blob), header, table)
    if header.codec.kind == calibrated.REFINEMENT:
        raise ProtocolError("bad_tensor", "a refinement (kind 7) only answers REFINE, next to the tensor it refines")
    return DECODERS[header.codec.kind](memoryview(blob), header)


def decode(blob: memoryview | bytes, offset: int = 0, table=None) -> tuple[torch.Tensor, Codec, int]:
    """Decode the blob starting at `offset`: (float32 tensor, codec, offset after the blob).

    Every length is checked against the bytes present: a malformed blob raises
    ProtocolError('bad_tensor'), never reads out of bounds. A receiver that must bound
    what a blob may cost calls `read_header` first and checks it (see server/services.py).
    """
    header = read_header(blob, offset)
    return decode_blob(blob, header, table), header.codec, header.end


def _need(data: memoryview, offset: int, size: int) -> None:
    if offset + size > len(data):
        raise ProtocolError("bad_tensor", f"tensor blob needs {size} bytes at offset {offset}, frame has {len(data) - offset}")


def roundtrip(tensor: torch.Tensor, codec: Codec) -> torch.Tensor:
    """What the receiver sees: encode then decode (float32)."""
    return decode(encode(tensor, codec).blob, table=codec.table)[0]
