"""`lambdasplit bench serve` at a tiny size: the command runs, writes its outputs, and its
rows say the batched sessions got their solo logits and ids."""

from __future__ import annotations

import json

from lambdasplit.cli import main


def test_bench_serve_writes_table_and_chart(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen2")
    out = tmp_path / "serve"
    code = main(["bench", "serve", "--model", str(folder), "--split", "1:5", "--clients", "1,3",
                 "--new-tokens", "3", "--prefill-chunk", "16", "--unbatched", "--breakdown", "--out", str(out), "--json"])
    assert code == 0
    rows = json.loads((out / "table.json").read_text())
    assert [(r["clients"], r["max_batch"]) for r in rows] == [(1, 16), (3, 16), (1, 1), (3, 1)]
    for row in rows:
        assert row["ids_equal"] and row["max_logit_diff"] < 1e-4 and row["decode_tokens_per_s"] > 0
        assert row["tokens_per_s"] > 0 and row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    assert rows[0]["mean_batch"] == 1.0 and rows[0]["speedup"] == 1.0
    # Three ~60-position prompts take several 16-position chunks each: sessions share forwards.
    assert rows[1]["mean_batch"] > 1.0 and rows[3]["mean_batch"] == 1.0
    run = json.loads((out / "run.json").read_text())
    assert run["machine"]["cpu_count"] and run["command"].startswith("lambdasplit")
    assert (out / "chart.png").stat().st_size > 0 and (out / "table.md").read_text().startswith("# Serving")
    breakdown = json.loads((out / "breakdown.json").read_text())
    assert [b["rows"] for b in breakdown] == [1, 3]
    assert all(b["linear_ms"] > 0 and b["attention_ms"] > 0 and b["wall_ms"] > 0 for b in breakdown)
