"""One forward for the steps of many sessions: packed (ragged) batching over the family's own layers.

A row is one session's step: its own cache (a `LayerStack` fork), a start position and
hidden states for n >= 1 new positions. `PackedStack.forward(rows)` concatenates every
row's positions into one [1, T, D] sequence (T = sum of n), so the decoder layers' linear
parts (QKV, O, MLP, norms) run once for everybody, with per-token position ids (rotary
embeddings are per token). Attention is the only per-session part:

* the layers call `past_key_values.update(k, v, layer_idx)` before attention; the
  `PackedCache` they get here splits the packed K/V by row and appends each slice to
  that session's own cache (transformers' `DynamicCache`, sliding-window layers kept
  rewindable as in `llm.segments`), which returns what that session's attention sees;
* the config's attention implementation is swapped for `lambdasplit_packed_<inner>`
  (registered with transformers' `AttentionInterface`), which, when the layer's mask
  argument is the `PackedBatch`, calls the family's own attention function (`sdpa`, or
  the family's `eager_attention_forward` with Gemma 2's soft-capping) once per row with
  that row's queries, its own keys and values, and the mask the family's own mask
  builders (`Family.masks`) make for that row's cache: the arithmetic of a solo step.
  Any other call (a plain tensor mask) goes straight to the inner function, so the
  swapped layers still serve ordinary `LayerStack.forward` calls unchanged;
* rows of one position (decodes) are attended together in one call of that function,
  their keys padded to the longest and the padding masked: such a query sees all the
  keys its cache returns, so the padding mask is its whole mask. Longer rows (prefill
  chunks, verify steps) keep their own call and the family's mask; a tree step's row
  (`Row.parents`) gets its tree positions and mask (llm/tree.py) instead.

Why packed, not padded ([B, max_n, D] with 4-D masks over a batch cache assembled
from per-session storage): SARATHI-style batches mix a prefill chunk of many positions
with decode rows of one; padding every row to the chunk length multiplies the linear
work by B * max_n / T (16 decode rows + a 64-position chunk: 1280 padded rows for 80
real ones), and a padded batch cache has to be copied together from the sessions'
storage and split back every step. Packing runs the weights over exactly T rows, keeps
each session's cache where it is, and leaves attention (the only cost that depends on
the cached lengths) at exactly the per-session cost. transformers' own continuous
batching (`generation/continuous_batching`) also packs tokens, but attends with one
block-diagonal SDPA mask over all rows (T x sum of cached lengths work) and is built
around a whole model's `generate`; a body segment with cut-backs needs neither.
The price is a Python loop over the multi-position rows inside each layer's attention
(decode rows share one call); `bench serve` shows where the rest of the cost is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm import tree
from lambdasplit.llm.segments import LayerStack

PACKED_PREFIX = "lambdasplit_packed_"


@dataclass
class Row:
    """One session's step: its cache, where the step starts, hidden states [1, n, D]."""

    stack: LayerStack
    start: int
    hidden: torch.Tensor
    parents: list[int] | None = None  # a tree step (llm/tree.py): its own positions and mask

    @property
    def n(self) -> int:
        return self.hidden.shape[1]


class PackedBatch:
    """What the layers of one packed forward share: row spans, per-row masks and visible K/V.

    It travels to the attention function as the layers' `attention_mask` argument (the
    layers pass that argument through untouched).
    """

    def __init__(self, rows: list[Row], spans: list[tuple[int, int]], masks: list[dict], layer_kinds: dict[int, str]):
        self.rows, self.spans, self.masks, self.layer_kinds = rows, spans, masks, layer_kinds
        self.visible: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}


class PackedCache:
    """The cache the layers see in a packed forward: each row's K/V go to that row's session cache."""

    def __init__(self, batch: PackedBatch):
        self.batch = batch

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        visible = []
        for row, (a, b) in zip(self.batch.rows, self.batch.spans):
            visible.append(row.stack.cache.update(key_states[:, :, a:b], value_states[:, :, a:b], layer_idx))
        self.batch.visible[layer_idx] = visible
        return key_states, value_states  # the attention function reads `visible`, not these


def _inner_attention(name: str, module):
    if name == "eager":  # each family module defines its own (Gemma 2's soft-caps)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _packed_attention_for(inner: str):
    def packed_attention(module, query, key, value, attention_mask, **kwargs):
        attend = _inner_attention(inner, module)
        if not isinstance(attention_mask, PackedBatch):
            return attend(module, query, key, value, attention_mask, **kwargs)
        batch = attention_mask
        kind = batch.layer_kinds[module.layer_idx]
        visible = batch.visible[module.layer_idx]
        outputs: list[torch.Tensor | None] = [None] * len(batch.spans)
        decodes = [i for i, (a, b) in enumerate(batch.spans) if b - a == 1]
        if len(decodes) > 1 and inner in ("sdpa", "eager"):
            for i, out in zip(decodes, _attend_decodes(attend, module, query, batch, visible, decodes, kwargs)):
                outputs[i] = out
        for i, ((a, b), (row_keys, row_values), masks) in enumerate(zip(batch.spans, visible, batch.masks)):
            if outputs[i] is None:
                outputs[i] = attend(module, query[:, :, a:b], row_keys, row_values, masks[kind], **kwargs)[0]
        return torch.cat(outputs, dim=1), None  # [1, T, heads, head_dim]

    return packed_attention


def _attend_decodes(attend, module, query, batch, visible, decodes, kwargs) -> list[torch.Tensor]:
    """One-position rows attended in one call: keys padded to the longest, padding masked.

    A single query at position p sees every key its cache shows it (full attention: 0..p;
    a sliding window: the last `window` positions, which is all the rewindable layer
    returns), so the family's mask for such a row allows every visible key and the only
    mask needed is the padding one. Saves one attention call per row per layer.
    """
    keys = [visible[i][0][0].transpose(0, 1) for i in decodes]  # [L_i, kv_heads, head_dim]
    values = [visible[i][1][0].transpose(0, 1) for i in decodes]
    lengths = torch.tensor([k.shape[0] for k in keys])
    padded_keys = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True).transpose(1, 2)
    padded_values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True).transpose(1, 2)
    valid = (torch.arange(padded_keys.shape[2]) < lengths[:, None])[:, None, None, :]  # [B, 1, 1, L]
    if attend is ALL_ATTENTION_FUNCTIONS["sdpa"]:
        mask = valid
    else:  # eager attention adds its mask to the scores
        mask = torch.zeros(valid.shape, dtype=query.dtype).masked_fill(~valid, torch.finfo(query.dtype).min)
    columns = torch.tensor([batch.spans[i][0] for i in decodes])
    rows_query = query[0][:, columns].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
    out, _ = attend(module, rows_query, padded_keys, padded_values, mask, **kwargs)  # [B, 1, heads, head_dim]
    return list(out.split(1, dim=0))


def install_packed_attention(config) -> None:
    """Route `config`'s layers through the packed attention function (idempotent)."""
    inner = config._attn_implementation or "eager"
    if inner.startswith(PACKED_PREFIX):
        return
    name = PACKED_PREFIX + inner
    AttentionInterface.register(name, _packed_attention_for(inner))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])  # masks as the inner builds them
    config._attn_implementation = name


class PackedStack:
    """A stack of decoder layers that runs the steps of many sessions in one forward.

    Holds no session state: sessions are `LayerStack`s made by `new_session()` (shared
    weights, own cache and length); `forward(rows)` advances each row's session.
    Agnostic of where the layers sit in the model (a body, or a whole stack in cloud mode).
    """

    def __init__(self, stack: LayerStack):
        self.template = stack
        install_packed_attention(stack.config)
        self.layer_kinds = {i: stack.family.layer_type(stack.config, i) for i in stack.layer_indices}

    @property
    def hidden_size(self) -> int:
        return self.template.hidden_size

    def new_session(self) -> LayerStack:
        return self.template.fork()

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """Hidden states out for every row, in order; each row's session cache is advanced."""
        if len({id(row.stack) for row in rows}) != len(rows):
            raise LambdaSplitError("a packed batch holds at most one step per session")
        for row in rows:
            if row.hidden.dim() != 3 or row.hidden.shape[0] != 1 or row.n < 1:
                raise LambdaSplitError(f"a row's hidden states must be [1, n >= 1, D], got {list(row.hidden.shape)}")
            if row.start != row.stack.length:
                row.stack.truncate(row.start)  # a cut-back; raises on a gap (start beyond the cache)
        stack = self.template
        if not stack.layers:
            for row in rows:
                row.stack.length = row.start + row.n
            return [row.hidden for row in rows]
        spans, offset = [], 0
        for row in rows:
            spans.append((offset, offset + row.n))
            offset += row.n
        hidden = torch.cat([row.hidden for row in rows], dim=1)
        position_ids = torch.cat([tree.position_ids(row.start, row.parents)[0] if row.parents is not None
                                  else torch.arange(row.start, row.start + row.n) for row in rows]).unsqueeze(0)
        # Each row's masks exactly as its solo forward builds them, against its own cache.
        masks = [
            tree.masks(row.stack, row.hidden, row.start, row.parents) if row.parents is not None else
            stack.family.masks(stack.config, row.hidden, row.stack.cache, position_ids[:, a:b], stack.layer_indices)
            for row, (a, b) in zip(rows, spans)
        ]
        batch = PackedBatch(rows, spans, masks, self.layer_kinds)
        cache = PackedCache(batch)
        # Per layer type, as the solo forward does (Gemma 3, OLMo 3 rotate local and global layers apart).
        rotations = stack.family.position_embeddings(stack.rotary, stack.config, hidden, position_ids,
                                                     stack.layer_indices)
        try:
            for layer_idx, layer in zip(stack.layer_indices, stack.layers):
                hidden = stack.family.call_layer(
                    layer, hidden, mask=batch, position_embeddings=rotations[self.layer_kinds[layer_idx]],
                    position_ids=position_ids, cache=cache,
                )
        except BaseException:
            for row in rows:  # some layers may hold this step's positions: drop them everywhere
                _crop_every_layer(row.stack, row.start)
            raise
        for row in rows:
            row.stack.length = row.start + row.n
        return [hidden[:, a:b] for a, b in spans]


def _crop_every_layer(stack: LayerStack, length: int) -> None:
    for layer in stack.cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.crop(length)  # an absolute length: layers may disagree on their current one
    stack.length = length
