"""`bench codecs` and the codecs in real sessions, on a tiny Llama with planted outlier channels.

Planting: three embedding columns x2000, so those residual-stream channels dwarf the rest at
every split (as SmolLM2's do). Plain per-token int8 spends its grid on them; the threshold
split and adaptive codecs send them exactly and keep the bulk's precision: they must win in
greedy agreement and in reconstruction error. Then a real server session negotiates each new
codec in HELLO and produces the tokens the in-process measurement predicts.
"""

from __future__ import annotations

import json
import re

import pytest
import rawproto
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lambdasplit.bench import codecs as bench_codecs
from lambdasplit.cli import main
from lambdasplit.client import DeviceModel
from lambdasplit.client.run import run_generation
from lambdasplit.errors import UsageError
from lambdasplit.llm.lowbit import apply_device_weights, device_weight_bytes
from lambdasplit.llm.segments import load_body, load_head
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.codecs import encode, get_codec, roundtrip

PROMPTS = ["the cat sat on the mat and", "once upon a time there was", "in the beginning the"]
SPLIT = "2:4"


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    source = tiny_model_dir("llama", hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    bench_codecs.plant_outliers(model, channels=(3, 17, 40), scale=2000.0)
    folder = tmp_path_factory.mktemp("planted")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def measure(planted, codec, direction="both"):
    return bench_codecs.measure_codec(planted, SPLIT, codec, PROMPTS, direction=direction, new_tokens=24,
                                      heldout_tokens=64)


def test_the_planted_channels_dominate_the_hidden_states(planted):
    device = DeviceModel.load(planted, SPLIT)
    hidden = load_head(planted, 2).forward(torch.tensor([device.encode(PROMPTS[0], chat=False)]), 0)[0]
    peak = hidden.abs().amax(dim=0)
    assert peak[[3, 17, 40]].min() > 20 * peak[[c for c in range(64) if c not in (3, 17, 40)]].max()


def test_new_codecs_beat_plain_int8_in_agreement_and_error(planted):
    plain = measure(planted, "int8")
    assert plain["agreement"] < 0.9  # by construction: the bulk lands on a few levels
    device = DeviceModel.load(planted, SPLIT)
    hidden = load_head(planted, 2).forward(torch.tensor([device.encode(PROMPTS[1], chat=False)]), 0)
    error = {name: (roundtrip(hidden, get_codec(name)) - hidden).pow(2).mean().item()
             for name in ("int8", "int8+ts", "adaptive", "int4", "int4+ts")}
    assert error["int8+ts"] < error["int8"] / 50 and error["adaptive"] < error["int8"] / 50
    assert error["int4+ts"] < error["int4"] / 10
    for name in ("int8+ts", "adaptive"):
        row = measure(planted, name)
        assert row["agreement"] >= 0.99 and row["agreement"] > plain["agreement"], row
        assert abs(row["perplexity_change"]) < abs(plain["perplexity_change"]) + 1e-9
        assert row["fraction_of_fp16"] < 1.0  # D = 64: side information and 3 exact values weigh more than at 576
    assert measure(planted, "int4+ts")["agreement"] > measure(planted, "int4")["agreement"]


def test_rows_count_bytes_per_direction(planted):
    up, down = measure(planted, "adaptive", "up"), measure(planted, "int8+ts", "down")
    assert up["down_bytes_per_token"] is None and up["up_bytes_per_token"] > 0
    assert down["up_bytes_per_token"] is None
    fp16_blob = 4 + 4 * 3 + 2 * 64
    assert down["down_bytes_per_token"] == pytest.approx(down["fraction_of_fp16"] * fp16_blob)
    fp32 = measure(planted, "fp32")
    assert fp32["agreement"] == 1.0 and fp32["perplexity_change"] == 0.0 and fp32["flips_per_1k"] == 0.0


def test_teacher_forced_flips_count_what_the_codec_changes(planted):
    plain, better = measure(planted, "int8"), measure(planted, "adaptive")
    assert plain["flips_per_1k"] > better["flips_per_1k"] >= 0.0, (plain, better)
    assert plain["flips_per_1k"] >= 1000 / plain["tokens"]  # int8 here loses tokens, so it flips some
    device, body = bench_codecs._workload(planted, SPLIT)
    reference = bench_codecs._reference(planted, SPLIT, PROMPTS[0], 24)
    prompt_ids = device.encode(PROMPTS[0])
    up, down = bench_codecs._codecs_for("int8", "both")
    assert bench_codecs.teacher_forced_flips(device, body, prompt_ids, reference, None, None, None, 0.0) == 0
    # a guard that flags every position recomputes each with its last downlink row in fp16: on this
    # model that undoes the flip int8 makes on the first prompt
    raw = bench_codecs.teacher_forced_flips(device, body, prompt_ids, reference, up, down, None, 0.0)
    guarded = bench_codecs.teacher_forced_flips(device, body, prompt_ids, reference, up, down, None, 1e9)
    assert raw >= 1 and guarded < raw, (raw, guarded)


def test_a_real_session_negotiates_each_codec_and_matches_the_in_process_measurement(planted):
    device = DeviceModel.load(planted, SPLIT)
    body = load_body(planted, 2, 4)
    with ServerProcess(["--model", planted, "--layers", SPLIT]) as server:
        # hostile STEPs first, refused from their headers; the server then serves everyone as before
        huge = rawproto.blob_header(5, 8, 1, [1, 2**20, 64]) + bytes(64)  # 67 M values declared in 80 bytes
        wrong_width = encode(torch.randn(1, 2, 65), get_codec("adaptive")).blob
        for blob, expected in ((huge, "bad_tensor"), (wrong_width, "bad_shape")):
            with rawproto.Peer(server.address) as peer:
                peer.hello(_hello(device, "adaptive"))
                peer.send(rawproto.step_frame(0, [blob]))
                assert peer.outcome() == expected
        for codec in ("int8+ts", "adaptive", "int8+ts+z"):
            record = run_generation(model=planted, mode="split", prompt=PROMPTS[0], max_new_tokens=12, split=SPLIT,
                                    server=server.address, codec=codec, ignore_eos=True, chat=False, device=device)
            assert record["codec"] == codec
            coded = bench_codecs.CodedBody(body.fork(), get_codec(codec), get_codec(codec))
            expected = device.generate(PROMPTS[0], body=coded, max_new_tokens=12, ignore_eos=True,
                                       chat=False).token_ids
            assert record["token_ids"] == expected, codec
        # the server's own check of names our client would refuse anyway: a raw HELLO
        for name in ("adaptive15", "int17+ts", "adaptive+z"):
            assert _hello_outcome(server.address, device, name) == "bad_codec", name


def _hello(device, codec) -> dict:
    return {"protocol": rawproto.PROTOCOL, "role": "body", "model": device.checkpoint.fingerprint, "layers": [2, 4],
            "dtype": "float32", "codec": codec}


def _hello_outcome(address, device, codec) -> str:
    with rawproto.Peer(address) as peer:
        peer.send(rawproto.json_frame(rawproto.HELLO, _hello(device, codec)))
        return peer.outcome()


def test_a_bad_codec_name_is_one_line(planted):
    with pytest.raises(UsageError, match=re.escape("unknown codec 'adaptive+z'")):
        bench_codecs.measure_codec(planted, SPLIT, "adaptive+z", PROMPTS[:1], new_tokens=2)


def test_int8_device_weights_shrink_memory_and_stay_close(planted):
    device = DeviceModel.load(planted, SPLIT)
    before = device_weight_bytes(device)
    logits = device.tail.fork().forward(load_body(planted, 2, 4).forward(
        device.head.fork().forward(torch.tensor([[5, 6, 7, 8]]), 0), 0), 0)
    apply_device_weights(device, "int8")
    after = device_weight_bytes(device)
    assert after < 0.35 * before
    quantized = device.tail.fork().forward(load_body(planted, 2, 4).forward(
        device.head.fork().forward(torch.tensor([[5, 6, 7, 8]]), 0), 0), 0)
    assert (quantized - logits).abs().max() < 0.05 * logits.abs().max()
    row = bench_codecs.measure_codec(planted, SPLIT, "fp32", PROMPTS[:1], new_tokens=8, heldout_tokens=32,
                                     device_weights="int8")
    assert row["device_weight_mb"] * 1e6 < 0.35 * before and row["tokens"] == 8


def test_bench_codecs_cli_writes_the_table_and_chart(planted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "codecs", "--model", planted, "--splits", "1:N-1", "--codecs", "int8,adaptive",
                 "--directions", "down,both", "--prompts", "2", "--new-tokens", "6", "--heldout-tokens", "32",
                 "--device-weights", "int8", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 2 * 2 + 1
    assert {r["codec"] for r in result["rows"]} == {"int8/token", "adaptive", "fp32"}
    assert {r["model"] for r in result["rows"]} == {planted}
    for name in ("table.md", "table.csv", "table.json", "run.json", "chart.png"):
        assert (out / name).stat().st_size > 0
    assert main(["bench", "codecs", "--model", planted, "--codecs", "int9"]) != 0
    assert "unknown codec 'int9'" in capsys.readouterr().err


def test_generate_device_weights_int8_runs_and_cloud_mode_refuses_it(planted, capsys):
    common = ["generate", "--model", planted, "--prompt", PROMPTS[0], "--no-chat", "--max-new-tokens", "4",
              "--ignore-eos", "--json"]
    assert main([*common, "--mode", "local", "--device-weights", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 4
    assert main([*common, "--mode", "cloud", "--server", "127.0.0.1:9", "--device-weights", "int8"]) != 0
    assert "cloud mode runs none" in capsys.readouterr().err


def test_the_cli_defaults_are_the_modules_defaults():
    """bench/commands.py spells the defaults out (it must not import torch); they must not drift."""
    import argparse

    from lambdasplit.bench.commands import add_codecs_command

    parser = argparse.ArgumentParser()
    add_codecs_command(parser.add_subparsers())
    args = parser.parse_args(["codecs"])
    assert (args.codecs, args.splits) == (bench_codecs.DEFAULT_CODECS, bench_codecs.DEFAULT_SPLITS)
