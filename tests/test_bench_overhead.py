"""`lambdasplit bench overhead` on a small model built from a config, as the bench builds its wide model.

Speeds are not asserted (they are benchmark output, not test criteria); the row's
structure and its bytes per token (2 x D x 2 for fp16, plus framing) are.
"""

from __future__ import annotations

import pytest

from lambdasplit.bench.overhead import build_wide_model, measure_model


def test_overhead_row_on_a_model_built_from_a_config(tiny_model_dir):
    tokenizer_from = str(tiny_model_dir("llama", num_layers=3, hidden_size=256))
    folder = build_wide_model(hidden_size=256, num_layers=3, tokenizer_from=tokenizer_from)
    assert build_wide_model(hidden_size=256, num_layers=3, tokenizer_from=tokenizer_from) == folder  # cached
    row = measure_model("wide", str(folder), "1:N-1", new_tokens=8, repeats=1, codec="fp16", threads=1)
    assert (row["hidden_size"], row["num_layers"], row["split"]) == (256, 3, "1:2")
    for key in ("local_tps", "inprocess_tps", "loopback_tps"):
        assert row[key] > 0
    assert row["loopback_vs_inprocess"] == pytest.approx(row["loopback_tps"] / row["inprocess_tps"])
    assert row["theory_bytes_per_token"] == 2 * 256 * 2
    assert abs(row["bytes_per_token"] - 1024) <= 0.03 * 1024 + 64


def test_defaults_cover_the_bundled_model_and_a_wide_one_and_name_the_machine(monkeypatch, tmp_path, capsys):
    """`bench overhead` with no options measures zoo:smollm2 and a D = 2048 model, and says where it ran.

    The measurement itself is replaced (the test above runs a real one): this checks what is
    measured by default and what the outputs record about the machine.
    """
    import json

    from lambdasplit.bench import overhead
    from lambdasplit.cli import main
    from lambdasplit.zoo.registry import DEFAULT_LLM

    built, measured = [], []

    def fake_build(hidden_size, num_layers):
        built.append((hidden_size, num_layers))
        return tmp_path / f"wide-{hidden_size}"

    def fake_measure(label, model, split, *, new_tokens, repeats, codec, threads=None, on_step=None):
        measured.append((label, model, split))
        hidden = 2048 if "wide" in model else 576
        return {"model": label, "hidden_size": hidden, "num_layers": 6, "split": "1:5", "codec": codec,
                "local_tps": 10.0, "inprocess_tps": 9.0, "loopback_tps": 8.0, "loopback_vs_inprocess": 8 / 9,
                "loopback_vs_local": 0.8, "overhead_ms_per_token": 13.9, "bytes_per_token": 4 * hidden + 56,
                "theory_bytes_per_token": 4 * hidden, "bytes_vs_theory": 1 + 56 / (4 * hidden)}

    monkeypatch.setattr(overhead, "build_wide_model", fake_build)
    monkeypatch.setattr(overhead, "measure_model", fake_measure)
    out = tmp_path / "out"
    assert main(["bench", "overhead", "--out", str(out)]) == 0
    assert built == [(2048, 6)]
    assert [m[1] for m in measured] == [DEFAULT_LLM, str(tmp_path / "wide-2048")]
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    machine = run["machine"]
    assert {"processor", "cpu_count", "torch", "torch_threads", "load_average"} <= set(machine)
    assert machine["torch_threads"] == 1  # --threads 1, the default
    assert f"machine: {machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}" in printed
    assert "machine: " in (out / "table.md").read_text()
    assert [row["hidden_size"] for row in json.loads((out / "table.json").read_text())] == [576, 2048]
