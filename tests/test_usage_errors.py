"""Usage errors answer at once, before torch loads (issue 13, item 4), and the client commands take
their bearer token from a file (issue 10, defect 9).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Every sub-command (nested ones too) with an argument it rejects, and the errors a command
# finds itself before loading anything.
USAGE_ERRORS = [
    ["generate", "--bad-flag"], ["demo", "--bad-flag"], ["serve", "--bad-flag"], ["imagine", "--bad-flag"],
    ["gateway", "--bad-flag"], ["check", "--bad-flag"],
    ["zoo", "list", "--bad-flag"], ["zoo", "eval", "--bad-flag"], ["zoo", "train", "--bad-flag"],
    ["audit", "llm", "--bad-flag"], ["audit", "diffusion", "--bad-flag"],
    ["bench", "llm", "--bad-flag"], ["bench", "overhead", "--bad-flag"], ["bench", "serve", "--bad-flag"],
    ["bench", "diffusion", "--bad-flag"], ["bench", "wan", "--bad-flag"],
    ["serve", "--max-sessions", "many"], ["generate", "--prompt", "x", "--mode", "nowhere"],
    ["serve", "--tls-cert", "cert.pem"],  # needs --tls-key: found by serve itself, before the model
    ["gateway", "--mode", "split", "--server", "127.0.0.1:1"],  # needs --split
    ["generate", "--prompt", "x", "--token-file", "/no/such/token-file"],
]

# Runs every usage error above in one interpreter and reports, per command line, its exit code
# and whether torch (or transformers, diffusers) had been imported by then.
PROBE = r"""
import json, sys
from lambdasplit.cli import main
report = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    report.append([argv, code, [m for m in ("torch", "transformers", "diffusers") if m in sys.modules]])
print(json.dumps(report))
"""


def probe(usage_errors: list[list[str]]) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(usage_errors)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


def test_every_usage_error_exits_2_without_importing_torch():
    report = probe(USAGE_ERRORS)
    assert [argv for argv, code, _ in report if code != 2] == []
    assert [(argv, heavy) for argv, _, heavy in report if heavy] == []


def test_bench_ppidm_usage_error_without_importing_torch():
    [(argv, code, heavy)] = probe([["bench", "ppidm", "--bad-flag"]])
    assert code == 2 and heavy == []


def test_serve_limit_options_default_to_the_servers_limits():
    from lambdasplit.cli import build_parser
    from lambdasplit.server.commands import limits_from_args
    from lambdasplit.server.server import Limits

    parser = build_parser()
    assert limits_from_args(parser.parse_args(["serve"])) == Limits()
    given = limits_from_args(parser.parse_args(["serve", "--max-sessions", "3", "--max-kv-mb", "1.5"]))
    assert (given.max_sessions, given.max_kv_mb, given.idle_timeout) == (3, 1.5, Limits().idle_timeout)
    help_text = " ".join(parser._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert f"(default: {Limits().max_sessions})" in help_text


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["imagine", "--prompt", "x"], ["gateway"]])
def test_client_commands_read_the_token_from_a_file_and_warn_about_one_on_the_command_line(
        command, tmp_path, monkeypatch, capsys):
    from lambdasplit.cli import build_parser

    monkeypatch.delenv("LAMBDASPLIT_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("from-a-file\nignored second line\n")
    assert build_parser().parse_args([*command, "--token-file", str(path)]).token == "from-a-file"
    assert build_parser().parse_args(command).token is None
    assert "warning" not in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--token", "typed"]).token == "typed"
    assert "warning: --token is visible to every local user" in capsys.readouterr().err
    monkeypatch.setenv("LAMBDASPLIT_TOKEN", "from-the-environment")
    assert build_parser().parse_args(command).token == "from-the-environment"
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([*command, "--token-file", str(tmp_path / "empty")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"lambdasplit: error: --token-file {tmp_path}/empty is empty"]
