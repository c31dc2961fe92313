"""The body server (cloud side): sessions, per-session KV caches, limits, auth, TLS.

    server.py    the asyncio server: framing, handshake, limits, errors per session
    services.py  what a server hosts: LLM bodies, whole models for cloud mode
    commands.py  `lambdasplit serve`
"""

from lambdasplit.server.server import BodyServer, Limits
from lambdasplit.server.services import BodyService, CloudService

__all__ = ["BodyServer", "Limits", "BodyService", "CloudService"]
