"""Start `lambdasplit gateway` as a real separate process and wait until it listens.

Used by the tests and the screenshot script: the gateway really runs in another process,
behind a real socket, exactly as a user starts it. The process handling is ServerProcess's.
"""

from __future__ import annotations

from lambdasplit.server.process import ServerProcess


class GatewayProcess(ServerProcess):
    """`with GatewayProcess(["--model", m, "--split", "2:28", "--server", a]) as gateway: gateway.url`"""

    command = "gateway"

    @property
    def url(self) -> str | None:
        return self.address  # the gateway prints `listening on http://HOST:PORT`
