"""The speculative CLI contract: `generate --speculate ... --json` on the default model over a
real `lambdasplit serve` process equals `--speculate none`; `bench wan` end to end on a
tiny model with one delay; `zoo train smollm2-draft` (a smoke run on a tiny model) writes a
head that `--speculate eagle` loads and that keeps greedy output exact.
"""

from __future__ import annotations

import json

import pytest
import torch

from lambdasplit.cli import main
from lambdasplit.client import DeviceModel
from lambdasplit.errors import LambdaSplitError
from lambdasplit.server.process import ServerProcess
from lambdasplit.speculative import make_source

SPECULATIVE_FIELDS = {"speculate", "accepted_per_round_trip", "round_trips", "bytes_up", "bytes_down",
                      "drafted_positions", "rejected_positions", "draft_tokens"}


@pytest.fixture(scope="module")
def smollm2_server(smollm2_path):
    with ServerProcess(["--model", str(smollm2_path), "--layers", "2:28"]) as server:
        yield server.address


def _generate(capsys, *args) -> dict:
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("prompt,max_new", [
    ("Repeat exactly: red green blue, red green blue, red green blue.", 40),  # repetition: lookup accepts
    ("What is the capital of France?", 24),  # stops at EOS, likely inside a drafted block
])
def test_default_model_every_source_equals_none(capsys, smollm2_path, smollm2_server, prompt, max_new):
    common = ["--model", str(smollm2_path), "--split", "2:28", "--server", smollm2_server, "--prompt", prompt,
              "--max-new-tokens", str(max_new), "--codec", "fp16"]
    plain = _generate(capsys, *common)
    assert plain["speculate"] == "none" and plain["accepted_per_round_trip"] == 1.0
    assert plain["round_trips"] == plain["new_tokens"]
    for source, k in (("lookup", "4"), ("lookahead", "auto"), ("lookup", "auto")):
        record = _generate(capsys, *common, "--speculate", source, "--draft-tokens", k)
        assert SPECULATIVE_FIELDS <= set(record)
        assert record["token_ids"] == plain["token_ids"], (source, k)
        assert record["speculate"] == source
        assert record["round_trips"] <= plain["round_trips"] + 1
    lookup = _generate(capsys, *common, "--speculate", "lookup", "--draft-tokens", "4")
    if prompt.startswith("Repeat"):
        assert lookup["accepted_per_round_trip"] > 1.5 and lookup["round_trips"] < plain["round_trips"]
    # rejected positions cost bytes: more positions went up than tokens were generated
    assert lookup["bytes_up"] - plain["bytes_up"] >= 0 or lookup["rejected_positions"] == 0


def test_local_mode_and_bad_flags(capsys, tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    common = ["--model", folder, "--mode", "local", "--prompt", "The quick brown fox", "--no-chat",
              "--max-new-tokens", "12", "--ignore-eos"]
    plain = _generate(capsys, *common)
    record = _generate(capsys, *common, "--speculate", "draft", "--draft-model", folder, "--draft-tokens", "3")
    assert record["token_ids"] == plain["token_ids"] and record["round_trips"] == 0
    assert record["steps"] == 3 and record["accepted_per_round_trip"] == 4.0  # the model drafting for itself
    for bad, message in ((["--speculate", "lookup", "--draft-tokens", "many"], "--draft-tokens must be"),
                         (["--speculate", "draft"], "needs --draft-model"),
                         (["--speculate", "lookup", "--cache", "none"], "needs --cache kv")):
        assert main(["generate", *common, *bad]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1


def test_bench_wan_tiny(capsys, tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama"))
    out = tmp_path / "wan"
    code = main(["bench", "wan", "--model", folder, "--delays", "5", "--presets", "", "--prompts", "2",
                 "--new-tokens", "6", "--sources", "lookup,lookahead", "--out", str(out), "--json"])
    assert code == 0
    rows = json.loads((out / "table.json").read_text())
    assert json.loads(capsys.readouterr().out)["rows"] == rows
    assert [(r["link"], r["speculate"]) for r in rows] == [("delay=5ms", s) for s in ("none", "lookup", "lookahead")]
    for row in rows:
        assert row["same_ids"] is True and row["new_tokens"] > 0 and row["round_trips"] > 0
        assert row["bytes_per_token"] > 0 and row["tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0
    assert (out / "chart.png").stat().st_size > 0 and "machine" in json.loads((out / "run.json").read_text())


def test_train_draft_head_smoke(tiny_model_dir, tmp_path, capsys):
    folder = str(tiny_model_dir("llama"))
    out = tmp_path / "head"
    assert main(["zoo", "train", "smollm2-draft", "--model", folder, "--out", str(out), "--prompts", "8",
                 "--new-tokens", "8", "--steps", "5", "--seq-len", "8", "--batch-size", "2", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 5 and (out / "draft_head.safetensors").exists()
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(out / "draft_head.safetensors")).values()} == {torch.float16}
    device = DeviceModel.load(folder)
    prompt = device.encode("The quick brown fox", chat=False)
    plain = device.generate(prompt, max_new_tokens=10, ignore_eos=True)
    eagle = device.generate(prompt, max_new_tokens=10, ignore_eos=True, draft_tokens=3,
                            speculate=make_source("eagle", device, draft_model=str(out)))
    assert eagle.token_ids == plain.token_ids and eagle.drafted > 0
    other = DeviceModel.load(str(tiny_model_dir("llama", num_layers=2, seed=1)))
    with pytest.raises(LambdaSplitError, match="trained for another model"):
        make_source("eagle", other, draft_model=str(out))
