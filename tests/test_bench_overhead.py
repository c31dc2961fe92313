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
