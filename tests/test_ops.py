"""Operations of a real `serve` process: /metrics, /healthz, /readyz and one JSON log line per session.

A `serve --metrics-port 0 --log-format json` process hosts a tiny model's body; a device
generates through it. The scrape (parsed by prometheus_client's own parser) shows every
metric docs/deploy.md lists, and the figures moved by what the session did: the server's
byte counts equal the client transport's, to the byte; the session's positions, steps and
the engine's rows are those of the generation; a refused HELLO counts under its error
code. The session's JSON log line carries the same figures.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.errors import RemoteError
from lambdasplit.server.ops import ServerOps
from lambdasplit.server.process import ServerProcess

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
NEW_TOKENS = 6


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    status, text = get(base + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of a sample over the label values not given."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def documented_metrics(prefix: str = "lambdasplit_") -> list[str]:
    """The metric names docs/deploy.md lists (a table row per metric: | `name` | ...)."""
    return re.findall(rf"^\| `({prefix}[a-z_]+)`", DOCS.read_text(), flags=re.M)


def reference_ids(model: str, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([prompt])
    out = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(model):
    with ServerProcess(["--model", model, "--layers", "1:5", "--metrics-port", "0", "--log-format", "json"]) as s:
        line = next(line for line in s.output if line.startswith("metrics on "))
        s.metrics = line.split("metrics on ", 1)[1].removesuffix("/metrics")
        yield s


def session_lines(server, event: str) -> list[dict]:
    lines = []
    for line in list(server.output):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                lines.append(record)
    return lines


def test_health_and_readiness(server):
    assert get(server.metrics + "/healthz") == (200, "ok\n")
    assert get(server.metrics + "/readyz") == (200, "ready\n")
    assert get(server.metrics + "/nothing")[0] == 404


def test_readyz_says_not_ready_until_the_server_is():
    ops = ServerOps()
    port = ops.serve_http("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{port}"
        assert get(base + "/healthz")[0] == 200 and get(base + "/readyz")[0] == 503
        ops.set_ready()
        assert get(base + "/readyz")[0] == 200
        assert value(scrape(base), "lambdasplit_server_ready") == 1
    finally:
        ops.close()


def test_a_generation_moves_the_documented_metrics(server, model):
    names = documented_metrics("lambdasplit_server_") + documented_metrics("lambdasplit_engine_")
    assert len(names) >= 20, "docs/deploy.md lists the metrics as table rows | `name` | ..."
    exposed = {family.name for family in text_string_to_metric_families(get(server.metrics + "/metrics")[1])}
    assert not [n for n in names if n.removesuffix("_total") not in exposed], "documented but not exposed"
    before = scrape(server.metrics)

    device = DeviceModel.load(model, "1:5")
    prompt = device.encode("the quick brown fox", False)
    with RemoteBody.for_device(device, server.address) as body:
        result = device.generate(prompt, body=body, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        live = scrape(server.metrics)
        assert value(live, "lambdasplit_server_sessions") == 1
        assert value(live, "lambdasplit_server_kv_reserved_bytes") > 0 and value(
            live, "lambdasplit_server_kv_used_bytes") > 0
    sent, received = body.bytes_up, body.bytes_down
    assert result.token_ids == reference_ids(model, prompt, NEW_TOKENS)  # exact: the unsplit model's greedy ids

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server ends the session once it reads CLOSE
        after = scrape(server.metrics)
        if value(after, "lambdasplit_server_sessions_ended_total") > value(before,
                                                                          "lambdasplit_server_sessions_ended_total"):
            break
        time.sleep(0.05)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    positions = len(prompt) + NEW_TOKENS - 1  # the last token is sampled, never sent
    assert moved("lambdasplit_server_sessions_started_total") == 1
    assert moved("lambdasplit_server_sessions_ended_total", outcome="ok") == 1
    assert moved("lambdasplit_server_bytes_in_total") == sent  # HELLO, STEPs and CLOSE, headers included
    assert moved("lambdasplit_server_bytes_out_total") == received  # WELCOME and RESULTs
    assert moved("lambdasplit_server_steps_total") == NEW_TOKENS  # one prefill, then a step per token
    assert moved("lambdasplit_server_tokens_total") == positions
    assert moved("lambdasplit_server_session_seconds_count") == 1
    assert moved("lambdasplit_engine_positions_total") == positions
    assert moved("lambdasplit_engine_rows_total") >= NEW_TOKENS
    assert moved("lambdasplit_engine_batch_rows_count") >= 1
    assert moved("lambdasplit_engine_step_seconds_count") >= NEW_TOKENS
    assert value(after, "lambdasplit_server_sessions") == 0
    services = {dict(ls).get("service") for n, ls in after if n == "lambdasplit_engine_rows_total"}
    assert services == {next(iter({dict(ls)["service"] for n, ls in after
                                   if n == "lambdasplit_server_sessions_started_total"}))}

    end = session_lines(server, "session_end")[-1]
    assert end["positions"] == positions and end["steps"] == NEW_TOKENS
    assert end["bytes_in"] == sent and end["bytes_out"] == received
    assert end["error"] is None and end["outcome"] == "ok" and end["client"] == "loopback"
    assert end["seconds"] > 0 and "layers 1:5" in end["service"] and end["level"] == "info"
    assert any(s["session"] == end["session"] for s in session_lines(server, "session_start"))


def test_refusals_count_by_error_code(server, model):
    before = scrape(server.metrics)
    device = DeviceModel.load(model, "2:4")  # this server hosts 1:5 only
    with pytest.raises(RemoteError, match="wrong_split"):
        RemoteBody.for_device(device, server.address)
    after = scrape(server.metrics)
    assert value(after, "lambdasplit_server_errors_total", code="wrong_split") - value(
        before, "lambdasplit_server_errors_total", code="wrong_split") == 1
    assert value(after, "lambdasplit_server_sessions_started_total") == value(
        before, "lambdasplit_server_sessions_started_total")  # refused at HELLO: never a session
