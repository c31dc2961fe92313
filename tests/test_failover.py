"""Failover by replay, over the CLI with real server processes; --verify against a tampered server.

`generate --server A,B` while A is killed (SIGKILL) or stopped (SIGSTOP, the --timeout
path) mid-generation: B takes over by one replay STEP of everything sent so far, and the
output equals an uninterrupted run's; the JSON record names both servers and one
failover. The replay re-sends the history, so the payload exceeds the uninterrupted one:
proof that the failover happened mid-generation, not before it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from lambdasplit.client.generation import Sampling
from lambdasplit.client.run import run_generation
from lambdasplit.errors import NetworkError, RemoteError
from lambdasplit.server import BodyServer, BodyService
from lambdasplit.server.process import ServerProcess

SPLIT = "2:4"
NEW_TOKENS = 40
# 15 ms each way per frame: a generation takes about a second and a half, long enough to interrupt.
LINK = "delay=15ms"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def generate_command(model, servers, *extra):
    return [sys.executable, "-m", "lambdasplit", "generate", "--model", model, "--split", SPLIT, "--server",
            ",".join(servers), "--prompt", "the quick brown fox", "--max-new-tokens", str(NEW_TOKENS),
            "--ignore-eos", "--temperature", "0.8", "--seed", "3", "--link", LINK, "--json", *extra]


def established(port: int) -> bool:
    """Whether some TCP connection to `port` on this machine is established (/proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                next(file)
                for line in file:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        return True
        except FileNotFoundError:
            continue
    return False


@pytest.fixture(scope="module")
def backup(model):
    with ServerProcess(["--model", model, "--layers", SPLIT]) as server:
        yield server


@pytest.fixture(scope="module")
def uninterrupted(model, backup):
    out = subprocess.run(generate_command(model, [backup.address]), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["failovers"] == 0 and record["servers"] == [backup.address]
    return record


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_server_lost_mid_generation_is_replaced_with_identical_output(how, model, backup, uninterrupted):
    first = ServerProcess(["--model", model, "--layers", SPLIT]).start()
    port = int(first.address.rsplit(":", 1)[1])
    extra = ["--timeout", "3"] if how == "stop" else []
    client = subprocess.Popen(generate_command(model, [first.address, backup.address], *extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not established(port) and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.02)
        time.sleep(0.4)  # some steps into the generation
        assert client.poll() is None, "the generation ended before the server could be interrupted"
        first.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        stdout, stderr = client.communicate(timeout=300)
    finally:
        client.kill()
        first.process.kill()  # a stopped process dies of SIGKILL too
        first.process.wait(30)
    assert client.returncode == 0, stderr
    record = json.loads(stdout)
    assert record["token_ids"] == uninterrupted["token_ids"] and record["text"] == uninterrupted["text"]
    assert record["failovers"] == 1 and record["servers"] == [first.address, backup.address]
    assert record["payload_bytes"] > uninterrupted["payload_bytes"], "the failover replayed nothing"


def test_failover_skips_dead_servers_and_a_lone_dead_server_is_one_line(model, backup, uninterrupted):
    dead = "127.0.0.1:9"  # the discard port: nothing listens there
    out = subprocess.run(generate_command(model, [dead, backup.address]), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["token_ids"] == uninterrupted["token_ids"]
    assert record["failovers"] == 1 and record["servers"] == [backup.address]
    out = subprocess.run(generate_command(model, [dead, dead]), capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 3 and len(lines) == 1 and "no body server left" in lines[0] and dead in lines[0], lines


def test_verify_passes_honest_servers_and_names_both_on_a_mismatch(model):
    honest, twin, tampered = (BodyService(model, SPLIT) for _ in range(3))
    with torch.no_grad():  # a server that computes something slightly different
        next(tampered.body.stack.layers[0].parameters()).add_(1e-2)
    common = dict(model=model, mode="split", split=SPLIT, prompt="the quick brown fox", max_new_tokens=6,
                  sampling=Sampling(), ignore_eos=True)
    with BodyServer([honest]) as a, BodyServer([twin]) as b, BodyServer([tampered]) as c:
        alone = run_generation(server=a.address, **common)
        record = run_generation(server=f"{a.address},{b.address}", verify=True, **common)
        assert record["token_ids"] == alone["token_ids"] and record["verified_by"] == [a.address, b.address]
        assert record["verify_max_difference"] <= record["verify_tolerance"] == 1e-4
        assert record["bytes_up"] > 2 * record["payload_bytes"] - 1  # every step went up twice
        with pytest.raises(RemoteError, match="verify_mismatch") as error:
            run_generation(server=f"{a.address},{c.address}", verify=True, **common)
        assert a.address in str(error.value) and c.address in str(error.value)
        assert "\n" not in str(error.value)


class RendezvousService(BodyService):
    """A real body service whose every STEP, once received, waits for the other server's STEP.

    Two of them share a barrier: a step proceeds only when both servers hold it, so a client
    that waits for one answer before sending to the other server never gets one (the barrier
    times out and the server answers internal_error). Not a timing assertion: a deadlock.
    """

    def __init__(self, model, layers, barrier: threading.Barrier):
        super().__init__(model, layers)
        self.barrier, self.met = barrier, 0

    def open(self, hello, limits):
        session = super().open(hello, limits)
        decode = session.decode

        def decode_when_both_hold_the_step(body, header):
            self.barrier.wait()  # in the server's worker thread: its event loop keeps serving
            self.met += 1
            return decode(body, header)

        session.decode = decode_when_both_hold_the_step
        return session


def test_verify_has_the_step_in_flight_on_both_servers_at_once(model):
    barrier = threading.Barrier(2, timeout=30)
    a_service, b_service = RendezvousService(model, SPLIT, barrier), RendezvousService(model, SPLIT, barrier)
    with BodyServer([a_service]) as a, BodyServer([b_service]) as b:
        record = run_generation(server=f"{a.address},{b.address}", verify=True, model=model, mode="split",
                                split=SPLIT, prompt="the quick brown fox", max_new_tokens=4, sampling=Sampling(),
                                ignore_eos=True)
    assert record["verified_by"] == [a.address, b.address] and len(record["token_ids"]) == 4
    assert a_service.met == b_service.met == record["round_trips"] == 4  # the prompt's step and three decodes


def test_verify_names_a_server_that_is_down_or_dies_mid_generation(model, backup):
    common = dict(model=model, mode="split", split=SPLIT, prompt="the quick brown fox", max_new_tokens=NEW_TOKENS,
                  sampling=Sampling(), ignore_eos=True)
    dead = "127.0.0.1:9"  # the discard port: nothing listens there
    with pytest.raises(NetworkError) as error:
        run_generation(server=f"{backup.address},{dead}", verify=True, **common)
    assert dead in str(error.value) and "\n" not in str(error.value)
    with ServerProcess(["--model", model, "--layers", SPLIT]) as victim:
        pieces = []

        def kill_mid_generation(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait(30)

        with pytest.raises(NetworkError) as error:
            run_generation(server=f"{victim.address},{backup.address}", verify=True, on_text=kill_mid_generation,
                           **common)
    message = str(error.value)
    assert victim.address in message and backup.address not in message and "\n" not in message, message
    assert len(pieces) >= 3, "the server died before the generation started"
