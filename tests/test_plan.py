"""`lambdasplit plan`: profiles, predictions, the Pareto front, and the measured check.

The CI run: `plan --json` on a tiny model against a real loopback server process it starts
(with an emulated link), then again from the cache. Byte figures are deterministic for
fixed-size codecs, so the predicted bytes per token must match the socket's count; speeds
are noisy on a shared CI machine, so the test checks that they were measured and compared,
and docs/planner.md reports the accuracy on the default model.
"""

from __future__ import annotations

import json

import pytest

from lambdasplit.cli import main
from lambdasplit.plan import pareto
from lambdasplit.plan.commands import parse_size
from lambdasplit.plan.predict import Candidate, interpolate, leakage_from_report
from lambdasplit.plan.profile import codec_names
from lambdasplit.server.process import ServerProcess

LINK = "rate=100mbit,delay=5ms"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_layers=6, hidden_size=64))


@pytest.fixture(scope="module")
def plan_run(model, tmp_path_factory):
    """One full plan (profiles measured, quick audit, four points measured), then a cached one."""
    cache = tmp_path_factory.mktemp("plan-cache")
    out = tmp_path_factory.mktemp("plan-out")
    mp = pytest.MonkeyPatch()
    mp.setenv("LAMBDASPLIT_CACHE", str(cache))
    # One real server process for both runs (plan starts its own without --server; starting one
    # costs seconds on a loaded machine, so the two runs share it).
    server = ServerProcess(["--model", model, "--layers", "1:5", "--layers", "2:4"], env={"OMP_NUM_THREADS": "1"})
    args = ["plan", "--model", model, "--server", server.start().address, "--link", LINK, "--new-tokens", "12",
            "--profile-tokens", "6", "--threads", "1", "--json"]
    try:
        first = _run(args + ["--measure", "3", "--measure-repeats", "2", "--quick-audit", "--out", str(out / "first")])
        second = _run(args + ["--measure", "0", "--out", str(out / "second")])
    finally:
        server.stop()
        mp.undo()
    return first, second, out


def _run(args):
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return json.loads(stdout.getvalue())


def test_plan_json_lists_predicted_and_measured(plan_run):
    plan, _, out = plan_run
    assert json.loads((out / "first" / "plan.json").read_text()) == plan
    assert (out / "first" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Predicted vs measured" in (out / "first" / "table.md").read_text()
    splits, codecs = {"1:5", "2:4"}, set(codec_names())
    sources = {"none", "lookup", "lookahead"}  # no EAGLE head for this model: skipped with a note
    assert {(r["split"], r["codec"], r["speculate"]) for r in plan["candidates"]} == {
        (s, c, p) for s in splits for c in codecs for p in sources}
    assert any("eagle skipped" in note for note in plan["notes"])
    assert plan["recommendation"] in plan["front"]
    # the recommendation and three other front points, measured over the emulated link
    assert len(plan["measured"]) == 4 and plan["measured"][0]["label"] == plan["recommendation"]
    assert len({r["label"] for r in plan["measured"]}) == 4 and all(r["label"] in plan["front"] for r in plan["measured"])
    for row in plan["measured"]:
        predicted, measured, error = row["predicted"], row["measured"], row["error"]
        assert measured["tokens_per_s"] > 0 and measured["ttft_s"] > 0
        assert len(measured["runs_tokens_per_s"]) == 2 and measured["tokens_per_s"] in measured["runs_tokens_per_s"]
        assert error["tokens_per_s"] == pytest.approx(predicted["tokens_per_s"] / measured["tokens_per_s"] - 1)
        # every 2 x 5 ms round trip is paid, so no configuration beats the link's floor
        assert measured["seconds"] >= measured["round_trips"] * 2 * 0.005
        if row["codec"] in ("fp32", "fp16", "bf16") and row["speculate"] == "none":
            assert abs(error["bytes_per_token"]) < 0.01, row  # fixed-size frames: bytes are predicted exactly
        elif row["codec"] == "int8" and row["speculate"] == "none":
            # fixed-size frames too, plus the near-tie guard's REFINEs, predicted from the profile's
            # rate (a few per short run on a random model): one more or fewer moves bytes by ~2%
            assert abs(error["bytes_per_token"]) < 0.05, row
        assert abs(error["device_memory"]) < 0.05, row  # weights + KV, as loaded after the run
    assert plan["max_abs_error_tokens_per_s"] == max(abs(r["error"]["tokens_per_s"]) for r in plan["measured"])
    assert isinstance(plan["recommendation_on_measured_front"], bool)
    by_label = {r["label"]: r for r in plan["candidates"]}
    assert by_label["1:5 fp32"]["agreement"] == 1.0  # lossless: the split equals the unsplit model
    # leakage from the quick audit, per split, in [0, 1]
    assert plan["leakage_source"].startswith("cached audit report")
    assert all(0.0 <= r["leakage"] <= 1.0 and r["leakage_attack"] for r in plan["candidates"])


def test_plan_second_run_reads_the_cache(plan_run):
    first, second, _ = plan_run
    assert second["profiles_from_cache"] == {"device": True, "drafting": True, "server": True}
    assert first["profiles_from_cache"] == {"device": False, "drafting": False, "server": False}
    assert [r["tokens_per_s"] for r in second["candidates"]] == [r["tokens_per_s"] for r in first["candidates"]]
    assert len(second["measured"]) == 1


def test_bad_input_is_one_line(model, tmp_path, capsys):
    assert main(["plan", "--model", model, "--link", "up=fast", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lambdasplit: error: bad rate") and "\n" not in err
    assert main(["plan", "--model", model, "--device-memory", "lots", "--out", str(tmp_path)]) != 0
    assert "bad size" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("300MB") == 300_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("512") == 512


def test_interpolate_is_linear_between_and_beyond_points():
    table = {"1": 1.0, "5": 3.0, "20": 10.0}
    assert interpolate(table, 1) == 1.0
    assert interpolate(table, 3) == pytest.approx(2.0)
    assert interpolate(table, 40) == pytest.approx(10.0 + 20 * 7 / 15)


def _candidate(label, tok_s, nbytes, memory, leak=None, agreement=1.0, codec="fp16"):
    return Candidate(split=label, codec=codec, speculate="none", tokens_per_s=tok_s, bytes_per_token=nbytes,
                     device_memory=memory, leakage=leak, agreement=agreement)


def test_front_and_recommendation_under_constraints():
    fast = _candidate("fast", 10.0, 1000, 300, leak=0.9)
    small = _candidate("small", 5.0, 100, 100, leak=0.2)
    dominated = _candidate("dominated", 4.0, 2000, 400, leak=0.95)
    tied = _candidate("tied", 9.9, 500, 300, leak=0.9)  # within 3% of the fastest, half the bytes
    lossy = _candidate("lossy", 3.0, 50, 100, leak=0.1, agreement=0.5, codec="int8")
    everything = [fast, small, dominated, tied, lossy]
    assert set(c.split for c in pareto.front(everything)) == {"fast", "small", "tied", "lossy"}
    assert pareto.recommend(everything, pareto.Constraints()).split == "tied"  # lossy fails the agreement
    assert pareto.recommend(everything, pareto.Constraints(device_memory=200)).split == "small"
    assert pareto.recommend(everything, pareto.Constraints(max_leak=0.1)) is None
    assert pareto.Constraints(max_leak=0.5).reasons(_candidate("x", 1, 1, 1)) == ["leakage unknown"]
    # measured speeds within the tie count as equal: then fewer bytes dominates
    assert pareto.dominates((1.0, 10, 0, 0), (1.02, 20, 0, 0), speed_tie=0.05)
    assert not pareto.dominates((1.0, 30, 0, 0), (1.02, 20, 0, 0), speed_tie=0.05)


def test_int8_device_weights_are_held_to_the_agreement_like_a_lossy_codec():
    exact = _candidate("a", 5.0, 100, 100, codec="fp32", agreement=None)
    int8 = Candidate(split="b", codec="fp32", speculate="none", tokens_per_s=5.0, bytes_per_token=100,
                     device_memory=30, agreement=0.6, device_weights="int8")
    assert pareto.Constraints().reasons(exact) == [] and pareto.Constraints().reasons(int8) == ["agreement too low"]
    assert pareto.recommend([exact, int8], pareto.Constraints(device_memory=50)) is None
    int8.agreement = 1.0
    assert pareto.recommend([exact, int8], pareto.Constraints(device_memory=50)) is int8
    assert int8.label == "b fp32 int8-weights"


def test_plan_with_int8_device_weights(model, tmp_path, monkeypatch):
    """--device-weights float,int8: the int8 candidates are profiled on their own (memory, speed, agreement
    against the float model) and measured with int8 weights on the device."""
    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path / "cache"))
    server = ServerProcess(["--model", model, "--layers", "1:5"], env={"OMP_NUM_THREADS": "1"})
    try:
        plan = _run(["plan", "--model", model, "--server", server.start().address, "--splits", "1:5",
                     "--codecs", "fp32", "--speculate", "none", "--device-weights", "float,int8", "--new-tokens", "8",
                     "--profile-tokens", "6", "--threads", "1", "--measure", "3", "--min-agreement", "0", "--json",
                     "--out", str(tmp_path / "out")])
    finally:
        server.stop()
    rows = {r["device_weights"]: r for r in plan["candidates"]}
    assert set(rows) == {"float", "int8"} and plan["device_weights"] == ["float", "int8"]
    assert rows["int8"]["device_memory"] < rows["float"]["device_memory"]
    assert rows["int8"]["agreement"] is not None and rows["float"]["agreement"] == 1.0
    assert plan["profiles_from_cache"] == {"device": False, "device|weights=int8": False, "drafting": False,
                                           "server": False, "server|weights=int8": False}
    # int8 holds the least memory, so it is on the front and measured, with int8 weights on the device
    measured = {r["device_weights"]: r for r in plan["measured"]}
    assert "int8" in measured and all(r["measured"]["tokens_per_s"] > 0 for r in measured.values())
    assert measured["int8"]["measured"]["device_memory"] < rows["float"]["device_memory"]
    assert abs(measured["int8"]["error"]["device_memory"]) < 0.05  # predicted from the int8 profile


def test_leakage_from_report(tmp_path):
    rows = [
        {"split": "1:5", "positions": "prompt", "attack": "linear-probe", "defense": "none", "top1": 0.4},
        {"split": "1:5", "positions": "prompt", "attack": "exact-inversion", "defense": "none", "top1": 0.9},
        {"split": "1:5", "positions": "prompt", "attack": "unigram-baseline", "defense": "none", "top1": 0.99},
        {"split": "2:4", "positions": "generated", "attack": "exact-inversion", "defense": "none", "top1": 1.0},
        {"split": "2:4", "positions": "prompt", "attack": "linear-probe", "defense": "none", "top1": 0.3},
        {"split": "2:4", "positions": "prompt", "attack": "linear-probe", "defense": "clip", "top1": 0.0},
    ]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"results": rows}))
    assert leakage_from_report(path) == {"1:5": (0.9, "exact-inversion"), "2:4": (0.3, "linear-probe")}
    assert leakage_from_report(path, "linear-probe")["1:5"] == (0.4, "linear-probe")
    path.write_text("not json")
    with pytest.raises(Exception, match="cannot read the audit report"):
        leakage_from_report(path)
