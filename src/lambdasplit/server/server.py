"""The asyncio body server: one task per connection, model compute in worker threads.

Everything a client can get wrong ends that client's session with an ERROR frame
(code + message) and never touches other sessions: malformed or unknown frames,
oversized frames (refused from the length prefix, before reading the body), frames out
of order, a wrong model, split or dtype, a missing or wrong token, too many sessions, a
KV cache over its limit, idleness past the timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lambdasplit.errors import LambdaSplitError, ProtocolError
if TYPE_CHECKING:  # annotations only: services.py imports torch and transformers
    from lambdasplit.server.services import Service
from lambdasplit.wire.frames import (
    FRAME_HEADER, PROTOCOL_VERSION, FrameType, error_frame, json_frame, parse_json,
)


@dataclass
class Limits:
    """What one client (one peer address) may take. Each has a `serve` option of the same name."""

    max_sessions: int = 16  # concurrent sessions of one client
    max_kv_mb: float = 1024.0  # KV cache of one client, all its sessions together, MiB
    idle_timeout: float = 300.0  # seconds without a frame before a session expires
    max_frame_mb: float = 64.0  # largest frame accepted, MiB
    max_positions: int = 8192  # positions per session (and so per step)

    # Before authentication a connection gets less: a small HELLO, soon.
    max_hello_bytes: int = 64 * 1024
    hello_timeout: float = 30.0

    @property
    def max_kv_bytes(self) -> int:
        return int(self.max_kv_mb * 2**20)

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 2**20)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyServer:
    """Hosts services (bodies, whole models) for many sessions at once."""

    def __init__(self, services: list[Service], *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, insecure: bool = False,
                 limits: Limits | None = None, workers: int = 4):
        if not services:
            raise LambdaSplitError("a server needs at least one service to host")
        if not is_loopback(host) and not insecure and not (token and tls_cert):
            raise LambdaSplitError(
                f"refusing to listen on {host} without TLS and a token: pass --tls-cert/--tls-key and --token, "
                "or --insecure if this network is trusted"
            )
        self.services, self.host, self.port, self.token = services, host, port, token
        self.limits = limits or Limits()
        self.ssl_context = None
        if tls_cert:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.load_cert_chain(tls_cert, tls_key)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lambdasplit-compute")
        self.sessions: dict[int, object] = {}
        self.clients: dict[str, set] = {}  # peer host -> its open session handlers
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------ lifecycle
    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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
            for task in list(getattr(self, "_tasks", [])):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(timeout=10)
        self.executor.shutdown(wait=False, cancel_futures=True)

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
        if length > max_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"frame of {length} bytes exceeds this server's limit of {max_bytes} bytes",
            )
        body = await reader.readexactly(length - 1)
        try:
            return FrameType(type_byte), memoryview(body)
        except ValueError:
            raise ProtocolError("bad_frame", f"unknown frame type {type_byte}") from None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks = getattr(self, "_tasks", set())
        self._tasks.add(task)
        session_id = handler = None
        client = str((writer.get_extra_info("peername") or ("?",))[0])
        try:
            frame_type, body = await asyncio.wait_for(
                self._read_frame(reader, self.limits.max_hello_bytes), self.limits.hello_timeout)
            if frame_type != FrameType.HELLO:
                raise ProtocolError("expected_hello", f"a session starts with HELLO, got {frame_type.name}")
            hello = parse_json(body)
            service = self._admit(hello)
            peers = self.clients.setdefault(client, set())
            if len(peers) >= self.limits.max_sessions:
                raise ProtocolError(
                    "too_many_sessions", f"this server allows {self.limits.max_sessions} concurrent sessions per client")
            handler = service.open(hello, self.limits)
            handler.peers = peers  # the client's other sessions, for its KV-cache budget
            peers.add(handler)
            session_id = next(self._ids)
            self.sessions[session_id] = handler
            writer.write(json_frame(FrameType.WELCOME, {
                "session": session_id, "protocol": PROTOCOL_VERSION, "service": service.description,
                "limits": {"max_kv_mb": self.limits.max_kv_mb, "idle_timeout": self.limits.idle_timeout,
                           "max_frame_mb": self.limits.max_frame_mb, "max_positions": self.limits.max_positions},
            }))
            await writer.drain()
            await self._session_loop(handler, reader, writer)
        except ProtocolError as error:
            await self._send_error(writer, error.code, error.message)
        except asyncio.TimeoutError:
            waited = self.limits.idle_timeout if handler is not None else self.limits.hello_timeout
            await self._send_error(writer, "idle_timeout", f"no frame for {waited:g} s; session expired")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session is dropped below
        except asyncio.CancelledError:
            pass
        except Exception as error:  # a bug of ours: report it to that session only, keep serving
            await self._send_error(writer, "internal_error", f"{type(error).__name__}: {error}")
        finally:
            self.sessions.pop(session_id, None)
            peers = self.clients.get(client)
            if peers is not None:
                peers.discard(handler)
                if not peers:
                    del self.clients[client]
            self._tasks.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    def _admit(self, hello: dict) -> Service:
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError("protocol_version", f"server speaks protocol {PROTOCOL_VERSION}, client sent {hello.get('protocol')!r}")
        if self.token is not None and not hmac.compare_digest(str(hello.get("token", "")).encode(), self.token.encode()):
            raise ProtocolError("unauthorized", "missing or wrong bearer token (pass --token or set LAMBDASPLIT_TOKEN)")
        role, fingerprint = hello.get("role"), hello.get("model")
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

    async def _session_loop(self, handler, reader, writer) -> None:
        loop = asyncio.get_running_loop()

        def emit(frame: bytes) -> None:  # called from the worker thread
            asyncio.run_coroutine_threadsafe(self._write(writer, frame), loop).result()

        while True:
            frame_type, body = await asyncio.wait_for(self._read_frame(reader), self.limits.idle_timeout)
            if frame_type == FrameType.CLOSE:
                return
            await loop.run_in_executor(self.executor, handler.handle, frame_type, body, emit)

    @staticmethod
    async def _write(writer, frame: bytes) -> None:
        writer.write(frame)
        await writer.drain()

    @staticmethod
    async def _send_error(writer, code: str, message: str) -> None:
        try:
            writer.write(error_frame(code, message))
            await writer.drain()
        except Exception:
            pass
