"""Start `lambdasplit serve` as a real separate process and wait until it listens.

Used by the demo, the benchmarks and the CLI tests: the body really runs in another
process, behind a real socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

from lambdasplit.errors import LambdaSplitError


class ServerProcess:
    """`with ServerProcess(["--model", m, "--layers", "2:28"]) as server: server.address`"""

    command = "serve"  # the `lambdasplit` sub-command this class starts (GatewayProcess: "gateway")

    def __init__(self, serve_args: list[str], *, timeout: float = 300.0, env: dict | None = None):
        self.args = [sys.executable, "-m", "lambdasplit", self.command, "--port", "0", *serve_args]
        self.timeout = timeout
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.address: str | None = None
        self.output: deque[str] = deque(maxlen=200)

    def start(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env, bufsize=1)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line.rstrip())
            if line.startswith("listening on "):
                self.address = line.split("listening on ", 1)[1].strip()
                # Keep draining its output so the server never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.stop()
        raise LambdaSplitError(f"the {self.command} process did not start:\n" + "\n".join(self.output))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.rstrip())

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
