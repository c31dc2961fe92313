"""A transformers-native split model: `model.generate(...)` with head and tail here, the body on a server.

    model = SplitModelForCausalLM.from_pretrained("zoo:smollm2", split="2:28", server="127.0.0.1:8765")
    out = model.generate(input_ids, max_new_tokens=40, repetition_penalty=1.2, streamer=TextStreamer(tok))

It is a `PreTrainedModel` with `GenerationMixin`, so transformers' own logits processors,
stopping criteria, streamers and sampling apply unchanged. The KV caches live in the split
segments (head and tail here, the body's on the server), not in a transformers `Cache`:
generate() runs with `use_cache=False` and hands `forward` the whole sequence each step;
`forward` runs only the positions its segments have not seen (cutting every cache back to
the common prefix with what they hold), so each step is one position and one round trip.
Batch size 1, no padding: a split session is one sequence.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.remote import RemoteBody
from lambdasplit.errors import UsageError


class SplitModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Head [0, X) and tail [Y, N) in this process, body [X, Y) behind a `RemoteBody` session."""

    # Attention runs inside the segments, with their own config; this class only has to pass
    # PreTrainedModel's checks, on a copy of the config so that they change nothing there.
    _supports_sdpa = True
    _can_set_experts_implementation_cached_value = True  # (mixture-of-experts configs carry a setting)

    def __init__(self, device: DeviceModel, body=None):
        super().__init__(copy.deepcopy(device.checkpoint.config))
        self.split_device, self.body = device, body
        # The device-side modules, registered so that `parameters()`, `.dtype` and `.device` work;
        # they are the segments' own modules (shared weights, no copy).
        modules = [device.head.embed, device.tail.norm, device.tail.lm_head, *device.head.stack.layers,
                   *device.tail.stack.layers]
        self.device_modules = torch.nn.ModuleList(modules)
        try:
            self.generation_config = GenerationConfig.from_pretrained(device.checkpoint.folder)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        self.generation_config.use_cache = False  # the caches are the segments'; see the module docstring
        self.seen: list[int] = []  # token ids whose positions every segment's cache holds
        self.eval()

    @classmethod
    def from_pretrained(cls, model: str, *, split: str | None = None, server: str | None = None,
                        dtype: str = "float32", codec: str = "fp32", **session_options) -> "SplitModelForCausalLM":
        """Load head and tail of `model` (Hub id, folder or zoo:NAME) and open a session for the body.

        `split=None` loads the whole model here (local mode, no server); `session_options` go to
        `RemoteBody` (token, tls_ca, link, defense, ...).
        """
        device = DeviceModel.load(model, split, dtype)
        x, y = device.split
        if x == y:
            body = None
        elif server is None:
            raise UsageError(f"split {x}:{y} needs server=HOST:PORT (a server hosting layers {x}:{y})")
        else:
            body = RemoteBody.for_device(device, server, codec=codec, **session_options)
        return cls(device, body)

    @property
    def tokenizer(self):
        return self.split_device.tokenizer

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits of the last `logits_to_keep` positions of `input_ids` (0: all), as a transformers model."""
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise UsageError("SplitModelForCausalLM takes input_ids of shape [1, length] (one sequence per session)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise UsageError("SplitModelForCausalLM does not take padding: pass one unpadded sequence")
        if use_cache or past_key_values is not None:
            raise UsageError("SplitModelForCausalLM keeps its KV caches in the split segments: "
                             "generate with use_cache=False (its default), pass no past_key_values")
        ids = input_ids[0].tolist()
        common = 0
        for old, new in zip(self.seen, ids):
            if old != new:
                break
            common += 1
        wanted = len(ids) if logits_to_keep == 0 else min(logits_to_keep, len(ids))
        start = min(common, len(ids) - wanted)  # recompute what the caller wants logits for
        device = self.split_device
        hidden = device.head.forward(torch.tensor([ids[start:]]), start)
        if self.body is not None:
            hidden = self.body.forward(hidden, start)
        logits = device.tail.forward(hidden, start, last_only=False)[:, -wanted:]
        self.seen = ids
        return CausalLMOutputWithPast(logits=logits)

    def close(self) -> None:
        if self.body is not None and hasattr(self.body, "close"):
            self.body.close()

    def __enter__(self) -> "SplitModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
