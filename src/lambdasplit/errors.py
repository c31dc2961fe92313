"""Errors a user can act on. The CLI prints these as one line instead of a traceback."""


class LambdaSplitError(Exception):
    """Base class of every error lambdasplit raises on purpose."""


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


class RemoteError(LambdaSplitError):
    """The server answered a session with an error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server refused ({code}): {message}")
        self.code = code
        self.message = message
