"""Outlier-aware codecs (wire/outlier_codecs.py): exact outliers, bounded errors, strict headers, real sessions.

On a tiny model with planted outlier channels the new codecs beat plain per-token intN in
greedy agreement and in reconstruction error, by construction: the planted channels take a
per-token affine grid's whole range, and travel exactly here.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

import rawproto
from rawproto import Peer
from lambdasplit.errors import ProtocolError, UsageError
from lambdasplit.wire import outlier_codecs
from lambdasplit.wire.codecs import LLM_CODECS, decode, encode, get_codec, read_header

NEW_CODECS = ["int8+ts", "int4+ts", "int10+ts", "int8+ts+z", "adaptive", "adaptive6", "adaptive12"]


def hidden_with_outliers(tokens: int = 12, width: int = 96, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, width, generator=generator) * 3
    x[0, 0, 5] = 24000.0  # an attention-sink position's massive value
    x[0, :, 40] = 900.0 + torch.randn(tokens, generator=generator)  # a massive channel
    return x


@pytest.mark.parametrize("name", NEW_CODECS)
def test_round_trip_keeps_outliers_exact_and_the_bulk_within_the_step(name):
    x = hidden_with_outliers()
    codec = get_codec(name)
    encoded = encode(x, codec)
    y, decoded_codec, end = decode(encoded.blob)
    assert decoded_codec == codec and end == len(encoded.blob)
    assert torch.equal(y[0, 0, 5], x[0, 0, 5]) and torch.equal(y[0, :, 40], x[0, :, 40])  # bit for bit
    rows = x.reshape(-1, x.shape[-1])
    center = rows.median(dim=1).values
    sigma = (rows - center[:, None]).abs().median(dim=1).values * 1.4826
    if codec.kind == outlier_codecs.THRESHOLD_SPLIT:  # at most 8 sigma over the grid's half-levels
        step = outlier_codecs.TS_SIGMAS * sigma / (2 ** (codec.bits - 1) - 1)
    else:
        step = sigma * 12**0.5 * 2.0**-codec.bits
    error = (y - x).reshape(rows.shape).abs()
    assert (error <= step[:, None] / 2 * (1 + 1e-4) + 1e-4).all()
    if codec.kind == outlier_codecs.ADAPTIVE:  # the bound: rms error about sigma / 2^K
        rms = (y - x).reshape(rows.shape).pow(2).mean(dim=1).sqrt()
        assert (rms <= 1.2 * sigma * 2.0**-codec.bits).all()


def test_bytes_follow_the_bits_and_beat_affine_error_at_equal_size():
    x = hidden_with_outliers(tokens=32, width=576)
    fp16 = len(encode(x, get_codec("fp16")).blob)
    affine, split = encode(x, get_codec("int8")), encode(x, get_codec("int8+ts"))
    assert abs(len(split.blob) - len(affine.blob)) < 0.05 * len(affine.blob)
    error = {name: (decode(encode(x, get_codec(name)).blob)[0] - x).pow(2).mean().item() for name in ("int8", "int8+ts")}
    assert error["int8+ts"] < error["int8"] / 100
    assert len(encode(x, get_codec("int8+ts+z")).blob) < 0.97 * len(split.blob)  # the codes compress a little
    sizes = [len(encode(x, get_codec(f"adaptive{k}")).blob) for k in (6, 8, 10)]
    assert sizes[0] < sizes[1] < sizes[2] < fp16  # about one byte per vector value per 8 bits of bound
    assert 0.3 < (sizes[2] - sizes[1]) / (2 * 32 * 576 / 8) < 1.2


def test_names_parse_strictly():
    assert get_codec("adaptive").name == "adaptive" and get_codec("adaptive8").name == "adaptive"
    assert get_codec("int8+ts+z").name == "int8+ts+z"
    from lambdasplit.bench.codecs import DEFAULT_CODECS

    for name in [*LLM_CODECS, *DEFAULT_CODECS.split(",")]:
        assert get_codec(name).name.removesuffix("/token") == name
    for bad in ("int1+ts", "int17+ts", "adaptive1", "adaptive15", "adaptive+z", "int8+ts/channel", "int8+tz",
                "adaptivex"):
        with pytest.raises(UsageError):
            get_codec(bad)


def blob_prefix(kind: int, bits: int, shape, flags: int = 0) -> bytes:
    return rawproto.blob_header(kind, bits, 1, shape) + struct.pack("<B", flags)


def hostile_blobs() -> dict[str, bytes]:
    """Blobs whose headers lie: each must be refused by read_header, from the header alone."""
    tokens, width = 2, 8
    side = struct.pack(f"<{2 * tokens}f", *([1.0] * tokens + [0.0] * tokens))
    good = encode(torch.randn(1, tokens, width), get_codec("adaptive")).blob
    huge = rawproto.blob_header(5, 8, 1, [1, 2**20, 2**11])  # 2 G values declared in a few bytes
    return {
        "huge shape, tiny frame": huge + bytes(64),
        "more exact values than elements": blob_prefix(4, 8, [1, tokens, width]) + side + struct.pack("<I", 17),
        "codes shorter than the shape needs": blob_prefix(4, 8, [1, tokens, width]) + side + struct.pack("<II", 0, 15)
        + bytes(15),
        "deflated codes larger than possible": blob_prefix(4, 8, [1, tokens, width], flags=1) + side
        + struct.pack("<II", 0, 1000) + bytes(1000),
        "unknown flags": blob_prefix(4, 8, [1, tokens, width], flags=2) + side + struct.pack("<II", 0, 16) + bytes(16),
        "deflate on adaptive": blob_prefix(5, 8, [1, tokens, width], flags=1) + good[4 + 12 + 1:],
        "Rice parameter out of range": blob_prefix(5, 8, [1, tokens, width]) + side + bytes([21, 0]),
        "unary stream longer than any vector needs": blob_prefix(5, 8, [1, tokens, width]) + side + bytes([0, 0])
        + struct.pack("<III", 0, 0, 10**6) + bytes(64),
        "bits out of range": blob_prefix(4, 17, [1, tokens, width]) + side,
        "channel granularity": rawproto.blob_header(4, 8, 2, [1, tokens, width]) + bytes(64),
        "truncated": good[:-1],
    }


@pytest.mark.parametrize("case", list(hostile_blobs()))
def test_hostile_headers_are_refused_before_decoding(case):
    with pytest.raises(ProtocolError) as error:
        read_header(hostile_blobs()[case])
    assert error.value.code == "bad_tensor"


def test_payloads_that_lie_are_refused_when_decoding():
    x = torch.randn(1, 3, 16)
    adaptive = bytearray(encode(x, get_codec("adaptive")).blob)
    adaptive[-1] = 0xFF  # the unary stream's last zeros become ones: fewer values than declared
    with pytest.raises(ProtocolError):
        decode(bytes(adaptive))
    deflated = encode(x, get_codec("int8+ts+z")).blob
    bomb = zlib.compress(bytes(10**6), 9)  # 1 MB of codes for a tensor that needs 48 bytes
    codes_at = _threshold_codes_offset(deflated)
    with pytest.raises(ProtocolError):
        decode(deflated[:codes_at - 4] + struct.pack("<I", len(bomb)) + bomb)  # inflation stops at 48 bytes


def _threshold_codes_offset(blob: bytes) -> int:
    """Offset of an intN+ts blob's codes (after its u32 length)."""
    ndim = blob[3]
    shape = struct.unpack_from(f"<{ndim}I", blob, 4)
    tokens = int(np.prod(shape)) // shape[-1]
    position = 4 + 4 * ndim + 1 + 8 * tokens
    (count,) = struct.unpack_from("<I", blob, position)
    return position + 4 + 8 * count + 4


def test_threshold_split_is_about_as_fine_as_affine_on_a_vector_without_outliers():
    # Gaussian: no value beyond ~4 sigma. Seeded: over 200 seeds the ratio below was 1.08-1.30 (mean 1.18).
    x = torch.randn(1, 16, 256, generator=torch.Generator().manual_seed(0))
    error = {name: (decode(encode(x, get_codec(name)).blob)[0] - x).pow(2).mean().item() for name in ("int8", "int8+ts")}
    assert error["int8+ts"] <= 1.3 * error["int8"]  # a grid symmetric about the median: a little coarser
