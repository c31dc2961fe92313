"""The stumbles a new user hit on a fresh clone (issue 13, item 4), each kept fixed by a test.

README activation of .venv is shown in the README itself; `serve` on a busy port is tested in
tests/test_hardening.py, usage errors without torch in tests/test_usage_errors.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from lambdasplit.errors import LambdaSplitError


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lambdasplit", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_building_the_parser_imports_neither_transformers_nor_diffusers():
    # torch too: tests/test_usage_errors.py
    code = ("import sys; from lambdasplit.cli import build_parser; build_parser(); "
            "print([m for m in ('transformers', 'diffusers', 'sklearn', 'lambdasplit.client.device') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_usage_error_is_one_line_before_any_model_loads():
    result = run_cli("gateway", "--mode", "split", "--server", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lambdasplit: error: gateway --mode split needs --split X:Y (the layers the body server hosts)"]


def test_help_shows_the_defaults():
    from lambdasplit.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    generate = commands["generate"].format_help()
    assert "(default: fp32)" in " ".join(generate.split())  # the wire codec
    assert "(default: 64)" in generate  # --max-new-tokens
    imagine = " ".join(commands["imagine"].format_help().split())
    assert "(default: 42)" in imagine  # --seed
    audit = commands["audit"]._subparsers._group_actions[0].choices["llm"].format_help()
    assert "minutes" in audit and "(default: 1,2,4,8)" in audit
    assert commands["gateway"].format_help().count("(default") >= 5


def test_a_missing_local_folder_says_so():
    from lambdasplit.llm.checkpoint import Checkpoint

    with pytest.raises(LambdaSplitError, match=r"^the local folder './no-such-folder' does not exist$"):
        Checkpoint("./no-such-folder")


def test_a_diffusion_model_given_to_generate_points_to_imagine(digits_path):
    from lambdasplit.llm.checkpoint import Checkpoint

    with pytest.raises(LambdaSplitError, match="use `lambdasplit imagine --model"):
        Checkpoint(str(digits_path))


def test_zoo_list_names_every_model_zoo_name():
    from lambdasplit.zoo.registry import ZOO, describe

    assert [describe(name)["name"] for name in ZOO] == [f"zoo:{name}" for name in ZOO]


def test_a_codec_that_changes_the_output_is_named_in_the_help_and_warned_about(capsys, monkeypatch):
    from lambdasplit.cli import build_parser, main
    from lambdasplit.client import commands

    assert commands.lossy_codec_warning("fp32", "float32") is None
    assert commands.lossy_codec_warning("bf16", "bfloat16") is None and commands.lossy_codec_warning("fp16", "float16") is None
    for codec, dtype in (("int4", "float32"), ("int2", "float32"), ("int8", "float32"), ("fp16", "float32")):
        assert "can differ from the unsplit model's" in commands.lossy_codec_warning(codec, dtype)
    generate_help = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert "int2" in generate_help and "change the output" in generate_help
    monkeypatch.setattr(commands, "run_generation", lambda **options: {  # what it prints, not the generation
        "mode": options["mode"], "new_tokens": 0, "seconds": 0.0, "bytes_up": 0, "bytes_down": 0, "round_trips": 0})
    capsys.readouterr()
    assert main(["generate", "--prompt", "x", "--split", "2:28", "--server", "127.0.0.1:1", "--codec", "int4"]) == 0
    assert "warning: --codec int4 rounds the hidden states on the wire to 4 bits" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--split", "2:28", "--server", "127.0.0.1:1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_package_metadata_gives_no_setuptools_license_deprecation_warning():
    """setuptools >= 77 warns (once per build step: three times in `make demo`) about a `license`
    table or `License ::` classifiers; an SPDX expression string is what it asks for."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str) and project["license"] == "Apache-2.0"
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]


def test_round_trips_are_counted_in_english():
    from lambdasplit.client.commands import plural

    assert plural(1, "round trip") == "1 round trip" and plural(2, "round trip") == "2 round trips"


def test_imagine_summary_is_one_line_when_piped(tmp_path, capsys):
    from lambdasplit.cli import main
    from lambdasplit.diffusion.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path / "a-folder-with-a-long-name-so-that-the-summary-passes-80-columns", "sd")
    out = tmp_path / "image.png"
    capsys.readouterr()
    assert main(["imagine", "--model", str(folder), "--mode", "local", "--prompt", "a red cat", "--steps", "1",
                 "--out", str(out)]) == 0
    summary = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # stderr is a pipe here
    assert len(summary) == 1 and summary[0].startswith(f"wrote {out}") and summary[0].endswith(")")
    assert len(summary[0]) > 80


# ---------------------------------------------------------------- the bundled model's conversion stamp


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file; the conversion is replaced by writing a config (nothing is dequantized)."""
    from lambdasplit.zoo import smollm2

    gguf = tmp_path / "site-a" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(os.urandom(4096))
    conversions = []

    def convert(source, out):
        conversions.append(source)
        (out / "config.json").write_text("{}")
        return 0.0

    monkeypatch.setattr(smollm2, "_convert", convert)
    monkeypatch.setattr(smollm2, "locate_gguf", lambda: gguf)
    return gguf, conversions


def test_the_same_gguf_installed_elsewhere_shares_the_conversion(fake_gguf, tmp_path, monkeypatch):
    from lambdasplit.zoo import smollm2

    gguf, conversions = fake_gguf
    cache = tmp_path / "cache"
    folder = smollm2.ensure_folder(cache)
    assert conversions == [gguf]
    # another checkout (or a reinstall): the same content at another path, installed later
    other = tmp_path / "site-b" / smollm2.GGUF_NAME
    other.parent.mkdir()
    shutil.copyfile(gguf, other)
    os.utime(other, (time.time() + 3600, time.time() + 3600))
    monkeypatch.setattr(smollm2, "locate_gguf", lambda: other)
    assert smollm2.ensure_folder(cache) == folder
    assert conversions == [gguf]  # not converted again, not deleted
    marker = json.loads((folder / smollm2.MARKER).read_text())
    assert {v["path"] for v in marker["verified"]} == {str(gguf), str(other)}
    # different content is a different model: converted again
    other.write_bytes(os.urandom(4096))
    smollm2.ensure_folder(cache)
    assert conversions == [gguf, other]


def test_waiting_for_the_conversion_lock_says_what_for(fake_gguf, tmp_path, capfd):
    from filelock import FileLock

    from lambdasplit.zoo import smollm2

    cache = tmp_path / "cache"
    cache.mkdir()
    lock = FileLock(cache / f"{smollm2.FOLDER_NAME}.lock")
    lock.acquire()
    waiter = threading.Thread(target=smollm2.ensure_folder, args=(cache,))
    waiter.start()
    deadline = time.monotonic() + 30
    while "waiting for another process" not in capfd.readouterr().err:  # noqa: ASYNC110
        assert time.monotonic() < deadline, "no message while waiting on the lock"
        time.sleep(0.05)
    lock.release()
    waiter.join(30)
    assert (cache / smollm2.FOLDER_NAME / smollm2.MARKER).exists()


def test_waiting_for_the_digits_build_lock_says_what_for(tmp_path, monkeypatch, capfd):
    import fcntl

    from lambdasplit.zoo import digits

    def assemble(parts, dest):  # stands for the real assembly (diffusers, 90 MB of links)
        dest.mkdir()
        (dest / digits.STAMP).write_text(digits._stamp(parts) + "\n")
        return dest

    monkeypatch.setattr(digits, "assemble", assemble)
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / ".digits.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder holds it
        waiter = threading.Thread(target=digits.ensure_folder, args=(cache,))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for another process to finish assembling the bundled digits model" \
                not in capfd.readouterr().err:  # noqa: ASYNC110
            assert time.monotonic() < deadline, "no message while waiting on the lock"
            time.sleep(0.05)
        assert waiter.is_alive()
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(30)
    assert (cache / "digits" / digits.STAMP).exists()
    capfd.readouterr()
    digits.ensure_folder(cache)  # built: no lock, no message
    assert capfd.readouterr().err == ""


def test_gateway_refuses_a_busy_port_and_a_public_address_in_one_line_before_loading(capsys, monkeypatch):
    import socket

    from lambdasplit.cli import main
    from lambdasplit.gateway import engines

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(engines.TextEngine, "__init__", no_loading)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["gateway", "--split", "2:28", "--server", "127.0.0.1:1", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lambdasplit: error: cannot listen on 127.0.0.1:{port}")
    assert main(["gateway", "--split", "2:28", "--server", "127.0.0.1:1", "--host", "0.0.0.0"]) == 2
    assert "--insecure" in capsys.readouterr().err


# ---------------------------------------------------------------- a streamed request abandoned early


def test_a_stream_abandoned_before_its_first_chunk_closes_its_body_session(tiny_model_dir):
    """The client of a streamed chat request is gone before the response starts (its disconnect
    arrives while the gateway's first send is still under way): the body session opened for it is
    closed at once, not left open on the body server until its idle timeout. The gateway app is
    driven through ASGI directly, so the disconnect arrives at exactly that point every time."""
    import asyncio

    from lambdasplit.gateway.app import create_app
    from lambdasplit.gateway.engines import TextEngine
    from lambdasplit.server import BodyServer, BodyService, Limits

    model = str(tiny_model_dir("llama", num_layers=4))  # the model of tests/gateway_stack.py
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": True,
                       "max_tokens": 8}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def abandoned_request(app) -> list[str]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message):  # a slow network: the disconnect is seen while this waits
            sent.append(message["type"])
            await asyncio.sleep(0.5)

        await app(scope, receive, send)
        return sent

    # a real body server on loopback, in this process so the test can see its sessions
    with BodyServer([BodyService(model, "1:3")], limits=Limits(idle_timeout=120)) as server:
        app = create_app(TextEngine(model, mode="split", servers=[server.address], split="1:3"))
        for _ in range(2):
            sent = asyncio.run(abandoned_request(app))
            assert sent[:1] == ["http.response.start"]  # the stream was answered, then abandoned
            assert _wait(lambda: not server.clients, 10), "the abandoned request's body session is still open"


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
