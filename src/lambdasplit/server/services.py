"""What a server hosts. A service matches a HELLO and opens sessions.

A session turns one request frame into the response frames. It runs in a worker thread
(model compute must not block the event loop that serves everyone else) and raises
ProtocolError for anything a client got wrong; the server turns that into an ERROR frame
for that session only.
"""

from __future__ import annotations

import time

import torch

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.llm.checkpoint import Checkpoint, dtype_name, parse_dtype
from lambdasplit.llm.segments import load_body, parse_split
from lambdasplit.wire.codecs import get_codec
from lambdasplit.wire.frames import (
    FrameType, json_frame, parse_json, parse_step, result_frame, token_frame,
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
    peers = frozenset()  # the server sets this: the same client's open sessions, this one included

    def client_memory_bytes(self) -> int:
        """KV cache held by this client's other sessions (the limit is per client)."""
        return sum(peer.memory_bytes() for peer in list(self.peers) if peer is not self)

    def check_kv(self, positions: int, per_position_bytes: int, limits) -> None:
        """Refuse a step that would take this client's KV caches over `limits.max_kv_mb`."""
        if positions > limits.max_positions:
            raise ProtocolError("too_many_positions",
                                f"{positions} positions in this session; the limit is {limits.max_positions}")
        mine, others = positions * per_position_bytes, self.client_memory_bytes()
        if mine + others > limits.max_kv_bytes:
            raise ProtocolError(
                "kv_cache_limit",
                f"{positions} positions would need {mine / 2**20:.1f} MiB of KV cache (this client's other sessions "
                f"hold {others / 2**20:.1f} MiB); this server allows {limits.max_kv_bytes / 2**20:.1f} MiB per client",
            )

    def handle(self, frame_type: FrameType, body: memoryview, emit) -> None:
        """Answer one frame by calling emit(frame_bytes) zero or more times."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        return 0


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
        self.description = f"{model} layers {self.x}:{self.y} ({dtype_name(self.dtype)})"

    def check_hello(self, hello: dict) -> str | None:
        if hello.get("layers") != [self.x, self.y]:
            return f"this server hosts layers {self.x}:{self.y} of that model"
        if hello.get("dtype", "float32") != dtype_name(self.dtype):
            return f"this server runs layers {self.x}:{self.y} in {dtype_name(self.dtype)}"
        return None

    def open(self, hello: dict, limits) -> "BodySession":
        try:
            codec = get_codec(str(hello.get("codec", "fp32")), default_granularity="token")
        except ValueError as error:
            raise ProtocolError("bad_codec", str(error)) from None
        return BodySession(self, self.body.fork(), codec, limits)


class BodySession(SessionHandler):
    def __init__(self, service: BodyService, body, codec, limits):
        self.service, self.body, self.codec, self.limits = service, body, codec, limits

    def memory_bytes(self) -> int:
        return self.body.stack.cache_bytes()

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a body session takes STEP frames, got {frame_type.name}")
        position, tensors = parse_step(body)
        if len(tensors) != 1:
            raise ProtocolError("bad_step", f"a body STEP carries one tensor, got {len(tensors)}")
        hidden = tensors[0]
        d = self.service.hidden_size
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != d or hidden.shape[1] < 1:
            raise ProtocolError("bad_shape", f"expected hidden states of shape [1, n, {d}], got {list(hidden.shape)}")
        cached = self.body.stack.length
        if position > cached:
            raise ProtocolError("out_of_order", f"step starts at position {position} but only {cached} positions are cached")
        self.check_kv(position + hidden.shape[1], self.service.per_position_bytes, self.limits)
        began = time.perf_counter()
        try:
            out = self.body.forward(hidden.to(self.service.dtype), position)
        except LambdaSplitError as error:  # e.g. cutting a sliding-window cache back past its window
            raise ProtocolError("bad_step", str(error)) from None
        compute_us = int((time.perf_counter() - began) * 1e6)
        emit(result_frame(position, compute_us, [out], self.codec))



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
        self.description = f"{model} whole model, cloud mode ({dtype_name(self.device.dtype)})"

    def check_hello(self, hello: dict) -> str | None:
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
        try:
            prompt_ids = request.get("prompt_ids")
            if prompt_ids is not None:  # exact token ids (benchmarks); else the prompt text
                vocab = self.device.checkpoint.config.vocab_size
                if not isinstance(prompt_ids, list) or not prompt_ids or not all(
                        isinstance(i, int) and 0 <= i < vocab for i in prompt_ids):
                    raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {vocab})")
            else:
                prompt = str(request["prompt"])
            max_new_tokens = int(request["max_new_tokens"])
            sampling = Sampling(**request.get("sampling", {}))
            cache = request.get("cache", "kv")
            if cache not in ("kv", "none") or max_new_tokens < 0:
                raise ValueError("cache must be kv or none; max_new_tokens >= 0")
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError("bad_request", f"GENERATE request: {error}") from None
        if prompt_ids is None:
            prompt_ids = self.device.encode(prompt, request.get("chat"))
        config = self.device.checkpoint.config
        self.check_kv(len(prompt_ids) + max_new_tokens,
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
            ignore_eos=bool(request.get("ignore_eos", False)), on_text=on_text, on_token=on_token,
        )
        emit(json_frame(FrameType.DONE, {
            "text": result.text, "token_ids": result.token_ids, "prompt_tokens": len(result.prompt_ids),
            "compute_seconds": time.perf_counter() - began,
        }))
