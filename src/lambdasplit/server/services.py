"""What a server hosts. A service matches a HELLO and opens sessions.

A session turns one request frame into the response frames. It runs in a worker thread
(model compute must not block the event loop that serves everyone else) and raises
ProtocolError for anything a client got wrong; the server turns that into an ERROR frame
for that session only.
"""

from __future__ import annotations

import os
import re
import time

import torch

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.llm.checkpoint import Checkpoint, dtype_name, parse_dtype
from lambdasplit.llm.segments import load_body, parse_split
from lambdasplit.wire.codecs import decode_blob, get_codec
from lambdasplit.wire.frames import (
    FrameType, json_frame, parse_json, parse_step_headers, result_frame, token_frame,
)


class Service:
    role = ""
    fingerprint = ""
    description = ""

    def check_hello(self, hello: dict) -> str | None:
        """None when this service serves the HELLO; else why not (used to explain a refusal)."""
        raise NotImplementedError

    def open(self, hello: dict, limits) -> "SessionHandler":
        raise NotImplementedError


class SessionHandler:
    """One session's state. The server sets `admission` (server/server.py Admission) and `client`."""

    admission = None
    client = None

    def reserve_kv(self, positions: int, per_position_bytes: int, limits) -> None:
        """Admission of a step: grant this session the KV cache of `positions`, or refuse it.

        The grant is taken atomically against every other session's grant (per client and
        server-wide), so concurrent sessions cannot together exceed the limits.
        """
        if positions > limits.max_positions:
            raise ProtocolError("too_many_positions",
                                f"{positions} positions in this session; the limit is {limits.max_positions}")
        if self.admission is not None:
            self.admission.reserve_kv(self, positions * per_position_bytes)

    def handle(self, frame_type: FrameType, body: memoryview, emit) -> None:
        """Answer one frame by calling emit(frame_bytes) zero or more times (emit never blocks)."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        return 0


def public_model_name(model: str, fingerprint: str) -> str:
    """How WELCOME and errors name a model: its zoo or Hub name, never the server's file system."""
    if model.startswith("zoo:") or not (os.path.exists(model) or os.path.isabs(model) or model.startswith(".")):
        return model
    return f"model {fingerprint[:12]}"


CODEC_NAME = re.compile(r"[a-z][a-z0-9+]*(/[a-z]+)?")  # fp16, int8, int4/channel; not "int8/", not "INT8"
DTYPES = ("float32", "bfloat16", "float16")


class BodyService(Service):
    """Decoder layers [X, Y) of one model; one KV cache per session."""

    role = "body"

    def __init__(self, model: str, layers: str, dtype: str = "float32"):
        self.checkpoint = Checkpoint(model)
        self.x, self.y = parse_split(layers, self.checkpoint.config.num_hidden_layers)
        self.dtype = parse_dtype(dtype)
        self.body = load_body(self.checkpoint, self.x, self.y, self.dtype)
        self.fingerprint = self.checkpoint.fingerprint
        self.hidden_size = self.checkpoint.config.hidden_size
        self.per_position_bytes = kv_bytes_per_position(self.checkpoint.config, self.y - self.x, self.dtype)
        self.description = f"{public_model_name(model, self.fingerprint)} layers {self.x}:{self.y} ({dtype_name(self.dtype)})"

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

    def open(self, hello: dict, limits) -> "BodySession":
        name = hello.get("codec", "fp32")
        if not isinstance(name, str) or not CODEC_NAME.fullmatch(name):
            raise ProtocolError("bad_codec", f"codec must be a name such as fp16, int8 or int4/channel, got {name!r}")
        try:
            codec = get_codec(name, default_granularity="token")
        except ValueError as error:
            raise ProtocolError("bad_codec", str(error)) from None
        return BodySession(self, self.body.fork(), codec, limits)


class BodySession(SessionHandler):
    """STEP -> RESULT: check the step from its headers, admit it (KV grant), decode, compute once, reply."""

    def __init__(self, service: BodyService, body, codec, limits):
        self.service, self.body, self.codec, self.limits = service, body, codec, limits

    def memory_bytes(self) -> int:
        return self.body.stack.cache_bytes()

    def handle(self, frame_type, body, emit) -> None:
        position, header = self.check_step(frame_type, body)
        self.reserve_kv(position + header.shape[1], self.service.per_position_bytes, self.limits)
        hidden = decode_blob(body, header)
        if not torch.isfinite(hidden).all():
            raise ProtocolError("bad_tensor", "the hidden states contain NaN or infinity")
        out, compute_us = self.compute(hidden, position)
        emit(result_frame(position, compute_us, [out], self.codec))

    def check_step(self, frame_type, body):
        """Everything about a STEP that its headers tell, before anything is decoded or allocated."""
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a body session takes STEP frames, got {frame_type.name}")
        position, headers = parse_step_headers(body)
        if len(headers) != 1:
            raise ProtocolError("bad_step", f"a body STEP carries one tensor, got {len(headers)}")
        header = headers[0]
        if header.codec != self.codec:
            raise ProtocolError("wrong_codec", f"this session's codec is {self.codec.name}; the STEP's tensor is "
                                               f"{header.codec.name}")
        shape, d = header.shape, self.service.hidden_size
        if len(shape) != 3 or shape[0] != 1 or shape[2] != d or shape[1] < 1:
            raise ProtocolError("bad_shape", f"expected hidden states of shape [1, n, {d}], got {list(shape)}")
        if shape[1] > self.limits.max_positions:
            raise ProtocolError("too_many_positions", f"a step of {shape[1]} positions; the limit is "
                                                      f"{self.limits.max_positions} per session")
        cached = self.body.stack.length
        if position > cached:
            raise ProtocolError("out_of_order", f"step starts at position {position} but only {cached} positions are cached")
        return position, header

    def compute(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, int]:
        """The one compute call of a step (what a batched engine replaces): (output, microseconds)."""
        began = time.perf_counter()
        try:
            out = self.body.forward(hidden.to(self.service.dtype), position)
        except LambdaSplitError as error:  # e.g. cutting a sliding-window cache back past its window
            raise ProtocolError("bad_step", str(error)) from None
        return out, int((time.perf_counter() - began) * 1e6)


def kv_bytes_per_position(config, num_layers: int, dtype: torch.dtype) -> int:
    """KV-cache bytes one position takes in `num_layers` layers (keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * num_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class CloudService(Service):
    """The whole model, for the cloud-only baseline: text in, text out, the same generation loop."""

    role = "cloud"

    def __init__(self, model: str, dtype: str = "float32"):
        self.device = DeviceModel.load(model, None, dtype)
        self.fingerprint = self.device.checkpoint.fingerprint
        self.description = f"{public_model_name(model, self.fingerprint)} whole model, cloud mode ({dtype_name(self.device.dtype)})"

    def check_hello(self, hello: dict) -> str | None:
        if hello.get("dtype", "float32") not in DTYPES:
            raise ProtocolError("bad_hello", f"\"dtype\" must be one of {', '.join(DTYPES)}, got {hello.get('dtype')!r}")
        if hello.get("dtype", "float32") != self.device.dtype_name:
            return f"this server runs the model in {self.device.dtype_name}"
        return None

    def open(self, hello: dict, limits) -> "CloudSession":
        return CloudSession(self, limits)


class CloudSession(SessionHandler):
    def __init__(self, service: CloudService, limits):
        self.service, self.limits = service, limits
        base = service.device
        self.device = DeviceModel(base.checkpoint, base.tokenizer, base.head.fork(), base.tail.fork(), base.split, base.dtype)

    def memory_bytes(self) -> int:
        return self.device.head.stack.cache_bytes() + self.device.tail.stack.cache_bytes()

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.GENERATE:
            raise ProtocolError("unexpected_frame", f"a cloud session takes GENERATE frames, got {frame_type.name}")
        request = parse_json(body)
        prompt_ids, prompt, max_new_tokens, sampling, cache = self.check_request(request)
        if prompt_ids is None:
            prompt_ids = self.device.encode(prompt, request.get("chat"))
            if not prompt_ids:
                raise ProtocolError("bad_request", "GENERATE request: the prompt encodes to no tokens")
        config = self.device.checkpoint.config
        self.reserve_kv(len(prompt_ids) + max_new_tokens,
                        kv_bytes_per_position(config, config.num_hidden_layers, self.device.dtype), self.limits)
        streamed = []

        def on_text(piece: str) -> None:
            streamed.append(piece)

        def on_token(token: int) -> None:
            emit(token_frame(token, "".join(streamed)))
            streamed.clear()

        began = time.perf_counter()
        result = self.device.generate(
            prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, cache=cache,
            ignore_eos=request.get("ignore_eos", False), on_text=on_text, on_token=on_token,
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
