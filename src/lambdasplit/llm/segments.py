"""Head, Body and Tail: contiguous ranges of decoder layers, each with its own KV cache.

    Head  = token embedding (+ absolute positions) + layers [0, X)        device
    Body  = layers [X, Y)                                                 server
    Tail  = layers [Y, N) + final norm + LM head (+ soft-capping)        device

Every segment takes hidden states for `n >= 1` new positions starting at `start` and
returns hidden states for them. A step at `start` < the cached length first cuts the
cache back to `start`: that is how the "no cache" baseline recomputes everything
(start = 0 each step), and how speculative decoding will discard rejected positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

from lambdasplit.errors import LambdaSplitError, SplitError
from lambdasplit.llm import tree
from lambdasplit.llm.checkpoint import Checkpoint, parse_dtype
from lambdasplit.llm.families import Family, family_for
from lambdasplit.llm.small_rows import pad_small_rows  # the LM head only: where 2-3 rows cost most


def parse_split(text: str, num_layers: int) -> tuple[int, int]:
    """'X:Y' -> (X, Y), checked against 0 <= X <= Y <= N."""
    try:
        x_text, y_text = text.split(":")
        x, y = int(x_text), int(y_text)
    except ValueError:
        raise SplitError(f"split must be written X:Y with integers, got {text!r}") from None
    if not 0 <= x <= y <= num_layers:
        raise SplitError(f"split {text} is invalid: need 0 <= X <= Y <= {num_layers} (the model has {num_layers} layers)")
    return x, y


class RewindableSlidingLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window cache layer, keeping every position.

    Attention sees exactly what the stock layer shows it (the last `window - 1` cached
    positions and the new ones, `record_past` mode), so results are bit-equal to the
    unsplit model's; but the cache can be cut back anywhere (speculative rejections,
    replays), which the stock layer cannot do once the window is full.
    """

    def __init__(self, sliding_window: int):
        super().__init__(sliding_window)
        self.record_past = True  # keep the past; `update` returns only the visible window

    def crop(self, max_length: int) -> None:
        DynamicLayer.crop(self, max_length)
        self.cumulative_length = self.keys.shape[-2] if self.is_initialized else 0


class LayerStack:
    """Decoder layers [start, end) of one model, their KV cache, and the length cached so far."""

    def __init__(self, family: Family, config, layers: list, rotary, start: int, end: int):
        self.family, self.config = family, config
        self.layers, self.rotary = layers, rotary
        self.start, self.end = start, end
        self.layer_indices = list(range(start, end))
        self.length = 0
        self.cache = self._new_cache()

    def _new_cache(self) -> DynamicCache:
        # One cache slot per global layer index (attention modules index it by their own
        # layer_idx); slots outside this stack are DummyLayers so masks size against ours.
        # Sliding-window layers are RewindableSlidingLayers: they can be cut back anywhere.
        cache = DynamicCache(config=self.config)
        for i, layer in enumerate(cache.layers):
            if not self.start <= i < self.end:
                cache.layers[i] = DummyLayer()
            elif isinstance(layer, DynamicSlidingWindowLayer):
                cache.layers[i] = RewindableSlidingLayer(layer.sliding_window)
        return cache

    def fork(self) -> "LayerStack":
        """The same layers (shared weights) with a fresh, empty cache: one per session."""
        return LayerStack(self.family, self.config, self.layers, self.rotary, self.start, self.end)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def truncate(self, length: int) -> None:
        """Cut the cache back to `length` positions."""
        if length > self.length:
            raise LambdaSplitError(f"cannot cut a cache of {self.length} positions back to {length}")
        if length == 0:
            self.cache = self._new_cache()
        elif length < self.length:
            try:
                self.cache.crop(-(self.length - length))  # transformers 5: a negative count removes tokens
            except RuntimeError as error:  # a sliding-window layer already dropped those positions
                raise LambdaSplitError(f"cannot cut this cache back to {length} positions: {error}") from None
        self.length = length

    def cache_bytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def compact(self, start: int, keep: list[int]) -> None:
        """After a tree step at `start`: keep only its entries at offsets `keep` (llm/tree.py)."""
        tree.compact(self, start, keep)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, start: int, parents: list[int] | None = None) -> torch.Tensor:
        """`parents`: a tree step (llm/tree.py): tree positions and attention instead of a causal chain."""
        if start != self.length:
            self.truncate(start)  # raises if start is beyond what is cached (a gap)
        n = hidden.shape[1]
        if not self.layers:
            self.length = start + n
            return hidden
        if parents is not None:
            position_ids = tree.position_ids(start, parents)
            masks = tree.masks(self, hidden, start, parents)
        else:
            position_ids = torch.arange(start, start + n).unsqueeze(0)
            masks = self.family.masks(self.config, hidden, self.cache, position_ids, self.layer_indices)
        rotations = self.family.position_embeddings(self.rotary, self.config, hidden, position_ids, self.layer_indices)
        for layer_idx, layer in zip(self.layer_indices, self.layers):
            kind = self.family.layer_type(self.config, layer_idx)
            hidden = self.family.call_layer(
                layer, hidden, mask=masks[kind], position_embeddings=rotations[kind],
                position_ids=position_ids, cache=self.cache,
            )
        self.length = start + n
        return hidden


class Head:
    """Device side, first part: token ids -> hidden states after layer X."""

    def __init__(self, embed, position_embed, stack: LayerStack):
        self.embed, self.position_embed, self.stack = embed, position_embed, stack

    def fork(self) -> "Head":
        return Head(self.embed, self.position_embed, self.stack.fork())

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start: int, parents: list[int] | None = None) -> torch.Tensor:
        hidden = self.stack.family.scale_embeddings(self.stack.config, self.embed(token_ids))
        if self.position_embed is not None:
            positions = tree.position_ids(start, parents) if parents is not None else \
                torch.arange(start, start + token_ids.shape[1]).unsqueeze(0)
            hidden = hidden + self.position_embed(positions)
        return self.stack.forward(hidden, start, parents)


class Body:
    """Server side: hidden states after layer X -> hidden states after layer Y."""

    def __init__(self, stack: LayerStack):
        self.stack = stack

    def fork(self) -> "Body":
        return Body(self.stack.fork())

    def forward(self, hidden: torch.Tensor, start: int, parents: list[int] | None = None) -> torch.Tensor:
        return self.stack.forward(hidden, start, parents)


class Tail:
    """Device side, last part: hidden states after layer Y -> logits."""

    def __init__(self, stack: LayerStack, norm, lm_head, family: Family, config):
        self.stack, self.norm, self.lm_head = stack, norm, lm_head
        self.family, self.config = family, config

    def fork(self) -> "Tail":
        return Tail(self.stack.fork(), self.norm, self.lm_head, self.family, self.config)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        hidden = self.stack.forward(hidden, start)
        if last_only:
            hidden = hidden[:, -1:, :]
        logits = self.lm_head(self.norm(hidden))
        return self.family.logits(self.config, logits)


# ---------------------------------------------------------------- loading


def _stack(checkpoint: Checkpoint, model, family: Family, start: int, end: int) -> LayerStack:
    names = [f"{family.layers}.{i}" for i in range(start, end)]
    if family.rotary:
        names.append(family.rotary)
    checkpoint.load_modules(model, names)
    layers = [model.get_submodule(f"{family.layers}.{i}").eval() for i in range(start, end)]
    rotary = model.get_submodule(family.rotary) if family.rotary else None
    return LayerStack(family, model.config, layers, rotary, start, end)


def _prepare(model: str | Checkpoint, dtype, family: Family | None = None):
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
    family = family or family_for(checkpoint.config)  # an explicit adapter: `lambdasplit check --as-family`
    return checkpoint, family, checkpoint.skeleton(parse_dtype(dtype))


def load_head(model: str | Checkpoint, x: int, dtype="float32", family: Family | None = None) -> Head:
    """Embedding + layers [0, x), and nothing else, from the checkpoint."""
    checkpoint, family, skeleton = _prepare(model, dtype, family)
    modules = [family.embed] + ([family.position_embed] if family.position_embed else [])
    checkpoint.load_modules(skeleton, modules)
    position_embed = skeleton.get_submodule(family.position_embed) if family.position_embed else None
    return Head(skeleton.get_submodule(family.embed), position_embed, _stack(checkpoint, skeleton, family, 0, x))


def load_body(model: str | Checkpoint, x: int, y: int, dtype="float32", family: Family | None = None) -> Body:
    """Layers [x, y) only: never the embedding table or the LM head."""
    checkpoint, family, skeleton = _prepare(model, dtype, family)
    return Body(_stack(checkpoint, skeleton, family, x, y))


def load_tail(model: str | Checkpoint, y: int, dtype="float32", head: Head | None = None,
              family: Family | None = None) -> Tail:
    """Layers [y, N) + final norm + LM head. With tied embeddings, shares `head`'s table when given."""
    checkpoint, family, skeleton = _prepare(model, dtype, family)
    config = checkpoint.config
    n = config.num_hidden_layers
    checkpoint.load_modules(skeleton, [family.norm])
    lm_head = skeleton.get_submodule(family.lm_head)
    tied = getattr(config, "tie_word_embeddings", False) or not checkpoint.has_tensor(
        f"{family.lm_head}.weight", skeleton)
    if tied and head is not None:
        lm_head.to_empty(device="cpu")
        lm_head.weight = head.embed.weight  # the same tensor: no second copy on the device
        if getattr(lm_head, "bias", None) is not None:
            checkpoint.load_modules(skeleton, [family.lm_head])
    else:
        aliases = {family.lm_head: family.embed} if tied else None
        checkpoint.load_modules(skeleton, [family.lm_head], aliases=aliases)
    stack = _stack(checkpoint, skeleton, family, y, n)
    return Tail(stack, skeleton.get_submodule(family.norm).eval(), pad_small_rows(lm_head.eval()), family, config)
