"""Device sessions: one request's own head and tail caches over weights loaded once.

A DeviceModel holds the tokenizer and the head and tail weights. A server of many
requests (the gateway) must not let two requests share a KV cache, so each request runs
on `fork_device(device)`: the same modules, fresh caches (LayerStack.fork). On top of
that, `DeviceSession.complete` is one request in any mode with what an API needs beyond
`DeviceModel.generate`: chat messages, stop strings, streaming that never shows part of
a stop string, a finish reason, cancellation, and the bytes that crossed the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.client.remote import CloudClient, RemoteBody
from lambdasplit.errors import LambdaSplitError, UsageError


def fork_device(device: DeviceModel) -> DeviceModel:
    """The same weights and tokenizer with fresh head and tail KV caches."""
    fork = DeviceModel.__new__(DeviceModel)  # skip __init__: it would re-read the generation config
    fork.__dict__.update(device.__dict__)
    fork.head, fork.tail = device.head.fork(), device.tail.fork()
    return fork


def chat_prompt_ids(device: DeviceModel, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, opening the assistant's turn.

    One user message gives exactly `device.encode(text)`, what `lambdasplit generate` sends.
    """
    if not getattr(device.tokenizer, "chat_template", None):
        raise UsageError("this model's tokenizer has no chat template: use /v1/completions with a plain prompt")
    ids = device.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def text_prompt_ids(device: DeviceModel, prompt: str) -> list[int]:
    """A plain text prompt (no chat template), with the tokenizer's special tokens (BOS)."""
    return device.encode(prompt, chat=False)


class Cancelled(LambdaSplitError):
    """The caller stopped wanting the answer (e.g. the HTTP client disconnected)."""


class _Stop(Exception):
    """Raised inside the token callback to end a generation early (a stop string was produced)."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    wire: dict = field(default_factory=dict)  # DeviceSession.wire()
    capture: list = field(default_factory=list)  # (direction, bytes) chunks as a sniffer on the link sees them


class StopStrings:
    """Streams decoded text, holding back anything that may be the start of a stop string."""

    def __init__(self, stop: list[str], on_text=None):
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.sent = ""
        self.final: str | None = None  # the text up to the first stop string, once one appeared

    def update(self, text: str) -> bool:
        """Feed the whole text so far; True when a stop string appeared (the answer ends before it)."""
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.final = text[:min(hits)]
            self._send(self.final)
            return True
        if text.endswith("\ufffd"):
            return False  # an incomplete multi-byte character: wait for the next token
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send(text[:len(text) - hold])
        return False

    def finish(self, text: str) -> str:
        final = self.final if self.final is not None else text
        self._send(final)
        return final

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            if self.on_text:
                self.on_text(piece)


class DeviceSession:
    """One request on a forked device: local, split (body on `server`) or cloud mode.

    `open()` connects (so a caller can report an unreachable server before answering),
    `complete()` generates once, `close()` ends the server session; or use `with`.
    """

    def __init__(self, device: DeviceModel, *, mode: str, server: str | None = None, codec: str = "fp32",
                 token: str | None = None, tls_ca: str | None = None):
        if mode not in ("local", "split", "cloud"):
            raise UsageError(f"mode must be split, local or cloud, not {mode!r}")
        if mode != "local" and not server:
            raise UsageError(f"{mode} mode needs a server HOST:PORT")
        self.device = fork_device(device) if mode != "cloud" else device
        self.mode, self.server, self.codec = mode, server, codec
        self.options = dict(token=token, tls_ca=tls_ca)
        self.capture: list = []  # (direction, bytes) chunks as a sniffer on the link sees them
        self.remote = None  # RemoteBody (split) or CloudClient (cloud) once open

    def open(self) -> "DeviceSession":
        if self.mode == "split" and self.remote is None:
            self.remote = RemoteBody.for_device(self.device, self.server, codec=self.codec, capture=self.capture,
                                                **self.options)
        elif self.mode == "cloud" and self.remote is None:
            self.remote = CloudClient(self.server, fingerprint=self.device.checkpoint.fingerprint,
                                      dtype=self.device.dtype_name, capture=self.capture, **self.options)
        return self

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> "DeviceSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: Sampling, stop: list[str] = (),
                 on_text=None, cancelled=lambda: False) -> Completion:
        """Generate one answer. `on_text(piece)` streams it; `cancelled()` is polled after every token."""
        self.open()
        streamer = StopStrings(list(stop), on_text)
        if self.mode == "cloud":
            return self._cloud(prompt_ids, max_new_tokens, sampling, streamer, cancelled)
        ids: list[int] = []

        def on_token(token: int) -> None:
            ids.append(token)
            if cancelled():
                raise Cancelled("the request was cancelled")
            if streamer.update(self.device.decode(ids)):
                raise _Stop

        try:
            from lambdasplit.client.run import default_refine_gap

            gap = default_refine_gap(self.codec) if self.mode == "split" else 0.0  # as `generate` guards
            result = self.device.generate(prompt_ids, body=self.remote, max_new_tokens=max_new_tokens,
                                          sampling=sampling, on_token=on_token, refine_gap=gap)
            finish = "stop" if result.token_ids and result.token_ids[-1] in self.device.eos_ids else "length"
        except _Stop:
            finish = "stop"
        text = streamer.finish(self.device.decode(ids))
        return Completion(text, ids, len(prompt_ids), finish, self.wire(), self.capture)

    def _cloud(self, prompt_ids, max_new_tokens, sampling, streamer, cancelled) -> Completion:
        # The server runs the loop; a stop string cannot end it early, so the whole answer is
        # generated (and counted) and the text is cut at the stop string here.
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            if cancelled():
                raise Cancelled("the request was cancelled")
            pieces.append(piece)
            if streamer.final is None:
                streamer.update("".join(pieces))

        done = self.remote.generate(list(prompt_ids), max_new_tokens=max_new_tokens, sampling=sampling,
                                    on_text=on_text)
        ids = list(done["token_ids"])
        if streamer.final is None:
            streamer.update(done["text"])
        text = streamer.finish(done["text"])
        stopped = streamer.final is not None or bool(ids and ids[-1] in self.device.eos_ids)
        return Completion(text, ids, len(prompt_ids), "stop" if stopped else "length", self.wire(), self.capture)

    def wire(self) -> dict:
        """What crossed the wire so far: the documented `lambdasplit` field of every gateway response."""
        remote, split = self.remote, self.device.split
        return {
            "mode": self.mode, "split": f"{split[0]}:{split[1]}" if self.mode == "split" else None,
            "codec": self.codec if self.mode == "split" else None,
            "server": self.server if self.mode != "local" else None,
            "bytes_up": remote.bytes_up if remote else 0, "bytes_down": remote.bytes_down if remote else 0,
            "round_trips": remote.round_trips if remote else 0,
        }
