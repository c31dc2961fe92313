"""The calibrated codec `calK` (wire/calibrated.py, wire/calibrate.py): tables, strict headers, real sessions.

On a tiny Llama with planted outlier channels, calibrated per split, `cal` codes the hidden
states in a basis where the planted channels are ordinary high-variance components (no exact
values), so at fewer bytes than `adaptive` it reconstructs them with less error, and far less
than per-token int8.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rawproto
from lambdasplit.bench import codecs as bench_codecs
from lambdasplit.client import DeviceModel
from lambdasplit.client.run import run_generation
from lambdasplit.errors import ProtocolError, UsageError
from lambdasplit.llm.segments import load_body, load_head
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire import calibrate, calibrated
from lambdasplit.wire.calibrated import Table
from lambdasplit.wire.codecs import decode, encode, get_codec, read_header, roundtrip

PROMPTS = ["the cat sat on the mat and", "once upon a time there was", "in the beginning the"]
SPLIT = "2:4"


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    source = tiny_model_dir("llama", hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    bench_codecs.plant_outliers(model, channels=(3, 17, 40), scale=2000.0)
    folder = tmp_path_factory.mktemp("planted-cal")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tables(planted):
    device = DeviceModel.load(planted, SPLIT)
    return calibrate.load_or_calibrate(device, load_body(planted, 2, 4))


def cal(name: str, table: Table):
    return dataclasses.replace(get_codec(name), table=table)


def hidden_at_x(planted, prompt: str) -> torch.Tensor:
    device = DeviceModel.load(planted, SPLIT)
    return load_head(planted, 2).forward(torch.tensor([device.encode(prompt, chat=False)]), 0)


def test_tables_are_cached_orthonormal_and_sensitivity_weighted(planted, tables):
    up, down = tables
    device = DeviceModel.load(planted, SPLIT)
    assert calibrate.cache_path(device.checkpoint.fingerprint, device.split).exists()
    again = calibrate.load_cached(device.checkpoint.fingerprint, device.split)  # what a client reads
    assert again[0].digest == up.digest and again[1].digest == down.digest and up.digest != down.digest
    for table in tables:
        assert np.abs(table.basis.T @ table.basis - np.eye(64)).max() < 1e-4
        assert table.weight.min() >= 0.25 and table.weight.max() <= 4 and table.weight.std() > 0
        assert np.exp(np.log(table.weight).mean()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(UsageError, match="lambdasplit calibrate"):
        calibrate.load_cached("0" * 64, (2, 4))


def test_cal_beats_adaptive_and_int8_in_error_at_fewer_bytes(planted, tables):
    hidden = hidden_at_x(planted, PROMPTS[1])  # not calibration text
    sizes = {name: len(encode(hidden, get_codec(name)).blob) for name in ("int8", "adaptive")}
    errors = {name: (roundtrip(hidden, get_codec(name)) - hidden).pow(2).mean().item() for name in sizes}
    # the finest cal within adaptive's bytes (the quality knob moves in quarter bits)
    fitting = [cal(f"cal{q / 4:g}", tables[0]) for q in range(32, 49)]
    fitting = [c for c in fitting if len(encode(hidden, c).blob) <= sizes["adaptive"]]
    assert fitting and fitting[0].name == "cal", sizes  # cal8 fits, with room to spare
    coded = fitting[-1]
    sizes["cal"] = len(encode(hidden, coded).blob)
    errors["cal"] = (roundtrip(hidden, coded) - hidden).pow(2).mean().item()
    assert errors["cal"] < errors["adaptive"] / 1.5 and errors["cal"] < errors["int8"] / 1000, (coded.name, errors)


def test_cal_keeps_the_answer_in_the_bench(planted, tables):
    plain = bench_codecs.measure_codec(planted, SPLIT, "int8", PROMPTS, new_tokens=24, heldout_tokens=64)
    row = bench_codecs.measure_codec(planted, SPLIT, "cal", PROMPTS, new_tokens=24, heldout_tokens=64)
    assert row["codec"] == "cal" and row["agreement"] >= 0.99 and row["agreement"] > plain["agreement"], row
    assert row["fraction_of_fp16"] < 1.0


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 9, 64), (3, 2, 64), (64,), (1, 2500, 64)])  # the last: several unpacking chunks
def test_round_trip_keeps_shape_and_dtype_and_the_step(tables, shape):
    x = torch.randn(*shape) * 4
    x[..., 3] += 900.0  # a massive channel
    out = roundtrip(x, cal("cal10", tables[0]))
    assert out.shape == x.shape and out.dtype == torch.float32
    rows, sigma = x.reshape(-1, 64), torch.from_numpy(calibrated._robust_spread(x.reshape(-1, 64).numpy()))
    assert ((out.reshape(-1, 64) - rows).abs().max(dim=1).values <= 0.01 * sigma * 4 + 1e-3).all()


def test_names_parse_strictly():
    assert get_codec("cal").name == "cal" and get_codec("cal8").name == "cal" and get_codec("cal7.5").bits == 30
    assert get_codec("cal7.75").name == "cal7.75"
    for bad in ("cal1", "cal15", "cal7.3", "cal7.", "cal.5", "calx", "cal+z", "cal7.50000"):
        with pytest.raises(UsageError):
            get_codec(bad)
    with pytest.raises(UsageError, match="calibration table"):
        encode(torch.randn(1, 2, 64), get_codec("cal"))


def cal_prefix(shape, bits: int = 32) -> bytes:
    return rawproto.blob_header(6, bits, 1, shape)


def test_hostile_headers_are_refused_before_decoding(tables):
    good = encode(torch.randn(1, 2, 64), cal("cal", tables[0])).blob
    cases = {
        "huge shape, tiny frame": cal_prefix([1, 2**20, 2**11]) + bytes(64),
        "shift out of range": cal_prefix([1, 1, 64]) + bytes(4) + struct.pack("<e", 1.0) + bytes([100])
        + calibrated.varint(0) + calibrated.varint(8) + bytes(8),
        "more exact values than elements": cal_prefix([1, 1, 64]) + bytes(7) + calibrated.varint(65),
        "bit stream longer than possible": cal_prefix([1, 1, 64]) + bytes(7) + bytes(1) + calibrated.varint(10**6),
        "bit stream too short for a zero per value": cal_prefix([1, 1, 64]) + bytes(8) + calibrated.varint(7)
        + bytes(7),
        "varint beyond a u32": cal_prefix([1, 1, 64]) + bytes(7) + b"\xff" * 5 + b"\x01",
        "bit stream beyond the blob": cal_prefix([1, 1, 64]) + bytes(8) + calibrated.varint(9) + bytes(8),
        "bits out of range": cal_prefix([1, 1, 64], bits=57) + bytes(64),
        "truncated": good[:-1],
    }
    for case, blob in cases.items():
        with pytest.raises(ProtocolError) as error:
            read_header(blob)
        assert error.value.code == "bad_tensor", case


def test_payloads_that_lie_or_the_wrong_table_are_refused_when_decoding(tables):
    up, down = tables
    blob = encode(torch.randn(1, 3, 64), cal("cal", up)).blob
    for table, message in ((None, "needs the session's calibration table"), (down, "another calibration table")):
        with pytest.raises(ProtocolError, match=message):
            decode(blob, table=table)
    lying = bytearray(blob)
    lying[-1] = 0xFF  # the unary stream's last zeros become ones: fewer values than declared
    with pytest.raises(ProtocolError):
        decode(bytes(lying), table=up)
    header = read_header(blob)  # a stream one byte longer than its values (its length varint fixed up)
    position = header.data + calibrated.DIGEST_BYTES + 3 * 3
    count, position = calibrated.read_varint(memoryview(blob), position)
    length, stream_at = calibrated.read_varint(memoryview(blob), position + 8 * count)
    padded = blob[:position + 8 * count] + calibrated.varint(length + 1) + blob[stream_at:] + b"\x00"
    assert len(padded) == len(blob) + 1 + (len(calibrated.varint(length + 1)) - len(calibrated.varint(length)))
    with pytest.raises(ProtocolError, match="longer than its values"):
        decode(padded, table=up)
    sigma_at = 4 + 12 + calibrated.DIGEST_BYTES
    for bad_sigma in (float("nan"), 0.0, -1.0):
        forged = bytearray(blob)
        forged[sigma_at:sigma_at + 2] = struct.pack("<e", bad_sigma)
        with pytest.raises(ProtocolError, match="spreads"):
            decode(bytes(forged), table=up)


def test_a_refinement_is_sixteen_times_finer_at_a_quarter_of_fp16(planted, tables):
    up, down = tables
    x = hidden_at_x(planted, PROMPTS[1])  # not calibration text
    coarse = encode(x, cal("cal7", up)).blob
    fine = calibrated.refinement_blob(x, coarse, up)
    assert len(fine) == 16 + calibrated.DIGEST_BYTES + 1 + 64 * calibrated.REFINE_BITS // 8
    refined = calibrated.apply_refinement(coarse, fine, up)
    assert refined.shape == (1, 1, 64)
    coarse_error = (decode(coarse, table=up)[0][0, -1] - x[0, -1]).norm()
    assert (refined[0, 0] - x[0, -1]).norm() < coarse_error / 8  # 16 times finer, give or take the exact components
    for table in (down,):
        with pytest.raises(ProtocolError, match="does not refine"):
            calibrated.apply_refinement(coarse, fine, table)
    with pytest.raises(ProtocolError, match="does not refine"):  # refining a blob of another bound
        calibrated.apply_refinement(encode(x, cal("cal8", up)).blob, fine, up)
    with pytest.raises(ProtocolError, match="only answers REFINE"):
        decode(fine, table=up)
    with pytest.raises(ProtocolError):
        read_header(fine[:-1])


def test_tables_are_validated_strictly(tables):
    up = tables[0]
    good = up.to_bytes()
    assert Table.from_bytes(good, 64).digest == up.digest
    mean_at, basis_at = 4, 4 + 4 * 64
    weight_at = basis_at + 4 * 64 * 64

    def patched(offset: int, data: bytes) -> bytes:
        return good[:offset] + data + good[offset + len(data):]

    cases = {
        "truncated": good[:-1],
        "another D": struct.pack("<I", 65) + good[4:],
        "NaN mean": patched(mean_at, struct.pack("<f", float("nan"))),
        "huge mean": patched(mean_at, struct.pack("<f", 1e9)),
        "not orthonormal": patched(basis_at, struct.pack("<f", 3.0)),
        "weight out of range": patched(weight_at, struct.pack("<f", 100.0)),
        "negative weight": patched(weight_at, struct.pack("<f", -1.0)),
        "Rice parameter out of range": good[:-1] + bytes([200]),
    }
    for case, data in cases.items():
        with pytest.raises(ProtocolError) as error:
            Table.from_bytes(data, 64)
        assert error.value.code == "bad_table", case
    with pytest.raises(ProtocolError):
        Table.from_bytes(good, 2**20)  # a D no table is allowed (no big allocation either)


def test_a_real_session_takes_the_tables_and_matches_the_in_process_codec(planted, tables):
    device = DeviceModel.load(planted, SPLIT)
    body = load_body(planted, 2, 4)
    up, down = tables
    hello = {"protocol": rawproto.PROTOCOL, "role": "body", "model": device.checkpoint.fingerprint, "layers": [2, 4],
             "dtype": "float32", "codec": "cal"}
    step = encode(hidden_at_x(planted, PROMPTS[0]), cal("cal", up)).blob
    with ServerProcess(["--model", planted, "--layers", SPLIT]) as server:
        bad = up.to_bytes()[:-1] + bytes([99])  # a Rice parameter beyond 24 in the up table
        for frames, expected in (([rawproto.frame(12, bad + down.to_bytes())], "bad_table"),
                                 ([rawproto.frame(12, up.to_bytes())], "bad_table"),  # one table only
                                 ([rawproto.step_frame(0, [step])], "unexpected_frame")):  # STEP before TABLES
            with rawproto.Peer(server.address) as peer:
                peer.hello(hello)
                for data in frames:
                    peer.send(data)
                assert peer.outcome() == expected
        with rawproto.Peer(server.address) as peer:  # tables for another codec's session
            peer.hello({**hello, "codec": "adaptive"})
            peer.send(rawproto.frame(12, up.to_bytes() + down.to_bytes()))
            assert peer.outcome() == "unexpected_frame"
        names = [up.sha256, down.sha256]
        with rawproto.Peer(server.address) as peer:  # tables named in HELLO that the server does not hold yet
            assert peer.hello({**hello, "tables": names})["tables_needed"] is True
        for bad in ("ab", [up.sha256], [up.sha256, "X" * 64], [1, 2]):
            with rawproto.Peer(server.address) as peer:
                peer.send(rawproto.json_frame(rawproto.HELLO, {**hello, "tables": bad}))
                assert peer.outcome() == "bad_hello", bad
        for codec, gap in (("cal", "auto"), ("cal7.5", 1e9)):  # 1e9: every step refined (kind 7 answers)
            record = run_generation(model=planted, mode="split", prompt=PROMPTS[0], max_new_tokens=12, split=SPLIT,
                                    server=server.address, codec=codec, ignore_eos=True, chat=False, device=device,
                                    refine_gap=gap)
            # the same guard and prompt precision as `generate`'s (client/run.py, client/remote.py)
            coded = bench_codecs.CodedBody(body.fork(), cal(codec, up), cal(codec, down), prefill=34)
            expected = device.generate(PROMPTS[0], body=coded, max_new_tokens=12, ignore_eos=True,
                                       chat=False, refine_gap=0.02 if gap == "auto" else gap)
            assert record["codec"] == codec and record["token_ids"] == expected.token_ids, codec
            assert record["refine_gap"] == (0.02 if gap == "auto" else gap) and record["refined"] == expected.refined
            if gap != "auto":
                assert record["refined"] == 12 and record["round_trips"] == 24
            tables_frame = 5 + 2 * Table.size(64)
            # the first session sends the tables; the server keeps them, so the second sends none
            assert (record["bytes_up"] > tables_frame) == (codec == "cal"), (codec, record["bytes_up"])
        with rawproto.Peer(server.address) as peer:  # named in HELLO, held: STEPs right away
            assert peer.hello({**hello, "tables": names})["tables_needed"] is False
            peer.seq += 1
            peer.send(rawproto.step_frame(0, [step], seq=peer.seq))
            got = peer.receive()
            assert got is not None and got[0] == rawproto.RESULT
            out = decode(bytes(got[1][13:]), table=down)[0]  # seq, position, compute_us, count, then the blob
            assert out.shape == hidden_at_x(planted, PROMPTS[0]).shape
            assert got[1][14] == 32  # the blob's bits byte: cal8 in quarter bits, as the STEP
        prompt = hidden_at_x(planted, PROMPTS[0])
        with rawproto.Peer(server.address) as peer:  # a finer STEP is answered as finely; a coarser one refused
            peer.hello({**hello, "tables": names})
            peer.send(rawproto.step_frame(0, [encode(prompt, cal("cal9", up)).blob], seq=1))
            got = peer.receive()
            assert got[0] == rawproto.RESULT and got[1][14] == 36
            assert decode(bytes(got[1][13:]), table=down)[0].shape == prompt.shape
            peer.send(rawproto.step_frame(prompt.shape[1], [encode(prompt[:, -1:], cal("cal7", up)).blob], seq=2))
            assert peer.outcome() == "wrong_codec"


def test_a_failover_replays_the_prompt_at_its_own_precision(planted, tables):
    """The prompt's step travels at cal8.5 (RemoteBody.prefill); a replay after a failover sends it
    again as that step, byte for byte, then the later positions at the session's cal7."""
    from lambdasplit.client.remote import FailoverBody
    from lambdasplit.server import BodyServer, BodyService

    device = DeviceModel.load(planted, SPLIT)
    ids = device.encode(PROMPTS[0], chat=False)
    n = len(ids)
    hidden = load_head(planted, 2).forward(torch.tensor([ids + [5, 6, 7]]), 0)
    first = BodyServer([BodyService(planted, SPLIT)]).start_in_thread()
    with BodyServer([BodyService(planted, SPLIT)]) as second:
        capture: list = []
        with FailoverBody.for_device(device, [first.address, second.address], codec="cal7", capture=capture) as body:
            body.forward(hidden[:, :n], 0)
            body.forward(hidden[:, n:n + 1], n)
            first.stop()
            body.forward(hidden[:, n + 1:n + 2], n + 1)  # fails over: the replay
            assert body.failovers == 1 and body.live.round_trips == 2
    steps = [data for direction, data in capture if direction == "up" and data[4] == rawproto.STEP]
    prompt, replayed_prompt, rest = steps[0], steps[-2], steps[-1]
    blob_at = 5 + 4 + 4 + 1  # frame header, seq, position, count
    assert prompt[blob_at + 1] == replayed_prompt[blob_at + 1] == 34  # cal8.5 in quarter bits
    assert prompt[blob_at:] == replayed_prompt[blob_at:]
    assert rest[blob_at + 1] == 28 and struct.unpack_from("<3I", rest, blob_at + 4) == (1, 2, 64)
