"""The compute behind the gateway: weights loaded once, one device session per request.

    TextEngine   DeviceModel (head + tail, or the whole model in local mode) and the body
                 servers; every request gets its own DeviceSession (forked KV caches, its
                 own server session), so concurrent requests never share state
    ImageEngine  the diffusion device side (text encoder, scheduler, VAE decoder) and the
                 U-Net server; one image at a time (a diffusers scheduler keeps per-run state)
    Recent       the last requests' wire views, for the page's panel

Several servers (`--server A,B`) each host the same body; requests take them in turn and
skip one that does not answer.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.session import DeviceSession
from lambdasplit.errors import LambdaSplitError, UsageError
from lambdasplit.gateway import privacy, wire


class Unreachable(LambdaSplitError):
    """No server answered (the gateway's 503)."""


def is_connection_error(error: BaseException) -> bool:
    # Transport raises LambdaSplitError("cannot connect ...") from an OSError (context kept)
    return isinstance(error, OSError) or isinstance(getattr(error, "__context__", None), OSError)


class Recent:
    """The wire views of the last `size` requests, by request id."""

    def __init__(self, size: int = 32):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def add(self, request_id: str, view: dict) -> None:
        with self.lock:
            self.items[request_id] = view
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def get(self, request_id: str) -> dict | None:
        with self.lock:
            return self.items.get(request_id)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Servers:
    def __init__(self, servers: list[str]):
        self.servers = servers
        self._turn = itertools.cycle(range(len(servers))) if servers else None
        self._lock = threading.Lock()

    def in_turn(self) -> list[str]:
        """Every server, starting with the next one in turn."""
        if not self.servers:
            return [None]
        with self._lock:
            first = next(self._turn)
        return self.servers[first:] + self.servers[:first]


class TextEngine:
    def __init__(self, model: str, *, mode: str = "split", servers: list[str] = (), split: str | None = None,
                 codec: str = "fp32", dtype: str = "float32", token: str | None = None, tls_ca: str | None = None,
                 device: DeviceModel | None = None):
        if mode not in ("split", "local", "cloud"):
            raise UsageError(f"mode must be split, local or cloud, not {mode!r}")
        if mode == "split" and not split:
            raise UsageError("split mode needs --split X:Y")
        if mode != "local" and not servers:
            raise UsageError(f"{mode} mode needs --server HOST:PORT")
        self.model, self.mode, self.codec = model, mode, codec
        self.servers = _Servers(list(servers) if mode != "local" else [])
        self.options = dict(token=token, tls_ca=tls_ca)
        if device is None:
            from lambdasplit.llm.checkpoint import Checkpoint

            checkpoint = Checkpoint(model)
            # cloud mode needs only the tokenizer and the EOS ids: load no layers (0:N)
            layers = {"split": split, "local": None, "cloud": f"0:{checkpoint.config.num_hidden_layers}"}[mode]
            device = DeviceModel.load(checkpoint, layers, dtype)
        self.device = device
        self.split = f"{device.split[0]}:{device.split[1]}" if mode == "split" else None
        self.recent = Recent()
        self.created = int(time.time())

    @property
    def max_positions(self) -> int:
        return int(getattr(self.device.checkpoint.config, "max_position_embeddings", 0) or 2**31)

    def open_session(self) -> DeviceSession:
        """A connected session on the next server that answers; Unreachable when none does."""
        reasons = []
        for server in self.servers.in_turn():
            session = DeviceSession(self.device, mode=self.mode, server=server, codec=self.codec, **self.options)
            try:
                return session.open()
            except LambdaSplitError as error:
                if not is_connection_error(error):
                    raise
                reasons.append(str(error))
        raise Unreachable("body server unreachable: " + "; ".join(reasons))

    def privacy(self) -> dict:
        return privacy.text_statement(self.model, self.mode, self.split)

    def describe(self) -> dict:
        return {"kind": "text", "model": self.model, "mode": self.mode, "split": self.split,
                "codec": self.codec if self.mode == "split" else None, "servers": self.servers.servers,
                "privacy": self.privacy()}

    def record(self, request_id: str, completion, prompt_text: str, max_new_tokens: int, sampling: dict) -> dict:
        """Keep this request's wire view for the panel; returns it."""
        view = {"id": request_id, "kind": "text", **completion.wire,
                "prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids)}
        if self.mode != "local":
            secrets = {"prompt": prompt_text, "answer": completion.text}
            ids = {"answer": completion.token_ids}
            view["capture"] = wire.describe(completion.capture, secrets, ids,
                                            wire.llm_hidden_picture if self.mode == "split" else None)
        else:
            view["capture"] = None
        view["cloud_only"] = wire.cloud_only_view(prompt_text, completion.text, max_new_tokens, sampling)
        view["privacy"] = self.privacy()
        self.recent.add(request_id, view)
        return view


class ImageEngine:
    def __init__(self, model: str, *, server: str, codec: str = "fp32", token: str | None = None,
                 tls_ca: str | None = None):
        from lambdasplit.diffusion.commands import quiet_loaders
        from lambdasplit.diffusion.split import Device

        quiet_loaders()
        self.model, self.server, self.codec = model, server, codec
        self.options = dict(token=token, tls_ca=tls_ca)
        self.device = Device.load(model)
        self.lock = threading.Lock()  # the scheduler keeps per-run state: one image at a time
        self.recent: Recent | None = None  # shared with the text engine's by the app

    def default_size(self) -> int:
        return self.device.info.default_size()

    def privacy(self) -> dict:
        return privacy.image_statement(self.model)

    def describe(self) -> dict:
        return {"kind": "image", "model": self.model, "mode": "split", "codec": self.codec, "server": self.server,
                "size": self.default_size(), "privacy": self.privacy()}

    def generate(self, prompt: str, *, size: int | None, seed: int, steps: int | None):
        """One split image: (ImageResult, wire view)."""
        from lambdasplit.diffusion.client import imagine
        from lambdasplit.diffusion.commands import wire_picture

        capture: list = []
        with self.lock:
            try:
                result = imagine(self.device, prompt, mode="split", server=self.server, steps=steps, seed=seed,
                                 size=(size, size) if size else None, codec=self.codec, keep_wire=(0,),
                                 capture=capture, **self.options)
            except LambdaSplitError as error:
                if is_connection_error(error):
                    raise Unreachable(f"U-Net server unreachable: {error}") from None
                raise
        record = result.record
        view = {"kind": "image", "mode": "split", "split": "U-Net on the server", "codec": self.codec,
                "server": self.server, "bytes_up": record["bytes_up"], "bytes_down": record["bytes_down"],
                "round_trips": record["round_trips"], "steps": record["steps"], "seed": seed}
        view["capture"] = wire.describe(capture, {"prompt": prompt})
        if 0 in result.wire:
            view["capture"]["picture"] = _data_url(wire_picture(result.wire[0]))
            view["capture"]["picture_label"] = "predicted noise of step 0, as received after the codec"
        up = wire.cloud_only_frames({"prompt": prompt, "negative_prompt": None, "steps": record["steps"], "seed": seed,
                                     "guidance": record["guidance"], "size": [size, size] if size else None})
        view["cloud_only"] = {"hex": wire.hex_dump(up), "bytes_up": len(up),
                              "search": wire.search({"up": up}, {"prompt": prompt}),
                              "note": "built with the same frame encoder as `imagine --mode cloud`, not sent; "
                                      "the server would also send the finished image back"}
        view["privacy"] = self.privacy()
        return result, view


def _data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
