"""Sessions with a server, from the device's side.

    RemoteBody    the body behind a network session (split mode): hidden states up, hidden states down
    FailoverBody  a RemoteBody over a list of servers: on failure, a new session and one replay step
    VerifiedBody  every step to two servers, answers compared (integrity by redundancy)
    CloudClient   the honest cloud-only baseline: prompt text up, generated text down

Both count every byte through their Transport and every request/response exchange
after the handshake (`round_trips`). Network failures are NetworkError (one line naming
the server); `timeout` bounds every wait (connecting, each answer). A token is never sent
in clear text to a non-loopback host: that needs TLS (`tls_ca`) or `insecure=True`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time

import torch

from lambdasplit.errors import LambdaSplitError, NetworkError, ProtocolError, RemoteError, UsageError
from lambdasplit.wire.calibrated import CALIBRATED, REFINEMENT, apply_refinement, at_bound, parse_name
from lambdasplit.wire.codecs import get_codec
from lambdasplit.wire.frames import (
    PROTOCOL_VERSION, RESULT_BLOB_AT, FrameType, TensorStats, json_frame, frame, parse_json, parse_result_seq,
    parse_token, refine_frame, step_frame,
)
from lambdasplit.wire.link import Link
from lambdasplit.wire.transport import DEFAULT_MAX_FRAME_BYTES, DEFAULT_TIMEOUT, Transport


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LambdaSplitError(f"server address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Session:
    """One connection: handshake, then request/response frames. Closes on errors."""

    def __init__(self, address: str, hello: dict, *, token: str | None = None, tls_ca: str | None = None,
                 link: Link | str | None = None, capture: list | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, timeout: float | None = None,
                 insecure: bool = False):
        host, port = parse_address(address)
        token = token if token is not None else os.environ.get("LAMBDASPLIT_TOKEN")
        tls_ca = tls_ca if tls_ca is not None else os.environ.get("LAMBDASPLIT_TLS_CA")
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if not timeout > 0:
            raise UsageError(f"the timeout must be a positive number of seconds, got {timeout!r}")
        if token and not tls_ca and not insecure and not is_loopback(host):
            raise LambdaSplitError(f"refusing to send the token to {host} in clear text: pass --tls-ca CAFILE "
                                   "(TLS), or --insecure if this network is trusted")
        link = Link.parse(link) if isinstance(link, str) else link
        self.transport = Transport(host, port, tls_ca=tls_ca, link=link, capture=capture,
                                   max_frame_bytes=max_frame_bytes, timeout=timeout)
        self.round_trips = 0
        self.cloud_seconds = 0.0
        self.stats = TensorStats()
        self.closed = False
        hello = {"protocol": PROTOCOL_VERSION, **hello}
        if token:
            hello["token"] = token
        self.transport.send(json_frame(FrameType.HELLO, hello))
        self.welcome = parse_json(self.expect(FrameType.WELCOME))

    @property
    def bytes_up(self) -> int:
        return self.transport.bytes_sent

    @property
    def bytes_down(self) -> int:
        return self.transport.bytes_received

    def expect(self, wanted: FrameType) -> memoryview:
        frame_type, body = self.transport.receive()
        if frame_type == FrameType.ERROR:
            error = parse_json(body)
            self.close(send=False)
            raise RemoteError(str(error.get("code")), str(error.get("message")))
        if frame_type != wanted:
            self.close()
            raise ProtocolError("unexpected_frame", f"expected {wanted.name}, got {frame_type.name}")
        return body

    def close(self, send: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if send:
            try:
                self.transport.send(frame(FrameType.CLOSE))
            except (OSError, LambdaSplitError):
                pass
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PRECISE_CODECS = ("fp32", "fp16", "bf16")  # a refinement (fp16 or finer) would add nothing to these
PREFILL_BOUND = 34  # calK in quarter bits (cal8.5): the prompt's step, whose KV entries every later token reads


def prefill_bound(codec, prefill: str | None) -> int | None:
    """The calK bound (quarter bits) of a session's steps at position 0, or None (the session's codec).

    Measured on SmolLM2 (docs/benchmarks.md): most of a coarse uplink's flipped tokens come from
    the prompt's rounding, read by every later position from the body's KV cache. "auto": cal8.5
    for a calK session coarser than that; a calK name: that bound (at least the session's); none.
    """
    if prefill in (None, "none") or codec.kind != CALIBRATED:
        if prefill not in (None, "none", "auto"):
            raise UsageError(f"--prefill-codec {prefill} needs a calK session codec, not {codec.name}")
        return None
    bound = PREFILL_BOUND if prefill == "auto" else parse_name(prefill)
    if bound is None:
        raise UsageError(f"--prefill-codec takes auto, none or a calK name such as cal8.5, got {prefill!r}")
    return bound if bound > codec.bits else None


class RemoteBody(Session):
    """Body layers [X, Y) on a server: one STEP/RESULT exchange per step."""

    def __init__(self, address: str, *, fingerprint: str, split: tuple[int, int], dtype: str = "float32",
                 codec: str = "fp32", defense=None, prefill_codec: str | None = "auto", **options):
        self.codec = get_codec(codec, default_granularity="token")
        self.prefill = prefill_bound(self.codec, prefill_codec)  # steps at position 0 (the prompt's) at this calK
        # A defense (audit/defenses.py) transforms what goes up before it is encoded:
        # anything with `apply(hidden) -> hidden`, e.g. clipping plus calibrated noise.
        self.defense = defense
        self.dtype = dtype
        hello = {"role": "body", "model": fingerprint, "layers": list(split), "dtype": dtype, "codec": self.codec.name}
        self.seq = 0  # STEPs sent in this session (protocol 2 numbers them from 1)
        self.refinements = 0  # REFINE exchanges (near-tie guard)
        self.last_result: bytes | None = None  # a calK session's last RESULT body
        self.result_table = None  # the downlink's calibration table (a `calK` codec)
        tables = None
        if self.codec.kind == CALIBRATED:  # cached by `lambdasplit calibrate`; checked before connecting
            from lambdasplit.wire.calibrate import load_cached

            tables = load_cached(fingerprint, tuple(split))
            hello["tables"] = [tables[0].sha256, tables[1].sha256]  # a server that has them needs no TABLES
        super().__init__(address, hello, **options)
        if tables is not None:
            if self.welcome.get("tables_needed", True):
                self.transport.send(frame(FrameType.TABLES, tables[0].to_bytes() + tables[1].to_bytes()))
            self.codec, self.result_table = dataclasses.replace(self.codec, table=tables[0]), tables[1]

    @classmethod
    def for_device(cls, device, address: str, **options) -> "RemoteBody":
        """A session for the body that `device` (a DeviceModel) is missing."""
        return cls(address, fingerprint=device.checkpoint.fingerprint, split=device.split,
                   dtype=device.dtype_name, **options)

    @property
    def tree_steps(self) -> bool:
        """Whether the server takes tree STEPs (parents, keep: docs/protocol.md)."""
        return bool((self.welcome.get("capabilities") or {}).get("tree_steps"))

    @property
    def can_refine(self) -> bool:
        """Whether the server answers REFINE (docs/protocol.md) and this session's codec is lossy enough to need it."""
        return bool((self.welcome.get("capabilities") or {}).get("refine")) and self.codec.name not in PRECISE_CODECS

    def forward(self, hidden: torch.Tensor, start: int, parents: list[int] | None = None,
                keep: list[int] | None = None) -> torch.Tensor:
        sent = self.defense.apply(hidden) if self.defense is not None else hidden
        return self.send_step(sent, start, parents, keep).to(hidden.dtype)

    def refine(self) -> torch.Tensor:
        """The last RESULT's last position again, finer ([1, 1, D]): one more round trip (a near-tie's guard).
        A calK session's answer refines the coded row (wire/calibrated.py, kind 7); any other is fp16."""
        self.transport.send(refine_frame(self.seq))
        body = self.expect(FrameType.RESULT)
        self.round_trips += 1
        self.refinements += 1
        seq = int.from_bytes(body[:4], "little") if len(body) >= 4 else None
        if seq != self.seq:
            self.close()
            raise ProtocolError("bad_result", f"server answered REFINE of STEP {self.seq} with STEP {seq}")
        if self.result_table is not None and len(body) > RESULT_BLOB_AT and body[RESULT_BLOB_AT] == REFINEMENT:
            return apply_refinement(memoryview(self.last_result)[RESULT_BLOB_AT:], body[RESULT_BLOB_AT:],
                                    self.result_table)
        _, _, _, tensors = parse_result_seq(body)
        if len(tensors) != 1 or tensors[0].shape[:2] != (1, 1):
            self.close()
            raise ProtocolError("bad_result", f"server answered REFINE of STEP {self.seq} with "
                                              f"{len(tensors)} tensor(s) of shape {[list(t.shape) for t in tensors]}")
        return tensors[0]

    def send_step(self, sent: torch.Tensor, start: int, parents=None, keep=None) -> torch.Tensor:
        """One STEP of exactly `sent` (after any defense) and its RESULT's tensor."""
        self.post_step(sent, start, parents, keep)
        return self.read_result(sent, start)

    def post_step(self, sent: torch.Tensor, start: int, parents=None, keep=None) -> None:
        """The STEP half of send_step: written, not yet answered (VerifiedBody posts to both servers first).
        `parents` / `keep`: a tree step, the kept path of the previous one (llm/tree.py)."""
        self.seq += 1
        if (parents is not None or keep is not None) and not self.tree_steps:
            raise UsageError("this server does not take tree steps (its WELCOME has no tree_steps capability)")
        codec = at_bound(self.codec, self.prefill) if start == 0 and self.prefill else self.codec
        self.transport.send(step_frame(start, [sent], codec, self.stats, seq=self.seq, keep=keep, parents=parents))

    def read_result(self, sent: torch.Tensor, start: int) -> torch.Tensor:
        """The RESULT half of send_step: the answer to the STEP just posted, checked against it."""
        body = self.expect(FrameType.RESULT)
        seq, position, compute_us, tensors = parse_result_seq(body, self.result_table)
        if self.result_table is not None:
            self.last_result = bytes(body)  # what a REFINE's refinement refines
        self.round_trips += 1
        self.cloud_seconds += compute_us / 1e6
        if seq != self.seq or position != start or len(tensors) != 1 or tensors[0].shape != sent.shape:
            self.close()
            raise ProtocolError("bad_result", f"server answered STEP {self.seq} at position {start} with STEP {seq} "
                                              f"at position {position} and {len(tensors)} tensor(s)")
        return tensors[0]


class CloudClient(Session):
    """Cloud-only mode: the server tokenizes, runs the whole model with the same loop, returns text."""

    def __init__(self, address: str, *, fingerprint: str, dtype: str = "float32", **options):
        super().__init__(address, {"role": "cloud", "model": fingerprint, "dtype": dtype}, **options)

    def generate(self, prompt: str | list[int], *, max_new_tokens: int, sampling, cache: str = "kv",
                 ignore_eos: bool = False, chat: bool | None = None, on_text=None) -> dict:
        request = {
            "max_new_tokens": max_new_tokens, "sampling": sampling.to_dict(),
            "cache": cache, "ignore_eos": ignore_eos, "chat": chat,
        }
        # Token ids go as `prompt_ids` (benchmarks need an exact prompt length); text as `prompt`.
        request["prompt_ids" if isinstance(prompt, list) else "prompt"] = prompt
        began = time.perf_counter()
        self.transport.send(json_frame(FrameType.GENERATE, request))
        while True:
            frame_type, body = self.transport.receive()
            if frame_type == FrameType.TOKEN:
                _, piece = parse_token(body)
                if on_text and piece:
                    on_text(piece)
                continue
            if frame_type == FrameType.DONE:
                done = parse_json(body)
                break
            if frame_type == FrameType.ERROR:
                error = parse_json(body)
                self.close(send=False)
                raise RemoteError(str(error.get("code")), str(error.get("message")))
            self.close()
            raise ProtocolError("unexpected_frame", f"expected TOKEN or DONE, got {frame_type.name}")
        self.round_trips += 1
        self.cloud_seconds += float(done.get("compute_seconds", 0.0))
        done["seconds"] = time.perf_counter() - began
        return done


# Server refusals worth another server (or the same address later): it is full, not the request wrong.
RETRYABLE_CODES = {"server_busy", "too_many_sessions", "too_many_connections", "server_closing", "idle_timeout"}


def parse_servers(servers: str | list[str]) -> list[str]:
    """'A,B,...' (or a list) -> addresses, each HOST:PORT; the same address may appear twice."""
    addresses = [a.strip() for a in servers.split(",")] if isinstance(servers, str) else list(servers)
    if not addresses or not all(addresses):
        raise UsageError(f"--server takes HOST:PORT[,HOST:PORT...], got {servers!r}")
    for address in addresses:
        parse_address(address)
    return addresses


class _Uplink:
    """Exactly what the live session's cache holds, as sent (after any defense): [1, L, D], grown in place."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.length = 0

    def put(self, start: int, sent: torch.Tensor) -> None:
        end = start + sent.shape[1]
        if self.buffer is None or self.buffer.shape[1] < end or self.buffer.dtype != sent.dtype:
            grown = torch.empty(1, max(2 * end, 64), sent.shape[2], dtype=sent.dtype)
            if self.buffer is not None:
                grown[:, :self.length] = self.buffer[:, :self.length].to(sent.dtype)
            self.buffer = grown
        self.buffer[:, start:end] = sent
        self.length = end

    def upto(self, end: int) -> torch.Tensor:
        return self.buffer[:, :end]

    def compact(self, start: int, keep: list[int]) -> None:
        """After a tree step at `start`: only its rows at offsets `keep`, as the caches keep them."""
        rows = self.buffer[:, [start + i for i in keep]].clone()
        self.buffer[:, start:start + len(keep)] = rows
        self.length = start + len(keep)


class FailoverBody:
    """A RemoteBody that survives its server: on failure, a new session elsewhere and one replay step.

    `servers` are tried in order, cycling (an address may appear again: a router in front
    of replicas places a new session elsewhere). The uplink history (what was sent, after
    the defense: noise is never drawn again, since fresh noise on a replay would let the
    server average it away) is kept for the live session; when the server dies, resets,
    stays silent past `timeout`, or refuses retryably (RETRYABLE_CODES), the next server
    gets one STEP of the whole history plus the new positions, and generation goes on with
    the same outputs. At most `max_failovers` switches (default: twice around the others).
    """

    def __init__(self, servers: str | list[str], *, fingerprint: str, split: tuple[int, int], dtype: str = "float32",
                 codec: str = "fp32", defense=None, max_failovers: int | None = None, **options):
        self.addresses = parse_servers(servers)
        self.codec = get_codec(codec, default_granularity="token")
        self.defense = defense
        self.session_args = dict(fingerprint=fingerprint, split=split, dtype=dtype, codec=codec, **options)
        self.max_failovers = 2 * (len(self.addresses) - 1) if max_failovers is None else max_failovers
        self.uplink = _Uplink()
        self.last_start = 0  # where the last step started (a keep refers to it)
        self.failovers = 0
        self.prompt_length = 0  # positions of the last step at position 0 (a replay re-sends them as that step)
        self.servers: list[str] = []  # which served, in order (an address again after a failover back)
        self.failures: list[str] = []  # one line per failover
        self._next = 0
        self._done: list[RemoteBody] = []  # closed sessions: their bytes still count
        self.live: RemoteBody | None = None
        self._open(first=True)

    @classmethod
    def for_device(cls, device, servers, **options) -> "FailoverBody":
        return cls(servers, fingerprint=device.checkpoint.fingerprint, split=device.split,
                   dtype=device.dtype_name, **options)

    def _open(self, first: bool = False) -> None:
        """A session on the next server that answers; retryable failures move on (and count)."""
        while True:
            address = self.addresses[self._next % len(self.addresses)]
            self._next += 1
            try:
                self.live = RemoteBody(address, **self.session_args)
                self.servers.append(address)
                return
            except (NetworkError, RemoteError) as error:
                self._failed(address, error)

    def _failed(self, address: str, error: Exception) -> None:
        if isinstance(error, RemoteError) and error.code not in RETRYABLE_CODES:
            raise error  # the request itself is wrong (model, split, token...): another server will not help
        self.failures.append(f"{address}: {error}")
        if self.failovers >= self.max_failovers:
            tried = "; ".join(self.failures[-3:])
            raise NetworkError(f"no body server left after {self.failovers} failover(s) ({tried})") from None
        self.failovers += 1

    def forward(self, hidden: torch.Tensor, start: int, parents: list[int] | None = None,
                keep: list[int] | None = None) -> torch.Tensor:
        sent = self.defense.apply(hidden) if self.defense is not None else hidden
        if keep is not None:
            self.uplink.compact(self.last_start, keep)
        if start > self.uplink.length:
            raise LambdaSplitError(f"a step at position {start} after only {self.uplink.length} positions")
        replay = False
        while True:
            try:
                if replay:  # everything the lost session held, and this step
                    history = torch.cat([self.uplink.upto(start), sent.to(self.uplink.buffer.dtype)], dim=1) \
                        if start else sent
                    out = self._replay(history, start, parents)
                else:
                    out = self.live.send_step(sent, start, parents, keep)
                break
            except (NetworkError, RemoteError, ProtocolError) as error:  # ProtocolError: a garbled answer
                self._fail_over(error)
                replay = True
        self.uplink.put(start, sent)
        self.last_start = start
        if start == 0:
            self.prompt_length = sent.shape[1]
        return out.to(hidden.dtype)

    def _replay(self, history: torch.Tensor, start: int, parents: list[int] | None = None) -> torch.Tensor:
        """`history` (the lost session's `start` positions, then a step's rows) to the fresh session in one
        STEP from position 0, or two when the prompt's step travelled finer (RemoteBody.prefill): the same
        bytes again. Returns the outputs of the rows after `start`."""
        first = self.prompt_length if self.live.prefill and 0 < self.prompt_length < start else 0
        if first:
            self.live.send_step(history[:, :first], 0)
        # a tree step's roots hang off the history's last position, now in the same step
        shifted = None if parents is None else \
            list(range(-1, start - first - 1)) + [p + start - first if p >= 0 else start - first - 1 for p in parents]
        return self.live.send_step(history[:, first:], first, shifted)[:, start - first:]

    def _fail_over(self, error: Exception) -> None:
        address = self.servers[-1]
        self._retire()
        self._failed(address, error)
        self._open()

    @property
    def can_refine(self) -> bool:
        return self.live is not None and self.live.can_refine

    def refine(self) -> torch.Tensor:
        """The live session's REFINE. When that server fails, the next one first gets the whole uplink
        history (as a failover does), then the REFINE: the answer is the same."""
        replay = False
        while True:
            try:
                if replay:
                    self._replay(self.uplink.upto(self.uplink.length), self.uplink.length)
                return self.live.refine()
            except (NetworkError, RemoteError, ProtocolError) as error:
                self._fail_over(error)
                replay = True

    def _retire(self) -> None:
        if self.live is not None:
            self.live.close(send=False)
            self._done.append(self.live)
            self.live = None

    def _sessions(self) -> list[RemoteBody]:
        return self._done + ([self.live] if self.live is not None else [])

    @property
    def tree_steps(self) -> bool:
        return self.live is not None and self.live.tree_steps

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self._sessions())

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self._sessions())

    @property
    def round_trips(self) -> int:
        return sum(s.round_trips for s in self._sessions())

    @property
    def cloud_seconds(self) -> float:
        return sum(s.cloud_seconds for s in self._sessions())

    @property
    def stats(self) -> TensorStats:
        total = TensorStats()
        for s in self._sessions():
            total.payload_bytes += s.stats.payload_bytes
            total.scale_bytes += s.stats.scale_bytes
        return total

    def close(self) -> None:
        if self.live is not None:
            self.live.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# How far two honest servers' answers may differ: batching changes the order of float sums
# (fp32: ~1e-6 relative), and a lossy codec may then round one value a step apart.
VERIFY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}


def verify_tolerance(codec_name: str) -> float:
    """Largest allowed |a - b| / max(1, max |a|) between two servers' outputs of one step."""
    if codec_name in VERIFY_TOLERANCE:
        return VERIFY_TOLERANCE[codec_name]
    codec = get_codec(codec_name)
    bits = codec.bits // 4 if codec.kind == CALIBRATED else codec.bits  # calK: K in quarter bits
    return 2.5 / (2**bits - 1)  # two quantisation steps of a group spanning the tensor's range


class VerifiedBody:
    """Integrity by redundancy: every step to two servers at once, answers compared, a mismatch ends the run.

    Both get exactly the same bytes (the defense is applied once). The comparison is
    `max |a - b| <= tolerance * max(1, max |a|)` with `verify_tolerance(codec)`.
    """

    def __init__(self, servers: str | list[str], *, fingerprint: str, split: tuple[int, int], dtype: str = "float32",
                 codec: str = "fp32", defense=None, **options):
        addresses = parse_servers(servers)
        if len(addresses) < 2:
            raise UsageError("--verify needs two servers: --server A,B")
        self.addresses = addresses[:2]
        self.codec = get_codec(codec, default_granularity="token")
        self.defense = defense
        self.tolerance = verify_tolerance(self.codec.name)
        self.bodies = [RemoteBody(a, fingerprint=fingerprint, split=split, dtype=dtype, codec=codec, **options)
                       for a in self.addresses]
        self.failovers, self.servers, self.max_difference = 0, list(self.addresses), 0.0

    @classmethod
    def for_device(cls, device, servers, **options) -> "VerifiedBody":
        return cls(servers, fingerprint=device.checkpoint.fingerprint, split=device.split,
                   dtype=device.dtype_name, **options)

    def forward(self, hidden: torch.Tensor, start: int, parents: list[int] | None = None,
                keep: list[int] | None = None) -> torch.Tensor:
        sent = self.defense.apply(hidden) if self.defense is not None else hidden
        # Both STEPs go up before either answer is read, so the servers compute at the same time
        # and a step costs the slower round trip, not the sum (blocking sockets: the kernel buffers
        # each answer until it is read). A failure of either is that server's one-line error.
        for body in self.bodies:
            body.post_step(sent, start, parents, keep)
        first, second = (body.read_result(sent, start) for body in self.bodies)
        scale = max(1.0, float(first.float().abs().max()))
        difference = float((first.float() - second.float()).abs().max()) / scale
        self.max_difference = max(self.max_difference, difference)
        if not difference <= self.tolerance:  # NaN fails too
            self.close()
            raise RemoteError("verify_mismatch", f"servers {self.addresses[0]} and {self.addresses[1]} disagree at "
                                                 f"positions {start}..{start + sent.shape[1] - 1}: relative "
                                                 f"difference {difference:.3g} > tolerance {self.tolerance:g} "
                                                 f"({self.codec.name})")
        return first.to(hidden.dtype)

    can_refine = False  # REFINE would have to be verified too; the guard is off here

    @property
    def tree_steps(self) -> bool:
        return all(body.tree_steps for body in self.bodies)

    @property
    def bytes_up(self) -> int:
        return sum(b.bytes_up for b in self.bodies)

    @property
    def bytes_down(self) -> int:
        return sum(b.bytes_down for b in self.bodies)

    @property
    def round_trips(self) -> int:
        return self.bodies[0].round_trips

    @property
    def cloud_seconds(self) -> float:
        return max(b.cloud_seconds for b in self.bodies)

    @property
    def stats(self) -> TensorStats:
        return self.bodies[0].stats  # per server: both receive the same payload

    def close(self) -> None:
        for body in self.bodies:
            body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
