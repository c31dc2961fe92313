"""What a server hosts. A service matches a HELLO and opens sessions.

A session turns one request frame into the response frames and raises ProtocolError for
anything a client got wrong; the server turns that into an ERROR frame for that session
only. LLM compute goes through one batching Engine per service (engine/): a body
session's STEP is checked from its headers, decoded in a worker thread, submitted to the
engine and awaited (`handle_async`: no thread waits for the forward); a cloud session's
generation loop runs head and tail in a worker thread and its whole-stack steps through
the engine, so the steps of every session of a service share forwards. Other services
(diffusion) answer in a worker thread with `handle`.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import replace

import torch

from lambdasplit.client.device import DeviceModel  # the device's generation loop, for cloud mode only
from lambdasplit.client.generation import Sampling
from lambdasplit.engine import Engine, EngineError
from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.llm.checkpoint import Checkpoint, dtype_name, parse_dtype
from lambdasplit.llm.segments import load_body, parse_split
from lambdasplit.wire.calibrated import CALIBRATED, Table, at_bound, refinement_blob
from lambdasplit.wire.codecs import decode_blob, get_codec
from lambdasplit.wire.frames import (
    FRAME_HEADER, RESULT_BLOB_AT, FrameType, blob_result_frame, json_frame, parse_json, parse_refine, parse_tree_step,
    result_frame, token_frame,
)
from lambdasplit.llm import tree


class Service:
    role = ""
    fingerprint = ""
    description = ""

    def check_hello(self, hello: dict) -> str | None:
        """None when this service serves the HELLO; else why not (used to explain a refusal)."""
        raise NotImplementedError

    def open(self, hello: dict, limits) -> "SessionHandler":
        raise NotImplementedError

    def start(self, limits, metrics_registry=None) -> None:
        """Called once by the server before it serves (services with an engine start it here)."""

    def stop(self) -> None:
        pass


def make_engine(stack, limits, registry=None) -> Engine:
    """The service's engine. KV memory is granted by the server's Admission (per client and
    server-wide, at each step); the engine's own budget only has to hold what those grants allow."""
    from lambdasplit.engine import EngineMetrics, kv_bytes_per_position as engine_kv_bytes

    per_position = engine_kv_bytes(stack)
    budget_mb = max(1.0, (limits.max_total_sessions + 1) * limits.max_positions * per_position / 2**20)
    return Engine(stack, max_batch=limits.max_batch, prefill_chunk=limits.prefill_chunk, kv_budget_mb=budget_mb,
                  queue_timeout=0.0, max_pending_steps=1, metrics=EngineMetrics(registry)).start()


class EngineService(Service):
    """A service whose layer stack runs in one batching Engine, shared by every server hosting it."""

    engine: Engine | None = None
    _users = 0

    def engine_stack(self):
        raise NotImplementedError

    def start(self, limits, metrics_registry=None) -> None:
        self._users += 1
        if self.engine is None:
            self.engine = make_engine(self.engine_stack(), limits, metrics_registry)

    def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self.engine is not None:
            self.engine.stop()
            self.engine = None


# Engine refusals as the protocol's error codes (docs/protocol.md).
_ENGINE_CODES = {"gap": "out_of_order", "reservation_exceeded": "too_many_positions", "bad_shape": "bad_shape",
                 "bad_step": "bad_step", "closed": "server_closing", "too_many_pending": "out_of_order"}


def protocol_error(error: EngineError) -> ProtocolError:
    code = _ENGINE_CODES.get(error.code)
    if code is None:
        raise error  # an engine failure is the server's bug: internal_error with an incident id
    return ProtocolError(code, error.message)


class SessionHandler:
    """One session's state. The server sets `admission` (server/server.py Admission) and `client`."""

    admission = None
    client = None

    def _check_positions(self, positions: int, limits) -> None:
        if positions > limits.max_positions:
            raise ProtocolError("too_many_positions",
                                f"{positions} positions in this session; the limit is {limits.max_positions}")

    def reserve_kv(self, positions: int, per_position_bytes: int, limits) -> None:
        """Admission of a step: grant this session the KV cache of `positions`, or refuse it.

        The grant is taken atomically against every other session's grant (per client and
        server-wide), so concurrent sessions cannot together exceed the limits. A new
        session that finds the server-wide budget full waits in the admission queue (here:
        in its own thread) for up to `queue_timeout` seconds, then gets `server_busy`.
        """
        self._check_positions(positions, limits)
        if self.admission is None:
            return
        deadline = time.monotonic() + limits.queue_timeout
        while not self.admission.reserve_kv(self, positions * per_position_bytes, may_queue=True):
            if time.monotonic() >= deadline:
                raise self.admission.queue_timed_out(self)
            time.sleep(0.02)

    async def reserve_kv_async(self, positions: int, per_position_bytes: int, limits) -> None:
        """`reserve_kv` for the event loop: a queued session waits without holding a thread."""
        self._check_positions(positions, limits)
        if self.admission is None:
            return
        deadline = time.monotonic() + limits.queue_timeout
        while not self.admission.reserve_kv(self, positions * per_position_bytes, may_queue=True):
            if time.monotonic() >= deadline:
                raise self.admission.queue_timed_out(self)
            await asyncio.sleep(0.02)

    def handle(self, frame_type: FrameType, body: memoryview, emit) -> None:
        """Answer one frame by calling emit(frame_bytes) zero or more times (emit never blocks)."""
        raise NotImplementedError

    # A handler may instead define `async def handle_async(frame_type, body, emit, run)`, run
    # on the event loop, with `await run(fn, *args)` for anything that takes CPU time.
    # `long_running = True`: `handle` may run for a whole generation (its own thread pool).
    long_running = False

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """The session ended (any way): free what it holds."""


def public_model_name(model: str, fingerprint: str) -> str:
    """How WELCOME and errors name a model: its zoo or Hub name, never the server's file system."""
    if model.startswith("zoo:") or not (os.path.exists(model) or os.path.isabs(model) or model.startswith(".")):
        return model
    return f"model {fingerprint[:12]}"


FP16 = get_codec("fp16", default_granularity="token")  # REFINE's answer: fp16 kept every greedy token (benchmarks)
CODEC_NAME = re.compile(r"[a-z][a-z0-9+]*(\.[0-9]+)?(/[a-z]+)?")  # fp16, int4/channel, cal7.5; not "int8/", not "INT8"
DTYPES = ("float32", "bfloat16", "float16")


class BodyService(EngineService):
    """Decoder layers [X, Y) of one model; one KV cache per session."""

    role = "body"

    tree_steps = True  # STEPs may carry parents and keep (llm/tree.py)
    refine = True  # REFINE: the last RESULT's last position again, in fp16 (docs/protocol.md)

    def __init__(self, model: str, layers: str, dtype: str = "float32"):
        self.checkpoint = Checkpoint(model)
        self.x, self.y = parse_split(layers, self.checkpoint.config.num_hidden_layers)
        self.dtype = parse_dtype(dtype)
        self.body = load_body(self.checkpoint, self.x, self.y, self.dtype)
        self.fingerprint = self.checkpoint.fingerprint
        self.hidden_size = self.checkpoint.config.hidden_size
        self.per_position_bytes = kv_bytes_per_position(self.checkpoint.config, self.y - self.x, self.dtype)
        self.description = f"{public_model_name(model, self.fingerprint)} layers {self.x}:{self.y} ({dtype_name(self.dtype)})"
        self._tables, self._tables_lock = OrderedDict(), threading.Lock()  # calK tables by sha256, most recent last

    def engine_stack(self):
        return self.body.stack

    def check_hello(self, hello: dict) -> str | None:
        layers, dtype = hello.get("layers"), hello.get("dtype", "float32")
        if not (isinstance(layers, list) and len(layers) == 2 and all(type(v) is int for v in layers)):
            raise ProtocolError("bad_hello", f"\"layers\" must be [X, Y], two JSON integers, got {layers!r}")
        if dtype not in DTYPES:
            raise ProtocolError("bad_hello", f"\"dtype\" must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if layers != [self.x, self.y]:
            return f"this server hosts layers {self.x}:{self.y} of that model"
        if dtype != dtype_name(self.dtype):
            return f"this server runs layers {self.x}:{self.y} in {dtype_name(self.dtype)}"
        return None

    MAX_KNOWN_TABLES = 4  # calibration table pairs kept for later sessions (2.7 MB each at D = 576)

    def known_tables(self, names) -> tuple | None:
        """The (up, down) tables a HELLO names by sha256, if a past session sent them; else None."""
        if names is None:
            return None
        if not (isinstance(names, list) and len(names) == 2
                and all(isinstance(n, str) and re.fullmatch(r"[0-9a-f]{64}", n) for n in names)):
            raise ProtocolError("bad_hello", "\"tables\" must be two sha256 digests, 64 lower-case hex digits each")
        with self._tables_lock:
            found = self._tables.get(tuple(names))
            if found is not None:
                self._tables.move_to_end(tuple(names))
            return found

    def remember_tables(self, up, down) -> None:
        with self._tables_lock:
            self._tables[(up.sha256, down.sha256)] = (up, down)
            self._tables.move_to_end((up.sha256, down.sha256))
            while len(self._tables) > self.MAX_KNOWN_TABLES:
                self._tables.popitem(last=False)

    def open(self, hello: dict, limits) -> "BodySession":
        name = hello.get("codec", "fp32")
        if not isinstance(name, str) or not CODEC_NAME.fullmatch(name):
            raise ProtocolError("bad_codec", f"codec must be a name such as fp16, int8 or int4/channel, got {name!r}")
        try:
            codec = get_codec(name, default_granularity="token")
        except ValueError as error:
            raise ProtocolError("bad_codec", str(error)) from None
        if self.engine is None:
            raise LambdaSplitError("a service opens sessions once started (BodyServer starts its services)")
        tables = self.known_tables(hello.get("tables")) if codec.kind == CALIBRATED else None
        session = BodySession(self, self.engine.open_session(max_positions=limits.max_positions), codec, limits)
        if codec.kind == CALIBRATED:
            if tables is not None:
                session.use_tables(*tables)
            session.welcome_extra = {"tables_needed": tables is None}
        return session


class BodySession(SessionHandler):
    """STEP -> RESULT: check the step from its headers, admit it (KV grant), decode, run it in the engine, reply."""

    def __init__(self, service: BodyService, session, codec, limits):
        self.service, self.session, self.codec, self.limits = service, session, codec, limits
        self.result_codec = codec  # the downlink's: a `calK` codec's carries the other table
        self.seq = 0  # the last STEP's sequence number
        self.tree: tuple = (None, None)  # the checked STEP's (parents, keep): llm/tree.py
        self.needs_tables = codec.kind == CALIBRATED  # a TABLES frame must come before the first STEP
        self.last_row: tuple | None = None  # (seq, position, [1, 1, D] output) of the last RESULT's last row
        self.step_bits = codec.bits  # the checked STEP's (a calK STEP may be finer than the session's codec)
        self.last_coarse: bytes | None = None  # a calK session's last RESULT frame

    @property
    def body(self):
        """The session's cache holder (`.stack.length`, `.stack.cache`), as before the engine."""
        return self.session

    def memory_bytes(self) -> int:
        return self.session.stack.cache_bytes()

    def close(self) -> None:
        self.session.close()

    def take_tables(self, body) -> None:
        """TABLES: the calK codec's calibration tables (up, down), each validated strictly (docs/protocol.md)."""
        if not self.needs_tables:
            raise ProtocolError("unexpected_frame", f"TABLES only once, and only for a cal codec (this session's "
                                                    f"codec is {self.codec.name})")
        d = self.service.hidden_size
        size = Table.size(d)
        if len(body) != 2 * size:
            raise ProtocolError("bad_table", f"TABLES for D = {d} carries two tables of {size} bytes "
                                             f"({2 * size} bytes), got {len(body)}")
        up, down = Table.from_bytes(body[:size], d), Table.from_bytes(body[size:], d)
        self.use_tables(up, down)
        self.service.remember_tables(up, down)

    def use_tables(self, up, down) -> None:
        self.codec, self.result_codec = replace(self.codec, table=up), replace(self.codec, table=down)
        self.needs_tables = False

    async def handle_async(self, frame_type, body, emit, run) -> None:
        if frame_type == FrameType.TABLES:
            return await run(self.take_tables, body)
        if frame_type == FrameType.REFINE:
            return emit(await run(self.refined, body))
        seq, position, header = self.check_step(frame_type, body)  # headers only: cheap, on the loop
        await self.reserve_kv_async(position + header.shape[1], self.service.per_position_bytes, self.limits)
        hidden = await run(self.decode, body, header)
        began = time.perf_counter()
        try:
            out = await asyncio.wrap_future(self.session.submit(position, hidden, *self.tree))
        except EngineError as error:
            raise protocol_error(error) from None
        compute_us = int((time.perf_counter() - began) * 1e6)
        emit(await run(self.result, seq, position, compute_us, out))

    def handle(self, frame_type, body, emit) -> None:
        """The same as handle_async in the caller's thread (a service driven without a server)."""
        if frame_type == FrameType.TABLES:
            return self.take_tables(body)
        if frame_type == FrameType.REFINE:
            return emit(self.refined(body))
        seq, position, header = self.check_step(frame_type, body)
        self.reserve_kv(position + header.shape[1], self.service.per_position_bytes, self.limits)
        hidden = self.decode(body, header)
        began = time.perf_counter()
        try:
            out = self.session.submit(position, hidden, *self.tree).result()
        except EngineError as error:
            raise protocol_error(error) from None
        emit(self.result(seq, position, int((time.perf_counter() - began) * 1e6), out))

    def result(self, seq: int, position: int, compute_us: int, out: torch.Tensor) -> bytes:
        self.last_row = (seq, position + out.shape[1] - 1, out[:, -1:].clone())  # D values: what REFINE resends
        codec = self.result_codec
        if self.step_bits != codec.bits:  # a finer calK STEP is answered as finely
            codec = at_bound(codec, self.step_bits)
        reply = result_frame(position, compute_us, [out], codec, seq=seq)
        self.last_coarse = reply if codec.kind == CALIBRATED else None  # what a calK refinement refines
        return reply

    def refined(self, body) -> bytes:
        """REFINE: the last RESULT's last row again, finer (a near-tie's guard): a calK session gets the
        refinement of the coded row (kind 7, 4 bits per component), any other fp16."""
        seq = parse_refine(body)
        if self.last_row is None or seq != self.last_row[0] or seq != self.seq:
            raise ProtocolError("bad_sequence", f"REFINE names STEP {seq}; only the last answered STEP "
                                                f"({self.seq if self.last_row else 'none yet'}) can be refined")
        _, position, row = self.last_row
        if self.last_coarse is not None:
            coarse = memoryview(self.last_coarse)[FRAME_HEADER.size + RESULT_BLOB_AT:]
            return blob_result_frame(seq, position, refinement_blob(row, coarse, self.result_codec.table))
        return result_frame(position, 0, [row.float()], FP16, seq=seq)

    def decode(self, body, header) -> torch.Tensor:
        hidden = decode_blob(body, header, self.codec.table)
        if not torch.isfinite(hidden).all():
            raise ProtocolError("bad_tensor", "the hidden states contain NaN or infinity")
        return hidden.to(self.service.dtype)

    def check_step(self, frame_type, body):
        """Everything about a STEP that its headers tell, before anything is decoded or allocated."""
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a body session takes STEP frames, got {frame_type.name}")
        if self.needs_tables:
            raise ProtocolError("unexpected_frame", f"codec {self.codec.name}: send TABLES before the first STEP")
        seq, position, headers, parents, keep = parse_tree_step(body)
        if seq != self.seq + 1:
            raise ProtocolError("bad_sequence", f"STEP sequence number {seq}; this session expects {self.seq + 1} "
                                                "(numbered from 1, one more each STEP)")
        if len(headers) != 1:
            raise ProtocolError("bad_step", f"a body STEP carries one tensor, got {len(headers)}")
        header = headers[0]
        finer = self.codec.kind == CALIBRATED == header.codec.kind and header.codec.bits >= self.codec.bits
        if header.codec != self.codec and not finer:
            also = f" (or calK with K >= {self.codec.bits / 4:g})" if self.codec.kind == CALIBRATED else ""
            raise ProtocolError("wrong_codec", f"this session's codec is {self.codec.name}{also}; the STEP's tensor "
                                               f"is {header.codec.name}")
        shape, d = header.shape, self.service.hidden_size
        if len(shape) != 3 or shape[0] != 1 or shape[2] != d or shape[1] < 1:
            raise ProtocolError("bad_shape", f"expected hidden states of shape [1, n, {d}], got {list(shape)}")
        if shape[1] > self.limits.max_positions:
            raise ProtocolError("too_many_positions", f"a step of {shape[1]} positions; the limit is "
                                                      f"{self.limits.max_positions} per session")
        cached = self.session.length
        last = self.session.last  # (start, n, parents) of the previous STEP
        if parents is not None and (problem := tree.parents_problem(parents, shape[1])):
            raise ProtocolError("bad_step", f"bad tree step: {problem}")
        if keep is not None:
            if last is None:
                raise ProtocolError("bad_step", "bad keep: this session has no previous step to keep entries of")
            if problem := tree.keep_problem(keep, last[2], last[1]):
                raise ProtocolError("bad_step", f"bad keep: {problem}")
            cached = last[0] + len(keep)
        elif last is not None and last[2] is not None and position > last[0] \
                and not tree.is_chain(last[2][:position - last[0]]):
            raise ProtocolError("bad_step", f"after a tree step, a STEP at position {position} must name the "
                                            "kept path with keep")
        if position > cached:
            raise ProtocolError("out_of_order", f"step starts at position {position} but only {cached} positions are cached")
        self.seq = seq
        self.tree = (parents, keep)
        self.step_bits = header.codec.bits
        return seq, position, header


def kv_bytes_per_position(config, num_layers: int, dtype: torch.dtype) -> int:
    """KV-cache bytes one position takes in `num_layers` layers (keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * num_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class CloudService(EngineService):
    """The whole model, for the cloud-only baseline: text in, text out, the same generation loop.

    The decoder layers run as one stack [0, N) in the service's engine, so the steps of all
    cloud sessions share forwards; each session's embedding, final norm, LM head and
    sampling (the device's loop, client/generation.py) run in a worker thread of its own.
    """

    role = "cloud"

    def __init__(self, model: str, dtype: str = "float32"):
        checkpoint = Checkpoint(model)
        n = checkpoint.config.num_hidden_layers
        self.device = DeviceModel.load(checkpoint, (0, n), dtype)  # embedding + norm + LM head; no layers
        self.body = load_body(checkpoint, 0, n, self.device.dtype)
        self.fingerprint = self.device.checkpoint.fingerprint
        self.per_position_bytes = kv_bytes_per_position(checkpoint.config, n, self.device.dtype)
        self.description = f"{public_model_name(model, self.fingerprint)} whole model, cloud mode ({dtype_name(self.device.dtype)})"

    def engine_stack(self):
        return self.body.stack

    def check_hello(self, hello: dict) -> str | None:
        if hello.get("dtype", "float32") not in DTYPES:
            raise ProtocolError("bad_hello", f"\"dtype\" must be one of {', '.join(DTYPES)}, got {hello.get('dtype')!r}")
        if hello.get("dtype", "float32") != self.device.dtype_name:
            return f"this server runs the model in {self.device.dtype_name}"
        return None

    def open(self, hello: dict, limits) -> "CloudSession":
        if self.engine is None:
            raise LambdaSplitError("a service opens sessions once started (BodyServer starts its services)")
        return CloudSession(self, self.engine.open_session(max_positions=limits.max_positions), limits)


class _EngineBody:
    """The body link of the generation loop (`forward(hidden, start)`) as steps of an engine session."""

    def __init__(self, session):
        self.session = session

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        try:
            return self.session.submit(start, hidden).result()
        except EngineError as error:
            raise protocol_error(error) from None


class CloudSession(SessionHandler):
    long_running = True  # one GENERATE runs a whole generation in its thread (waiting on the engine)

    def __init__(self, service: CloudService, session, limits):
        self.service, self.session, self.limits = service, session, limits
        base = service.device
        self.device = DeviceModel(base.checkpoint, base.tokenizer, base.head.fork(), base.tail.fork(), base.split, base.dtype)

    def memory_bytes(self) -> int:
        return self.session.stack.cache_bytes()

    def close(self) -> None:
        self.session.close()

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.GENERATE:
            raise ProtocolError("unexpected_frame", f"a cloud session takes GENERATE frames, got {frame_type.name}")
        request = parse_json(body)
        prompt_ids, prompt, max_new_tokens, sampling, cache = self.check_request(request)
        if prompt_ids is None:
            prompt_ids = self.device.encode(prompt, request.get("chat"))
            if not prompt_ids:
                raise ProtocolError("bad_request", "GENERATE request: the prompt encodes to no tokens")
        self.reserve_kv(len(prompt_ids) + max_new_tokens, self.service.per_position_bytes, self.limits)
        streamed = []

        def on_text(piece: str) -> None:
            streamed.append(piece)

        def on_token(token: int) -> None:
            emit(token_frame(token, "".join(streamed)))
            streamed.clear()

        began = time.perf_counter()
        result = self.device.generate(
            prompt_ids, body=_EngineBody(self.session), max_new_tokens=max_new_tokens, sampling=sampling,
            cache=cache, ignore_eos=request.get("ignore_eos", False), on_text=on_text, on_token=on_token,
        )
        emit(json_frame(FrameType.DONE, {
            "text": result.text, "token_ids": result.token_ids, "prompt_tokens": len(result.prompt_ids),
            "compute_seconds": time.perf_counter() - began,
        }))

    def check_request(self, request: dict):
        """A GENERATE object, typed exactly as docs/protocol.md says (else bad_request)."""
        def is_int(value) -> bool:
            return type(value) is int

        def is_number(value) -> bool:
            return type(value) in (int, float)

        def refuse(why: str):
            raise ProtocolError("bad_request", f"GENERATE request: {why}")

        vocab = self.device.checkpoint.config.vocab_size
        prompt_ids, prompt = request.get("prompt_ids"), request.get("prompt")
        if prompt_ids is not None:  # exact token ids (benchmarks); else the prompt text
            if not isinstance(prompt_ids, list) or not prompt_ids or not all(
                    is_int(i) and 0 <= i < vocab for i in prompt_ids):
                refuse(f"prompt_ids must be a non-empty list of token ids in [0, {vocab})")
        elif not isinstance(prompt, str) or not prompt:
            refuse("needs \"prompt\" (a non-empty string) or \"prompt_ids\"")
        max_new_tokens = request.get("max_new_tokens")
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            refuse("max_new_tokens must be an integer >= 0")
        options = request.get("sampling", {})
        if not isinstance(options, dict) or set(options) - {"temperature", "top_k", "top_p", "seed"}:
            refuse("sampling must be an object of temperature, top_k, top_p, seed")
        for key, check in (("temperature", is_number), ("top_p", is_number), ("top_k", is_int), ("seed", is_int)):
            if key in options and not check(options[key]):
                refuse(f"sampling.{key} must be a {'number' if check is is_number else 'integer'}")
        if not (0 <= options.get("seed", 0) < 2**63 and options.get("top_k", 0) >= 0
                and 0 < options.get("top_p", 1.0) <= 1 and options.get("temperature", 0.0) >= 0):
            refuse("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= seed < 2^63")
        cache = request.get("cache", "kv")
        if cache not in ("kv", "none"):
            refuse("cache must be \"kv\" or \"none\"")
        if type(request.get("ignore_eos", False)) is not bool or request.get("chat") not in (None, True, False):
            refuse("ignore_eos must be a boolean and chat a boolean or null")
        return prompt_ids, prompt, max_new_tokens, Sampling(**options), cache
