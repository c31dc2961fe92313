"""The device's merged layers: 2 requests per decoder layer instead of 4 (layers.merge_plan).

The family's own decoder layer still runs on the device, unchanged; only its modules are
swapped. In layer i:

    input_layernorm            RecordingNorm: keeps the layer input r (for o_proj's request) and
                               its 1 / rms; layer 0 returns the real norm, later layers return
                               r itself, because their q / k / v came back with the previous
                               layer's down_proj answer as (W_q diag(g)) r, still to be divided
    q_proj, k_proj, v_proj     layer 0: one plain request (SharedLinear); later layers:
                               PendingLinear, the waiting answer times 1 / rms(r)
    o_proj                     MergedRequest: sends [a ; r], gets W_o a (returned: the family
                               adds the residual) and gate / up of norm(r + W_o a) undivided
    post_attention_layernorm   RecordingNorm: keeps h = r + W_o a and 1 / rms(h), returns h
    gate_proj, up_proj         PendingLinear: the waiting answers times 1 / rms(h)
    down_proj                  MergedRequest: sends [m ; h], gets W_down m and the next layer's
                               q / k / v of norm(h + W_down m) undivided; the last layer's
                               down_proj is a plain request (the LM head follows the final norm)

So 1 (layer 0's q / k / v) + 2 per layer + 1 (the LM head) requests per step.
1 / rms is computed exactly as the family's RMSNorm does (float32, rsqrt(mean(h^2) + eps)).
"""

from __future__ import annotations

import torch
from torch import nn

from lambdasplit.errors import LambdaSplitError

# The residual stream has outliers (SmolLM2-135M: |h| up to 2.5e4 at layer 12, above the merged
# gate / up bound of 2.3e4 there): a merged request may drop up to this many fractional bits of its
# input to stay within its bound (SharePair.run). Beyond 2^8 x the bound it is refused, not run.
MAX_INPUT_SHIFT = 8


class LayerSlots:
    """What one decoder layer's modules hand each other during a forward."""

    def __init__(self, index: int):
        self.index = index
        self.residual = self.mid = None  # the layer's input r; h = r + W_o a
        self.scale = {}  # "input" / "post": 1 / rms of that norm's input, [.., n, 1]
        self.marker = {}  # what that norm returned (the projections check they get it)
        self.pending: dict[str, torch.Tensor] = {}  # projection name -> its undivided answer


class RecordingNorm(nn.Module):
    """An RMSNorm folded into the servers' weights: records its input and 1 / rms, returns it undivided."""

    def __init__(self, norm: nn.Module, slots: LayerSlots, kind: str, real: bool):
        super().__init__()
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if self.eps is None:
            raise LambdaSplitError(f"shares: merged layers need the norm's epsilon ({type(norm).__name__} has none)")
        self.real = norm if real else None
        self.slots, self.kind = [slots], kind  # a list: not a registered submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slots = self.slots[0]
        if self.kind == "input":
            slots.residual = hidden
        else:
            slots.mid = hidden
        if self.real is not None:  # layer 0: its q / k / v are a plain request on the real norm
            out = self.real(hidden)
        else:
            h = hidden.to(torch.float32)
            slots.scale[self.kind] = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            out = hidden
        slots.marker[self.kind] = out
        return out


class PendingLinear(nn.Module):
    """A projection whose answer came with an earlier request: that answer times 1 / rms."""

    def __init__(self, name: str, slots: LayerSlots, key: str, kind: str, out_features: int):
        super().__init__()
        self.name, self.key, self.kind, self.out_features = name, key, kind, out_features
        self.slots = [slots]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.slots[0]
        if x is not slots.marker.get(self.kind) or self.key not in slots.pending:
            raise LambdaSplitError(f"shares: {self.name} was called out of the merged order (layer {slots.index})")
        return slots.pending.pop(self.key) * slots.scale[self.kind]


class MergedRequest(nn.Module):
    """o_proj or down_proj: one request on [x ; residual]; its own answer returned, the others left pending."""

    def __init__(self, name: str, indices: list[int], slots: LayerSlots, residual: str, deliver: list, owner,
                 out_features: int):
        super().__init__()
        self.name, self.indices, self.residual, self.out_features = name, indices, residual, out_features
        self.slots = [slots]
        self.deliver = deliver  # [(LayerSlots, projection key)] for indices[1:]
        self.owner = [owner]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = self.owner[0].pair
        if pair is None:
            raise LambdaSplitError("shares: no servers attached (connect first)")
        residual = getattr(self.slots[0], self.residual)
        outs = pair.run(self.indices, [x, residual], max_shift=MAX_INPUT_SHIFT)
        for (slots, key), out in zip(self.deliver, outs[1:]):
            slots.pending[key] = out
        return outs[0]


def wire_merged(layers: list[nn.Module], plan: list, owner, family) -> None:
    """Swap the loaded layers' norms and shared proxies for their merged forms (indices from `plan`)."""
    index_of = {(entry if isinstance(entry, str) else entry.name): i for i, entry in enumerate(plan)}
    slots = [LayerSlots(i) for i in range(len(layers))]
    prefix = family.layers
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm = RecordingNorm(layer.input_layernorm, slots[i], "input", real=i == 0)
        layer.post_attention_layernorm = RecordingNorm(layer.post_attention_layernorm, slots[i], "post", real=False)
        if i == 0:
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, p).index = index_of[f"{prefix}.0.self_attn.{p}"]
        else:
            for p in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, p, PendingLinear(f"{prefix}.{i}.self_attn.{p}", slots[i], p, "input",
                                               getattr(attn, p).out_features))
        o_name = f"{prefix}.{i}.self_attn.o_proj"
        gate_up = [index_of[f"{prefix}.{i}.mlp.{p}(post_attention_layernorm(o_proj + residual))"]
                   for p in ("gate_proj", "up_proj")]
        attn.o_proj = MergedRequest(o_name, [index_of[o_name], *gate_up], slots[i], "residual",
                                    [(slots[i], "gate_proj"), (slots[i], "up_proj")], owner, attn.o_proj.out_features)
        for p in ("gate_proj", "up_proj"):
            setattr(mlp, p, PendingLinear(f"{prefix}.{i}.mlp.{p}", slots[i], p, "post", getattr(mlp, p).out_features))
        down_name = f"{prefix}.{i}.mlp.down_proj"
        if i == len(layers) - 1:
            mlp.down_proj.index = index_of[down_name]
            continue
        qkv = [index_of[f"{prefix}.{i + 1}.self_attn.{p}(input_layernorm(layers.{i}.mlp.down_proj + residual))"]
               for p in ("q_proj", "k_proj", "v_proj")]
        mlp.down_proj = MergedRequest(down_name, [index_of[down_name], *qkv],
                                      slots[i], "mid", [(slots[i + 1], p) for p in ("q_proj", "k_proj", "v_proj")],
                                      owner, mlp.down_proj.out_features)
