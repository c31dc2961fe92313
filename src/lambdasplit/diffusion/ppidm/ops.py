"""One PPIDM request on the wire, and the arithmetic a shard server does for it.

A STEP frame (u32 position = the request's sequence number in the session) carries one or
more operations: first an fp32 header tensor [k, 6], one row per operation, then each
operation's tensors in order. The RESULT carries one tensor per operation.

    row                                  tensors up            tensor down
    [1, conv, top, bottom, left, right]  x block (+ halo)      conv output block
    [2, 0, groups, 0, 0, 0]              x block               [B, groups, 2] (mean, variance) of the block
    [3, slot, kv, 0, 0, 0]               q chunk, k, v         attention output for the q chunk
                                         (kv=2: q chunk only; the k, v stored under `slot`
                                         by an earlier kv=1 request: cross-attention's
                                         text K, V are the same at every step)
    [4, conv, top, bottom, left, right]  x block (+ halo)      conv output block, and [B, C, 2]
                                                               per-channel (mean, variance) of it
                                         (when a group norm reads that output, plus at most a
                                         per-channel offset: the device derives the norm's
                                         statistics and saves it a round trip)

`conv` indexes the U-Net's Conv2d modules in module order (`conv_names`), which both
sides derive from unet/config.json (the HELLO's fingerprint pins it). Feature tensors go
through the session's codecs; the header and the group-norm statistics are always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lambdasplit.errors import ProtocolError

CONV, GROUP_NORM, ATTENTION, CONV_STATS = 1, 2, 3, 4
KINDS = {CONV: "conv", GROUP_NORM: "group_norm", ATTENTION: "attention", CONV_STATS: "conv"}
CONV_KINDS = (CONV, CONV_STATS)
KV_SENT, KV_STORE, KV_STORED = 0, 1, 2
MAX_OPS = 64
MAX_SLOTS = 1024


@dataclass
class Op:
    kind: int
    header: list[int]  # the five values after the kind
    tensors: list[torch.Tensor] = field(default_factory=list)
    # device-side bookkeeping, never sent
    layer: str = ""


def conv_names(unet) -> list[str]:
    return [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Conv2d)]


def header_tensor(ops: list[Op]) -> torch.Tensor:
    return torch.tensor([[op.kind, *op.header] for op in ops], dtype=torch.float32)


def tensors_per_op(kind: int, kv: int) -> int:
    return 3 if kind == ATTENTION and kv != KV_STORED else 1


def results_per_op(kind: int) -> int:
    return 2 if kind == CONV_STATS else 1


def parse_ops(tensors: list[torch.Tensor]) -> list[Op]:
    """The operations of one STEP frame (the inverse of header_tensor + the tensors in order)."""
    if not tensors:
        raise ProtocolError("bad_step", "a unet-shard STEP starts with its operation header")
    header = tensors[0]
    if header.dim() != 2 or header.shape[1] != 6 or not 1 <= header.shape[0] <= MAX_OPS \
            or not torch.equal(header, header.round()):
        raise ProtocolError("bad_step", f"the operation header must be [1..{MAX_OPS}, 6] integers, "
                                        f"got {list(header.shape)}")
    ops, offset = [], 1
    for row in header.long().tolist():
        kind, values = row[0], row[1:]
        if kind not in KINDS:
            raise ProtocolError("bad_step", f"unknown operation {kind} (1 conv, 2 group norm, 3 attention, "
                                            "4 conv with channel statistics)")
        count = tensors_per_op(kind, values[1])
        ops.append(Op(kind, values, tensors[offset:offset + count]))
        if len(ops[-1].tensors) != count:
            raise ProtocolError("bad_step", "fewer tensors than the operation header announces")
        offset += count
    if offset != len(tensors):
        raise ProtocolError("bad_step", f"{len(tensors) - offset} tensors more than the operation header announces")
    return ops


def conv_block(x: torch.Tensor, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """The conv of one block: the server adds the border's zero padding, then convolves without padding."""
    top, bottom, left, right = pads
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group mean and (biased) variance of one block, computed in float64: [B, groups, 2]."""
    values = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack([values.mean(-1), values.var(-1, unbiased=False)], dim=-1).float()


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and (biased) variance of one block, computed in float64: [B, C, 2]."""
    return group_stats(x, x.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What diffusers' AttnProcessor2_0 computes for these query rows (no mask, no dropout)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
