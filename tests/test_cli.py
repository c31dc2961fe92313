"""The CLI contract other tools rely on: `serve` and `generate --json`, as real processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lambdasplit.server.process import ServerProcess

REQUIRED = {"text", "token_ids", "bytes_up", "bytes_down", "round_trips", "seconds"}


def generate(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", *args, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print one JSON object and nothing else: {out.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def server(model):
    with ServerProcess(["--model", model, "--layers", "2:4", "--layers", "1:5", "--cloud"]) as server:
        yield server


def test_generate_json_contract_in_every_mode(model, server):
    common = ["--model", model, "--prompt", "hello world", "--max-new-tokens", "6", "--ignore-eos", "--no-chat"]
    split = generate(*common, "--mode", "split", "--split", "2:4", "--server", server.address, "--codec", "fp16")
    local = generate(*common, "--mode", "local")
    cloud = generate(*common, "--mode", "cloud", "--server", server.address)
    for record in (split, local, cloud):
        assert REQUIRED <= record.keys()
        assert len(record["token_ids"]) == 6
    assert split["token_ids"] == local["token_ids"] == cloud["token_ids"]
    assert split["round_trips"] == 6 and cloud["round_trips"] == 1 and local["round_trips"] == 0
    assert split["bytes_up"] > 0 and split["bytes_down"] > 0 and local["bytes_up"] == 0


def test_generate_split_equals_transformers_generate(model, server):
    """The contract's exactness, end to end: `generate --mode split` against a `serve` process
    gives the greedy token ids of the unsplit model's own `generate()`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "the lazy dog sleeps in the warm sun"
    split = generate("--model", model, "--prompt", prompt, "--max-new-tokens", "10", "--ignore-eos", "--no-chat",
                     "--mode", "split", "--split", "1:5", "--server", server.address, "--codec", "fp32")
    ids = AutoTokenizer.from_pretrained(model)(prompt, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert split["token_ids"] == reference[0, ids.shape[1]:].tolist()


def test_cli_errors_are_one_clear_line(model, server):
    out = subprocess.run(
        [sys.executable, "-m", "lambdasplit", "generate", "--model", model, "--mode", "split", "--split", "3:4",
         "--server", server.address, "--prompt", "hi", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 4  # the server refused (lambdasplit/errors.py exit codes)
    assert "wrong_split" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    for bad, message in ((["--codec", "int99"], "unknown codec"), (["--max-new-tokens", "-3"], "max_new_tokens"),
                         (["--split", "4:2"], "invalid")):
        out = subprocess.run(
            [sys.executable, "-m", "lambdasplit", "generate", "--model", model, "--mode", "split", "--split", "2:4",
             "--server", server.address, "--prompt", "hi", "--json", *bad],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr)


def test_serve_refuses_public_address_without_tls(model):
    out = subprocess.run([sys.executable, "-m", "lambdasplit", "serve", "--model", model, "--layers", "2:4",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "TLS" in out.stderr


def test_demo_runs_a_split_over_a_server_process(model):
    out = subprocess.run([sys.executable, "-m", "lambdasplit", "demo", "--model", model, "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stayed on this device" in out.stdout and "crossed the wire" in out.stdout
    assert "round trips" in out.stdout
