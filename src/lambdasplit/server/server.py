"""The asyncio body server: one task per connection; compute in each service's engine.

Handlers do protocol only: a body STEP is checked from its headers on the event loop,
decoded in a worker thread, run by the service's batching Engine (engine/: one forward
for the pending steps of every session) and awaited, so no thread waits for a forward
or a socket. Cloud sessions run their generation loop in a pool of their own, their
layer steps in the same kind of engine.

Everything a client can get wrong ends that client's session with an ERROR frame
(code + message) and never touches other sessions: malformed or unknown frames,
oversized frames (refused from the length prefix, before reading the body), frames out
of order, a wrong model, split or dtype, a missing or wrong token, too many sessions or
connections, a KV cache over its limit, idleness past the timeout. A client that does
not read its replies is dropped after `write_timeout` (or once `max_unsent_mb` wait
unsent); compute threads never wait on a socket. Limits are per client (one IPv4
address, one IPv6 /64, or all of loopback) and server-wide; docs/security.md lists them.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import itertools
import logging
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lambdasplit.errors import LambdaSplitError, ProtocolError
if TYPE_CHECKING:  # annotations only: services.py imports torch and transformers
    from lambdasplit.server.services import Service
from lambdasplit.wire.frames import (
    FRAME_HEADER, JSON_FRAMES, PROTOCOL_VERSION, SUPPORTED_VERSIONS, FrameType, error_frame, json_frame, parse_json,
)
from lambdasplit.wire.codecs import FLOAT_KINDS

log = logging.getLogger("lambdasplit.server")

_READ_CHUNK = 1 << 20  # large frame bodies are read in chunks into one buffer (no second copy)


@dataclass
class Limits:
    """What clients may take. Each has a `serve` option of the same name (docs/security.md)."""

    # One client: one IPv4 address, one IPv6 /64 network, or all loopback addresses together.
    max_sessions: int = 32  # concurrent sessions of one client
    max_kv_mb: float = 1024.0  # KV cache granted to one client, all its sessions together, MiB
    max_pending_per_client: int = 8  # connections of one client that have not been admitted yet
    # The whole server.
    max_total_sessions: int = 256
    max_total_kv_mb: float = 8192.0  # KV cache granted to all sessions together, MiB
    max_pending: int = 64  # connections that have not been admitted yet (before and during HELLO)
    # Every session.
    idle_timeout: float = 60.0  # seconds without a complete frame before a session expires
    write_timeout: float = 30.0  # seconds a reply may wait for the client to read it
    max_unsent_mb: float = 4.0  # replies waiting unsent beyond the one being written, MiB
    max_frame_mb: float = 64.0  # largest frame accepted, MiB
    max_control_kb: float = 1024.0  # largest JSON control frame after HELLO (GENERATE), KiB
    max_positions: int = 8192  # positions per session (and so per step)
    # The engine (one per hosted body or model) and its admission queue.
    max_batch: int = 16  # rows (sessions' steps) in one batched forward
    prefill_chunk: int = 64  # positions of a long step run per forward (SARATHI chunked prefill)
    queue_timeout: float = 10.0  # seconds a new session waits for KV budget before `server_busy`
    max_queue: int = 64  # new sessions waiting for KV budget at once

    # Before authentication a connection gets less: a small HELLO, soon.
    max_hello_bytes: int = 64 * 1024
    hello_timeout: float = 10.0

    @property
    def max_kv_bytes(self) -> int:
        return int(self.max_kv_mb * 2**20)

    @property
    def max_total_kv_bytes(self) -> int:
        return int(self.max_total_kv_mb * 2**20)

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 2**20)

    @property
    def max_unsent_bytes(self) -> int:
        return int(self.max_unsent_mb * 2**20)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_key(host: str) -> str:
    """Who a peer is for the per-client limits: its IPv4 address, its IPv6 /64, or "loopback".

    Every address in 127.0.0.0/8 is the same machine, and one IPv6 host usually owns a
    whole /64, so counting them apart would let one client multiply its limits.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def check_exposure(host: str, token: str | None, tls_cert: str | None, insecure: bool) -> None:
    if not is_loopback(host) and not insecure and not (token and tls_cert):
        raise LambdaSplitError(
            f"refusing to listen on {host} without TLS and a token: pass --tls-cert/--tls-key and --token-file, "
            "or --insecure if this network is trusted"
        )


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the listening socket now (before loading any model), with a one-line error if the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise LambdaSplitError(f"cannot listen on {host}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise LambdaSplitError(f"port {port} on {host} is already in use (another server?): "
                                   "pick another with --port, or 0 for a free one") from None
        raise LambdaSplitError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Admission:
    """Sessions and KV-cache grants, per client and server-wide, under one lock.

    A KV grant is what a session may hold after its current step; it is set (grown or,
    after a cut-back, shrunk) atomically against every other session's grant, so
    concurrent sessions can never be granted more than the limits together.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.lock = threading.Lock()
        self.clients: dict[str, set] = {}  # client key -> its open session handlers
        self.grants: dict[object, int] = {}  # handler -> KV bytes granted
        self.last_active: dict[object, float] = {}  # handler -> monotonic time of its last frame
        self.waiting: list[object] = []  # new sessions waiting for server-wide KV budget, first come first
        self.queued_at: dict[object, float] = {}  # handler -> when it joined `waiting`
        self.on_queue_wait = None  # ops.py: called with the seconds a session waited, once granted

    def open(self, client: str, handler) -> None:
        limits = self.limits
        with self.lock:
            mine = self.clients.get(client, set())
            if len(mine) >= limits.max_sessions:
                raise ProtocolError("too_many_sessions", f"this client already has {len(mine)} sessions open, the "
                                    f"limit per client; retry {self._retry_hint(mine)}")
            total = sum(len(s) for s in self.clients.values())
            if total >= limits.max_total_sessions:
                everyone = set().union(*self.clients.values())
                raise ProtocolError("too_many_sessions", f"this server has {total} sessions open, its limit; "
                                    f"retry {self._retry_hint(everyone)}")
            self.clients.setdefault(client, set()).add(handler)
            handler.client = client
            self.grants[handler] = 0
            self.last_active[handler] = time.monotonic()

    def _retry_hint(self, handlers) -> str:
        expiries = [self.last_active[h] + self.limits.idle_timeout - time.monotonic() for h in handlers]
        soonest = max(0.0, min(expiries)) if expiries else 0.0
        return f"when one closes, at the latest in {soonest:.0f} s when the idlest expires"

    def touch(self, handler) -> None:
        self.last_active[handler] = time.monotonic()

    def close(self, handler) -> None:
        with self.lock:
            client = getattr(handler, "client", None)
            mine = self.clients.get(client)
            if mine is not None:
                mine.discard(handler)
                if not mine:
                    del self.clients[client]
            self.grants.pop(handler, None)
            self.last_active.pop(handler, None)
            self.queued_at.pop(handler, None)
            if handler in self.waiting:
                self.waiting.remove(handler)

    def reserve_kv(self, handler, nbytes: int, may_queue: bool = False) -> bool:
        """Grant `handler` exactly `nbytes` of KV cache, or raise kv_cache_limit (nothing changes).

        With `may_queue`, a session holding no KV yet that does not fit the server-wide
        budget (or finds others waiting before it) joins the queue and gets False: its
        caller retries until it is granted or `queue_timeout` passes (`leave_queue`).
        """
        limits = self.limits
        with self.lock:
            others = sum(self.grants.get(h, 0) for h in self.clients.get(handler.client, ()) if h is not handler)
            if nbytes + others > limits.max_kv_bytes:
                raise ProtocolError(
                    "kv_cache_limit",
                    f"this step needs {nbytes / 2**20:.1f} MiB of KV cache (this client's other sessions hold "
                    f"{others / 2**20:.1f} MiB); this server allows {limits.max_kv_mb:g} MiB per client",
                )
            everyone = sum(self.grants.values()) - self.grants.get(handler, 0)
            new = may_queue and not self.grants.get(handler, 0) and nbytes <= limits.max_total_kv_bytes
            ahead = self.waiting and self.waiting[0] is not handler
            if new and (nbytes + everyone > limits.max_total_kv_bytes or ahead):
                if handler not in self.waiting:
                    if len(self.waiting) >= limits.max_queue:
                        raise ProtocolError("server_busy", f"the KV budget of {limits.max_total_kv_mb:g} MiB is "
                                                           f"taken and {len(self.waiting)} sessions are waiting "
                                                           "already; retry later or on another server")
                    self.waiting.append(handler)
                    self.queued_at[handler] = time.monotonic()
                return False
            if nbytes + everyone > limits.max_total_kv_bytes:
                raise ProtocolError(
                    "kv_cache_limit",
                    f"this step needs {nbytes / 2**20:.1f} MiB of KV cache and the server's budget of "
                    f"{limits.max_total_kv_mb:g} MiB is taken; retry later",
                )
            if handler in self.waiting:
                self.waiting.remove(handler)
                waited = time.monotonic() - self.queued_at.pop(handler)
                if self.on_queue_wait is not None:
                    self.on_queue_wait(waited)
            self.grants[handler] = nbytes
            return True

    def queue_timed_out(self, handler) -> ProtocolError:
        with self.lock:
            self.queued_at.pop(handler, None)
            if handler in self.waiting:
                self.waiting.remove(handler)
        limits = self.limits
        return ProtocolError("server_busy", f"the server's KV budget of {limits.max_total_kv_mb:g} MiB stayed full "
                                            f"for {limits.queue_timeout:g} s (--queue-timeout); retry later or on "
                                            "another server")

    def granted_bytes(self) -> int:
        with self.lock:
            return sum(self.grants.values())


class _Dropped(Exception):
    """The session's peer stopped reading (or went away); it is closed without an answer."""


class _Outbox:
    """Replies of one session. Compute threads queue frames here and never wait on the socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, limits: Limits):
        self.loop, self.writer, self.limits = loop, writer, limits
        self.dropped = threading.Event()
        self.reason = ""
        self.bytes_in = self.bytes_out = self.frames_in = 0  # the session's traffic (ops.py: metrics, logs)
        self.error: str | None = None  # the code of the ERROR frame that ended it, if one did

    def emit(self, frame: bytes) -> None:  # called from a compute thread
        if self.dropped.is_set():
            raise _Dropped(self.reason)  # stop computing for a peer that is gone
        self.loop.call_soon_threadsafe(self._write, frame)

    def _write(self, frame: bytes) -> None:
        if self.dropped.is_set():
            return
        if self.writer.transport.get_write_buffer_size() > self.limits.max_unsent_bytes:
            self.drop(f"more than {self.limits.max_unsent_mb:g} MiB of replies unread")
            return
        self.writer.write(frame)
        self.bytes_out += len(frame)

    async def drain(self) -> None:
        if self.dropped.is_set():
            raise _Dropped(self.reason)
        try:
            await asyncio.wait_for(self.writer.drain(), self.limits.write_timeout)
        except asyncio.TimeoutError:
            self.drop(f"reply unread for {self.limits.write_timeout:g} s")
        if self.dropped.is_set():
            raise _Dropped(self.reason)

    def drop(self, reason: str) -> None:
        self.reason = reason
        self.dropped.set()
        self.writer.transport.abort()  # frees the unsent bytes now; nothing more can reach this peer


class BodyServer:
    """Hosts services (bodies, whole models) for many sessions at once."""

    def __init__(self, services: list[Service], *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, insecure: bool = False,
                 limits: Limits | None = None, workers: int = 4, sock: socket.socket | None = None):
        if not services:
            raise LambdaSplitError("a server needs at least one service to host")
        check_exposure(host, token, tls_cert, insecure)
        self.services, self.host, self.port, self.token = services, host, port, token
        self.limits = limits or Limits()
        self.sock = sock
        self.ssl_context = None
        if tls_cert:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.load_cert_chain(tls_cert, tls_key)
        # Short CPU work (decoding, encoding, diffusion steps) and, apart, whole generations of
        # cloud sessions (each waits on its engine between steps: one thread per session).
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lambdasplit-compute")
        self.generation_executor = ThreadPoolExecutor(max_workers=self.limits.max_total_sessions,
                                                      thread_name_prefix="lambdasplit-generate")
        self.admission = Admission(self.limits)
        for service in services:
            service.start(self.limits)
        self.session_hooks: list = []  # called as hook(event, info) at each session start and end
        self.sessions: dict[int, object] = {}
        self.pending: dict[str, int] = {}  # client key -> connections not admitted yet
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------ lifecycle
    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.sock is not None:
            self._server = await asyncio.start_server(self._serve_connection, sock=self.sock, ssl=self.ssl_context)
        else:
            self._server = await asyncio.start_server(self._serve_connection, self.host, self.port,
                                                      ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def engines(self) -> list:
        """The batching engine of each hosted LLM service (their `metrics` are the server's numbers)."""
        return [s.engine for s in self.services if getattr(s, "engine", None) is not None]

    @property
    def clients(self) -> dict[str, set]:
        """Client key -> its open session handlers."""
        return self.admission.clients

    async def serve_forever(self, on_ready=None) -> None:
        await self.start_async()
        if on_ready:
            on_ready(self)
        async with self._server:
            await self._server.serve_forever()

    def start_in_thread(self) -> "BodyServer":
        """Run the server on a background thread of this process (tests, demos, notebooks)."""
        def run():
            try:
                asyncio.run(self.serve_forever(on_ready=lambda _: self._ready.set()))
            except asyncio.CancelledError:
                pass  # stop() closed the server

        self._thread = threading.Thread(target=run, name="lambdasplit-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise LambdaSplitError("server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in list(self._tasks):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(timeout=10)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.generation_executor.shutdown(wait=False, cancel_futures=True)
        for service in self.services:
            service.stop()

    def __enter__(self):
        return self.start_in_thread()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ one connection
    async def _read_frame(self, reader: asyncio.StreamReader, max_bytes: int | None = None) -> tuple[FrameType, memoryview]:
        max_bytes = max_bytes or self.limits.max_frame_bytes
        header = await reader.readexactly(FRAME_HEADER.size)
        length, type_byte = FRAME_HEADER.unpack(header)
        if length < 1:
            raise ProtocolError("bad_frame", "frame length must be at least 1")
        try:
            frame_type = FrameType(type_byte)
        except ValueError:
            raise ProtocolError("bad_frame", f"unknown frame type {type_byte}") from None
        if frame_type in JSON_FRAMES:
            max_bytes = min(max_bytes, int(self.limits.max_control_kb * 1024))
        if length > max_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"{frame_type.name} frame of {length} bytes exceeds this server's limit of {max_bytes} bytes",
            )
        size = length - 1
        if size <= _READ_CHUNK:
            return frame_type, memoryview(await reader.readexactly(size))
        body = bytearray(size)  # read in place: the frame costs its size once, not twice
        view, done = memoryview(body), 0
        while done < size:
            chunk = await reader.read(min(size - done, _READ_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(view[:0]), size)
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        return frame_type, view

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        session_id = handler = None
        began = time.monotonic()
        client = client_key(str((writer.get_extra_info("peername") or ("?",))[0]))
        outbox = _Outbox(asyncio.get_running_loop(), writer, self.limits)
        pending = True
        self.pending[client] = self.pending.get(client, 0) + 1
        try:
            self._check_pending(client)
            frame_type, body = await asyncio.wait_for(
                self._read_frame(reader, self.limits.max_hello_bytes), self.limits.hello_timeout)
            if frame_type != FrameType.HELLO:
                raise ProtocolError("expected_hello", f"a session starts with HELLO, got {frame_type.name}")
            outbox.bytes_in += FRAME_HEADER.size + len(body)
            hello = parse_json(body)
            service = self._admit(hello)
            handler = service.open(hello, self.limits)
            handler.admission = self.admission
            self.admission.open(client, handler)
            self._release_pending(client)
            pending = False
            session_id = next(self._ids)
            self.sessions[session_id] = handler
            welcome = self._welcome(service, session_id)
            welcome.update(getattr(handler, "welcome_extra", None) or {})  # e.g. a calK session: tables_needed
            outbox._write(json_frame(FrameType.WELCOME, welcome))
            await outbox.drain()
            began = time.monotonic()
            self._session_event("start", {"session": session_id, "client": client, "service": service.description,
                                          "traffic": outbox, "handler": handler})
            await self._session_loop(handler, reader, outbox)
        except ProtocolError as error:
            await self._send_error(outbox, error.code, error.message)
        except asyncio.TimeoutError:
            waited = self.limits.idle_timeout if handler is not None else self.limits.hello_timeout
            what = "no complete frame" if handler is not None else "no complete HELLO"
            await self._send_error(outbox, "idle_timeout", f"{what} for {waited:g} s; session expired")
        except _Dropped as dropped:
            log.info("dropped a session of %s: %s", client, dropped)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session is dropped below
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug of ours: that session only; the details stay in the server's log
            incident = secrets.token_hex(4)
            log.exception("internal error, incident %s (client %s)", incident, client)
            await self._send_error(outbox, "internal_error",
                                   f"the server failed on this request (incident {incident}; its log has the details)")
        finally:
            if pending:
                self._release_pending(client)
            self.sessions.pop(session_id, None)
            if handler is not None:
                self.admission.close(handler)
                handler.close()
            if session_id is not None:
                self._session_event("end", {"session": session_id, "client": client,
                                            "seconds": time.monotonic() - began})
            self._tasks.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    def _check_pending(self, client: str) -> None:
        mine, total = self.pending[client], sum(self.pending.values())
        if mine > self.limits.max_pending_per_client:
            raise ProtocolError("too_many_connections", f"this client has {mine - 1} connections that have not "
                                f"finished HELLO, the limit is {self.limits.max_pending_per_client}; retry in "
                                f"{self.limits.hello_timeout:g} s")
        if total > self.limits.max_pending:
            raise ProtocolError("too_many_connections", f"this server has {total - 1} connections that have not "
                                f"finished HELLO, its limit; retry in {self.limits.hello_timeout:g} s")

    def _release_pending(self, client: str) -> None:
        self.pending[client] -= 1
        if not self.pending[client]:
            del self.pending[client]

    def _admit(self, hello: dict) -> Service:
        """The service that serves this HELLO, checked exactly as docs/protocol.md says."""
        protocol = hello.get("protocol")
        if type(protocol) is not int or protocol not in SUPPORTED_VERSIONS:  # not True, not 2.0
            hint = "; upgrade the client (protocol 1 has no sequence numbers)" if protocol == 1 else ""
            raise ProtocolError("protocol_version", f"this server speaks protocol {PROTOCOL_VERSION} (a JSON "
                                                    f"integer), the client sent {protocol!r}{hint}")
        if self.token is not None:
            token = hello.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.token.encode()):
                raise ProtocolError("unauthorized", "missing or wrong bearer token (pass --token-file, or set "
                                                    "LAMBDASPLIT_TOKEN)")
        role, fingerprint = hello.get("role"), hello.get("model")
        if not isinstance(role, str) or not isinstance(fingerprint, str):
            raise ProtocolError("bad_hello", "HELLO needs \"role\" and \"model\" as strings")
        same_role = [s for s in self.services if s.role == role]
        if not same_role:
            roles = sorted({s.role for s in self.services})
            raise ProtocolError("wrong_role", f"this server offers {', '.join(roles)} sessions, not {role!r}")
        same_model = [s for s in same_role if s.fingerprint == fingerprint]
        if not same_model:
            hosted = "; ".join(f"{s.description} [{s.fingerprint}]" for s in same_role)
            raise ProtocolError("wrong_model", f"model fingerprint {fingerprint} is not hosted here (hosted: {hosted})")
        reasons = []
        for service in same_model:
            reason = service.check_hello(hello)
            if reason is None:
                return service
            reasons.append(reason)
        code = "wrong_dtype" if all("runs" in r for r in reasons) else "wrong_split"
        raise ProtocolError(code, f"asked for {hello.get('layers')} in {hello.get('dtype')}; " + "; ".join(reasons))

    async def _session_loop(self, handler, reader, outbox: _Outbox) -> None:
        loop = asyncio.get_running_loop()

        def run(fn, *args):  # CPU work of a handler, off the event loop
            return loop.run_in_executor(self.executor, fn, *args)

        handle_async = getattr(handler, "handle_async", None)
        pool = self.generation_executor if handler.long_running else self.executor
        while True:
            frame_type, body = await asyncio.wait_for(self._read_frame(reader), self.limits.idle_timeout)
            outbox.bytes_in += FRAME_HEADER.size + len(body)
            self.admission.touch(handler)
            if frame_type == FrameType.CLOSE:
                return
            outbox.frames_in += 1
            # Handlers queue their replies (outbox.emit never blocks); only this coroutine waits for the peer.
            if handle_async is not None:
                await handle_async(frame_type, body, outbox.emit, run)
            else:
                await loop.run_in_executor(pool, handler.handle, frame_type, body, outbox.emit)
            await outbox.drain()
            self.admission.touch(handler)

    def _welcome(self, service, session_id: int) -> dict:
        limits = self.limits
        engine = getattr(service, "engine", None)
        return {
            "protocol": PROTOCOL_VERSION, "session": session_id, "service": service.description,
            # Identifies the session to its client (logs, support); this server does not resume sessions.
            "resume_token": secrets.token_hex(16),
            "limits": {"max_kv_mb": limits.max_kv_mb, "idle_timeout": limits.idle_timeout,
                       "max_frame_mb": limits.max_frame_mb, "max_positions": limits.max_positions},
            "capabilities": {
                "max_positions_per_step": limits.max_positions,
                "batching": None if engine is None else {"max_batch": engine.max_batch,
                                                         "prefill_chunk": engine.prefill_chunk},
                "codecs": [*FLOAT_KINDS, *(f"int{b}/{g}" for b in range(2, 9) for g in ("tensor", "token", "channel"))],
                "resume": False,
                "tree_steps": getattr(service, "tree_steps", False),  # STEP parents / keep (docs/protocol.md)
                "refine": getattr(service, "refine", False),  # REFINE frames (docs/protocol.md)
            },
        }

    def _session_event(self, event: str, info: dict) -> None:
        """Every session start ("start") and end ("end") passes here, once: logs and metrics hook in."""
        log.debug("session %s %s", event, info)
        for hook in self.session_hooks:
            try:
                hook(event, info)
            except Exception:  # a hook's bug must not end the session
                log.exception("session hook failed")

    async def _send_error(self, outbox: _Outbox, code: str, message: str) -> None:
        outbox.error = code
        self._session_event("error", {"code": code})
        if outbox.dropped.is_set():
            return
        try:
            frame = error_frame(code, message)
            outbox.writer.write(frame)
            outbox.bytes_out += len(frame)
            await outbox.drain()
        except Exception:
            pass
