"""Sessions with a server, from the device's side.

    RemoteBody   the body behind a network session (split mode): hidden states up, hidden states down
    CloudClient  the honest cloud-only baseline: prompt text up, generated text down

Both count every byte through their Transport and every request/response exchange
after the handshake (`round_trips`). Network failures are NetworkError (one line naming
the server); `timeout` bounds every wait (connecting, each answer). A token is never sent
in clear text to a non-loopback host: that needs TLS (`tls_ca`) or `insecure=True`.
"""

from __future__ import annotations

import ipaddress
import os
import time

import torch

from lambdasplit.errors import LambdaSplitError, ProtocolError, RemoteError, UsageError
from lambdasplit.wire.codecs import get_codec
from lambdasplit.wire.frames import (
    PROTOCOL_VERSION, FrameType, TensorStats, json_frame, frame, parse_json, parse_result_seq, parse_token, step_frame,
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


class RemoteBody(Session):
    """Body layers [X, Y) on a server: one STEP/RESULT exchange per step."""

    def __init__(self, address: str, *, fingerprint: str, split: tuple[int, int], dtype: str = "float32",
                 codec: str = "fp32", defense=None, **options):
        self.codec = get_codec(codec, default_granularity="token")
        # A defense (audit/defenses.py) transforms what goes up before it is encoded:
        # anything with `apply(hidden) -> hidden`, e.g. clipping plus calibrated noise.
        self.defense = defense
        self.dtype = dtype
        hello = {"role": "body", "model": fingerprint, "layers": list(split), "dtype": dtype, "codec": self.codec.name}
        self.seq = 0  # STEPs sent in this session (protocol 2 numbers them from 1)
        super().__init__(address, hello, **options)

    @classmethod
    def for_device(cls, device, address: str, **options) -> "RemoteBody":
        """A session for the body that `device` (a DeviceModel) is missing."""
        return cls(address, fingerprint=device.checkpoint.fingerprint, split=device.split,
                   dtype=device.dtype_name, **options)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        sent = self.defense.apply(hidden) if self.defense is not None else hidden
        return self.send_step(sent, start).to(hidden.dtype)

    def send_step(self, sent: torch.Tensor, start: int) -> torch.Tensor:
        """One STEP of exactly `sent` (after any defense) and its RESULT's tensor."""
        self.seq += 1
        self.transport.send(step_frame(start, [sent], self.codec, self.stats, seq=self.seq))
        seq, position, compute_us, tensors = parse_result_seq(self.expect(FrameType.RESULT))
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
