"""`serve --ray`: two body replicas (Ray actors on a local cluster the command starts) behind one router.

Sessions are placed on the least-loaded replica (two open sessions: one on each, as the
router's metrics show) and give the unsplit model's greedy ids. Then one replica's worker
is killed with SIGKILL in the middle of a generation: that session's connection drops,
the client reconnects to the same endpoint and replays the generation on the survivor
(the failover the client does), to the same ids; the router marks the dead replica down
and every new session goes to the survivor. One cluster for the module, bounded by the
startup of Ray and of two replicas (about a minute on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.errors import NetworkError
from lambdasplit.server.process import ServerProcess
from test_ops import documented_metrics, get, reference_ids, scrape, value

pytest.importorskip("ray")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def cluster(model):
    args = ["--model", model, "--layers", "1:5", "--ray", "--replicas", "2", "--ray-num-cpus", "2",
            "--metrics-port", "0", "--health-interval", "0.5"]
    with ServerProcess(args, timeout=300, env={"RAY_USAGE_STATS_ENABLED": "0"}) as server:
        server.pids = {}
        for line in server.output:
            found = re.search(r"replica (\d+): pid (\d+) at", line)
            if found:
                server.pids[found[1]] = int(found[2])
            if line.startswith("metrics on "):
                server.metrics = line.split("metrics on ", 1)[1].removesuffix("/metrics")
        assert len(server.pids) == 2, "\n".join(server.output)
        yield server


@pytest.fixture(scope="module")
def device(model):
    return DeviceModel.load(model, "1:5")


def sessions_by_replica(cluster) -> dict[str, float]:
    samples = scrape(cluster.metrics)
    return {dict(ls)["replica"]: v for (n, ls), v in samples.items() if n == "lambdasplit_router_sessions"}


def generate(device, body, prompt, **options):
    return device.generate(prompt, body=body, max_new_tokens=NEW_TOKENS, ignore_eos=True, **options).token_ids


def test_router_metrics_are_the_documented_ones(cluster):
    exposed = {family.name for family in text_string_to_metric_families(get(cluster.metrics + "/metrics")[1])}
    names = documented_metrics("lambdasplit_router_")
    assert len(names) >= 6 and not [n for n in names if n.removesuffix("_total") not in exposed]
    assert get(cluster.metrics + "/readyz")[0] == 200


def test_sessions_spread_then_fail_over_to_the_survivor(cluster, model, device):
    prompts = [device.encode(text, False) for text in ("the quick brown fox", "a lazy dog sleeps")]
    expected = [reference_ids(model, p, NEW_TOKENS) for p in prompts]

    # Two open sessions: the least-loaded placement puts one on each replica.
    with RemoteBody.for_device(device, cluster.address) as first:
        assert sorted(sessions_by_replica(cluster).values()) == [0, 1]
        with RemoteBody.for_device(device, cluster.address) as second:
            assert sessions_by_replica(cluster) == {"0": 1, "1": 1}
            assert generate(device, first, prompts[0]) == expected[0]
            assert generate(device, second, prompts[1]) == expected[1]

    # A session in the middle of its generation loses its replica (SIGKILL of the actor's worker).
    body = RemoteBody.for_device(device, cluster.address)
    victim = next(name for name, n in sessions_by_replica(cluster).items() if n == 1)
    survivor = "1" if victim == "0" else "0"

    def kill_after_two(token):
        if kill_after_two.seen == 2:
            os.kill(cluster.pids[victim], signal.SIGKILL)
        kill_after_two.seen += 1

    kill_after_two.seen = 0
    with pytest.raises(NetworkError):
        generate(device, body, prompts[0], on_token=kill_after_two)
    body.close(send=False)

    # Failover by replay: a new connection to the same endpoint, the whole generation again.
    placed_before = scrape(cluster.metrics)
    for prompt, ids in zip(prompts, expected):
        with RemoteBody.for_device(device, cluster.address) as replayed:
            assert sessions_by_replica(cluster)[survivor] == 1
            assert generate(device, replayed, prompt) == ids
    deadline = time.monotonic() + 10
    while value(scrape(cluster.metrics), "lambdasplit_router_replica_up", replica=victim) != 0:
        assert time.monotonic() < deadline, "the router never noticed the dead replica"
        time.sleep(0.2)

    # Every new session goes to the survivor; the dead replica gets none.
    with RemoteBody.for_device(device, cluster.address), RemoteBody.for_device(device, cluster.address):
        assert sessions_by_replica(cluster) == {victim: 0, survivor: 2}
    after = scrape(cluster.metrics)
    placed = "lambdasplit_router_sessions_placed_total"
    assert value(after, placed, replica=victim) == value(placed_before, placed, replica=victim)
    assert value(after, placed, replica=survivor) - value(placed_before, placed, replica=survivor) == 4
    assert value(after, "lambdasplit_router_replicas_alive") == 1
    assert value(after, "lambdasplit_router_bytes_in_total") > 0 and value(after, "lambdasplit_router_bytes_out_total") > 0
    assert cluster.process.poll() is None  # the endpoint stays up


def test_stopping_the_command_shuts_its_ray_cluster_down(cluster):
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(60) == 0
    text = "\n".join(cluster.output)
    assert "Traceback" not in text and "SIGTERM received" not in text
