"""Codecs: exact round trips for lossless codecs, bounded error and exact sizes for affine ones."""

import pytest
import torch

from lambdasplit.errors import ProtocolError
from lambdasplit.wire.codecs import decode, encode, get_codec, pack_bits, unpack_bits


def test_lossless_codecs_round_trip():
    x = torch.randn(1, 5, 64)
    assert torch.equal(decode(encode(x, get_codec("fp32")).blob)[0], x)
    assert torch.equal(decode(encode(x, get_codec("fp16")).blob)[0], x.half().float())
    assert torch.equal(decode(encode(x, get_codec("bf16")).blob)[0], x.bfloat16().float())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_bit_packing_round_trips(bits):
    values = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8).numpy()
    packed = pack_bits(values, bits)
    assert len(packed) == -(-1001 * bits // 8)
    assert (unpack_bits(packed, bits, 1001) == values).all()


@pytest.mark.parametrize("name", ["int8/token", "int6/channel", "int4/tensor", "int2/token"])
def test_affine_error_is_within_half_a_step(name):
    x = torch.randn(2, 4, 8, 8) * 3
    codec = get_codec(name)
    y = decode(encode(x, codec).blob)[0]
    grouped_range = x.max() - x.min()
    assert (x - y).abs().max() <= grouped_range / (2**codec.bits - 1) / 2 + 1e-5


def test_payload_sizes_are_exact_fractions_of_fp32():
    x = torch.randn(1, 4, 16, 16)
    fp32 = encode(x, get_codec("fp32")).payload_bytes
    for name, fraction in [("int8/tensor", 0.25), ("int4/channel", 0.125), ("int2/tensor", 0.0625)]:
        assert encode(x, get_codec(name)).payload_bytes == fp32 * fraction


def test_malformed_blobs_raise_protocol_errors():
    blob = encode(torch.randn(3, 7), get_codec("int4/token")).blob
    for broken in (blob[:3], blob[:10], blob[:-1], b"\x09\x08\x00\x01\x01\x00\x00\x00"):
        with pytest.raises(ProtocolError):
            decode(broken)


def test_unknown_codec_names_are_refused():
    for name in ("int9", "int1", "fp8", "int4/row"):
        with pytest.raises(ValueError):
            get_codec(name)
