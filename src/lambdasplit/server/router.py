"""One endpoint in front of several body servers (replicas): an asyncio TCP proxy.

A connection is a session, so a connection is proxied to one replica for its whole life
(hard affinity: the KV cache lives there). A new connection goes to the live replica
with the fewest open connections (ties: the one that got a connection least recently).
A replica that refuses a connection, or that its health check (`check`) reports gone,
is dead: no new sessions go to it; its open connections drop when it does and the
client's failover replays the session on a new connection (so on a live replica).
Bytes pass through untouched: TLS and the bearer token are the replicas' business.
With no live replica left, a new connection gets a protocol ERROR frame `server_busy`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from lambdasplit.wire.frames import error_frame

log = logging.getLogger("lambdasplit.router")
_CHUNK = 1 << 16


@dataclass
class Replica:
    name: str
    host: str
    port: int
    info: dict = field(default_factory=dict)  # pid, node, metrics address ... (shown in /replicas)
    alive: bool = True
    live: int = 0  # connections proxied to it now
    last_placed: int = 0  # order of its last placement (ties go to the longest unused)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Router:
    def __init__(self, replicas: list[Replica], *, connect_timeout: float = 5.0):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = replicas
        self.connect_timeout = connect_timeout
        self.lock = threading.Lock()  # placement and health checks run on different threads
        self._order = itertools.count(1)
        self.registry = CollectorRegistry()
        r = self.registry
        self.placed = Counter("lambdasplit_router_sessions_placed", "connections placed, by replica", ["replica"],
                              registry=r)
        self.refused = Counter("lambdasplit_router_refused", "connections refused: no live replica", registry=r)
        self.bytes_up = Counter("lambdasplit_router_bytes_in", "bytes from clients to replicas", registry=r)
        self.bytes_down = Counter("lambdasplit_router_bytes_out", "bytes from replicas to clients", registry=r)
        r.register(_ReplicaCollector(self))
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None

    # ------------------------------------------------------------ placement and health
    def pick(self, exclude=()) -> Replica | None:
        """The live replica for a new session: fewest open connections, then least recently placed."""
        with self.lock:
            candidates = [r for r in self.replicas if r.alive and r.name not in exclude]
            if not candidates:
                return None
            best = min(candidates, key=lambda r: (r.live, r.last_placed))
            best.live += 1
            best.last_placed = next(self._order)
            return best

    def mark_dead(self, replica: Replica, reason: str) -> None:
        with self.lock:
            if not replica.alive:
                return
            replica.alive = False
        log.warning("replica %s at %s is dead (%s): new sessions go to the others", replica.name, replica.address,
                    reason)

    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    # ------------------------------------------------------------ serving
    async def start(self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await asyncio.start_server(self._proxy, sock=sock)
        else:
            self._server = await asyncio.start_server(self._proxy, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self, sock: socket.socket | None = None, on_ready=None) -> None:
        await self.start(sock)
        if on_ready:
            on_ready(self)
        async with self._server:
            await self._server.serve_forever()

    async def _proxy(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        tried: set[str] = set()
        replica = upstream = None
        try:
            while upstream is None:
                replica = self.pick(exclude=tried)
                if replica is None:
                    self.refused.inc()
                    client_writer.write(error_frame("server_busy", "no live body replica behind this endpoint "
                                                                   "(all have failed); retry later"))
                    await client_writer.drain()
                    return
                try:
                    upstream = await asyncio.wait_for(asyncio.open_connection(replica.host, replica.port),
                                                      self.connect_timeout)
                except (OSError, asyncio.TimeoutError) as error:
                    with self.lock:
                        replica.live -= 1
                    self.mark_dead(replica, f"connect failed: {error or 'timeout'}")
                    tried.add(replica.name)
                    replica = None
            self.placed.labels(replica=replica.name).inc()
            up_reader, up_writer = upstream
            pipes = [asyncio.create_task(self._pipe(client_reader, up_writer, self.bytes_up)),
                     asyncio.create_task(self._pipe(up_reader, client_writer, self.bytes_down))]
            # Either side closing ends the session: the other is closed too (no half-open sessions).
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            up_writer.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if replica is not None:
                with self.lock:
                    replica.live -= 1
            client_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                writer.write(data)
                counter.inc(len(data))
                await writer.drain()
        except (ConnectionError, OSError):
            return

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)


class _ReplicaCollector:
    def __init__(self, router: Router):
        self.router = router

    def describe(self):
        return []

    def collect(self):
        with self.router.lock:
            replicas = list(self.router.replicas)
            sessions = GaugeMetricFamily("lambdasplit_router_sessions", "open connections, by replica",
                                         labels=["replica"])
            up = GaugeMetricFamily("lambdasplit_router_replica_up", "1 while a replica takes new sessions",
                                   labels=["replica"])
            for r in replicas:
                sessions.add_metric([r.name], r.live)
                up.add_metric([r.name], int(r.alive))
        yield sessions
        yield up
        yield GaugeMetricFamily("lambdasplit_router_replicas_alive", "replicas taking new sessions",
                                value=sum(r.alive for r in replicas))
