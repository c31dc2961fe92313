"""The body server (cloud side): sessions, per-session KV caches, limits, auth, TLS.

    server.py    the asyncio server: framing, handshake, limits, errors per session
    services.py  what a server hosts: LLM bodies, whole models for cloud mode
    commands.py  `lambdasplit serve`
"""

import importlib

# Imported on first use, so that `lambdasplit --help` and usage errors need neither torch nor transformers.
_EXPORTS = {
    "BodyServer": "lambdasplit.server.server",
    "Limits": "lambdasplit.server.server",
    "BodyService": "lambdasplit.server.services",
    "CloudService": "lambdasplit.server.services",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
