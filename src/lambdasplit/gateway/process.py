"""Start `lambdasplit gateway` as a real separate process and wait until it listens.

Used by the tests and the screenshot script: the gateway really runs in another process,
behind a real socket, exactly as a user starts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

from lambdasplit.errors import LambdaSplitError


class GatewayProcess:
    """`with GatewayProcess(["--model", m, "--split", "2:28", "--server", a]) as gateway: gateway.url`"""

    def __init__(self, gateway_args: list[str], *, timeout: float = 300.0, env: dict | None = None):
        self.args = [sys.executable, "-m", "lambdasplit", "gateway", "--port", "0", *gateway_args]
        self.timeout = timeout
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: deque[str] = deque(maxlen=200)

    def start(self) -> "GatewayProcess":
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env, bufsize=1)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line.rstrip())
            if line.startswith("listening on "):
                self.url = line.split("listening on ", 1)[1].strip()
                threading.Thread(target=self._drain, daemon=True).start()  # never block on a full pipe
                return self
        self.stop()
        raise LambdaSplitError("the gateway process did not start:\n" + "\n".join(self.output))

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

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
