"""The device runtime for LLMs: tokenizer + head + tail, and the modes built on them.

    DeviceModel.load(model, split="X:Y")  head [0, X) and tail [Y, N), nothing else
    DeviceModel.load(model)                the whole model (local mode; also what a cloud server runs)
    InProcessBody(load_body(...))         the body in this process (no network: overhead baseline)
    BodyChain([...])                      a body spread over several servers, in layer order
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GenerationConfig

from lambdasplit.errors import UsageError
from lambdasplit.client.generation import GenerationResult, Sampler, Sampling, generate_ids
from lambdasplit.llm.checkpoint import Checkpoint, dtype_name, parse_dtype
from lambdasplit.llm.segments import Body, load_head, load_tail, parse_split


class InProcessBody:
    """A body run in the device's own process: the same split with no network."""

    def __init__(self, body: Body):
        self.body = body
        self.cloud_seconds = 0.0
        self.round_trips = 0

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        began = time.perf_counter()
        out = self.body.forward(hidden, start)
        self.cloud_seconds += time.perf_counter() - began
        self.round_trips += 1
        return out


class BodyChain:
    """Several bodies in sequence, e.g. layers [X, M) on one server and [M, Y) on another."""

    def __init__(self, bodies: list):
        self.bodies = bodies

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        for body in self.bodies:
            hidden = body.forward(hidden, start)
        return hidden

    @property
    def round_trips(self) -> int:
        return sum(getattr(body, "round_trips", 0) for body in self.bodies)

    @property
    def cloud_seconds(self) -> float:
        return sum(getattr(body, "cloud_seconds", 0.0) for body in self.bodies)


@dataclass
class Prompt:
    text: str
    chat: bool | None = None  # None: use the chat template when the tokenizer has one


class DeviceModel:
    """What stays on the user's device: tokenizer, head, tail, sampling."""

    def __init__(self, checkpoint: Checkpoint, tokenizer, head, tail, split: tuple[int, int], dtype: torch.dtype):
        self.checkpoint, self.tokenizer = checkpoint, tokenizer
        self.head, self.tail = head, tail
        self.split, self.dtype = split, dtype
        self.eos_ids = _eos_ids(checkpoint, tokenizer)

    @classmethod
    def load(cls, model: str | Checkpoint, split: str | tuple[int, int] | None = None, dtype="float32") -> "DeviceModel":
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
        n = checkpoint.config.num_hidden_layers
        if split is None:
            x = y = n  # the whole stack in the head; the tail is only norm + LM head
        elif isinstance(split, str):
            x, y = parse_split(split, n)
        else:
            x, y = parse_split(f"{split[0]}:{split[1]}", n)
        dtype = parse_dtype(dtype)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
        head = load_head(checkpoint, x, dtype)
        tail = load_tail(checkpoint, y, dtype, head=head)
        return cls(checkpoint, tokenizer, head, tail, (x, y), dtype)

    @property
    def num_layers(self) -> int:
        return self.checkpoint.config.num_hidden_layers

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids of the prompt; with the chat template when the tokenizer has one (unless chat=False)."""
        use_chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat
        if use_chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, prompt: str | list[int], *, body=None, max_new_tokens: int = 64,
                 sampling: Sampling | None = None, cache: str = "kv", ignore_eos: bool = False,
                 chat: bool | None = None, on_text=None, on_token=None, keep_logits: bool = False,
                 speculate=None, draft_tokens: int | str = "auto", refine_gap: float = 0.0) -> GenerationResult:
        """Generate from a prompt (text, or token ids). `on_text(piece)` streams decoded text.

        `speculate`: a draft source (lambdasplit.speculative.make_source) or None; each step
        then verifies up to `draft_tokens` drafted tokens ("auto": chosen from measurements).
        `refine_gap`: the near-tie guard of a lossy codec (generation.StepModel).
        """
        if body is None and self.split[0] != self.split[1]:
            raise UsageError(f"split {self.split[0]}:{self.split[1]} needs a body (layers the device does not hold)")
        prompt_ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat)
        streamer = _TextStreamer(self, on_text) if on_text else None

        def on_new(token: int) -> None:
            if streamer:
                streamer(token)
            if on_token:
                on_token(token)

        result = generate_ids(
            self.head, body, self.tail, prompt_ids, max_new_tokens=max_new_tokens,
            sampler=Sampler(sampling or Sampling()), eos_ids=self.eos_ids, ignore_eos=ignore_eos,
            cache=cache, on_token=on_new, keep_logits=keep_logits, speculate=speculate, draft_tokens=draft_tokens,
            refine_gap=refine_gap,
        )
        result.text = self.decode(result.token_ids)
        return result


class _TextStreamer:
    """Turns tokens into text pieces as they come (decoding the whole suffix keeps UTF-8 intact)."""

    def __init__(self, device: DeviceModel, on_text):
        self.device, self.on_text = device, on_text
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.device.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        self.on_text(text[len(self.printed):])
        self.printed = text


def _eos_ids(checkpoint: Checkpoint, tokenizer) -> set[int]:
    ids: set[int] = set()
    try:
        generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
        eos = generation_config.eos_token_id
    except OSError:
        eos = getattr(checkpoint.config, "eos_token_id", None)
    # transformers' generate() stops on the generation config's EOS ids; the tokenizer's
    # EOS is only a fallback, so that every mode stops exactly where generate() would.
    for value in (eos,) if eos is not None else (tokenizer.eos_token_id,):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
