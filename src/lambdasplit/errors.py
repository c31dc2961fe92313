"""Errors a user can act on. The CLI prints these as one line instead of a traceback.

Each class carries the exit code `lambdasplit` returns for it (README "Exit codes"):

    0  success
    1  a bug: an unexpected exception (the only case that prints a traceback)
    2  a usage or input error, or any other LambdaSplitError (argparse uses 2 as well)
    3  a network failure: the server refused the connection, reset or closed it, timed out, or TLS failed
    4  the server answered with an ERROR frame (it refused the session or a request)
    130  interrupted (Ctrl-C)
"""


class LambdaSplitError(Exception):
    """Base class of every error lambdasplit raises on purpose."""

    exit_code = 2


class UsageError(LambdaSplitError, ValueError):
    """A bad argument value (unknown codec or model name, empty prompt, ...)."""


class UnsupportedModelError(LambdaSplitError):
    """The model family cannot be split with exact results, so it is refused."""


class SplitError(LambdaSplitError):
    """An invalid split X:Y for the model."""


class ProtocolError(LambdaSplitError):
    """A session broke the wire protocol; carries a machine-readable code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NetworkError(LambdaSplitError):
    """Talking to a server failed: refused, reset, closed, timed out, TLS. The message names the server."""

    exit_code = 3


class RemoteError(LambdaSplitError):
    """The server answered a session with an error frame."""

    exit_code = 4

    def __init__(self, code: str, message: str):
        super().__init__(f"server refused ({code}): {message}")
        self.code = code
        self.message = message
