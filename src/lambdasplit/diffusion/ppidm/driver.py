"""The device side of PPIDM: the U-Net with proxy layers that fan out to n shard servers.

`ShardedUNet.load` builds the pipeline's UNet2DConditionModel from its config, swaps every
Conv2d for a `ShardedConv` and every GroupNorm for a `ShardedGroupNorm` (both hold no
convolution weights), gives every Attention module a `ShardedAttention` processor, and
reads from the safetensors only the weights the device computes with (time embedding,
linear projections, layer norms, group-norm affine parameters). The result is still a
diffusers U-Net, so the ordinary denoising loop (diffusion/client.py `denoise`) drives it:
each proxy, when called, cuts its input (blocks.py), sends each server its part through a
`ShardPool`, waits for all n answers and reassembles them.

Modes: exact (halo-exact convolution, group-norm statistics combined over all blocks,
split-Q attention: equals the unsplit U-Net to float rounding) and paper (each block is
normalized with its own statistics, as the paper's PPIGN; not exact).

Every exchange is one round trip, fanned out to all servers (sent to each, then each
answer read; the servers work in parallel). With `batching` (the default) one round trip
carries more than one layer where diffusers' data flow allows it (`plan_batching`):

    skip conv      a resnet's 1x1 conv_shortcut reads the block's input, known before conv1:
                   it rides in conv1's frame, its blocks beside conv1's
    fused stats    a group norm whose input is a convolution's output, plus at most a
                   per-channel offset (resnet norm2: conv1 + time embedding; the first
                   norm1 after conv_in and after each downsampler: the conv's output
                   itself): that convolution's request asks the servers for per-channel
                   mean and variance of the output block they computed anyway (CONV_STATS),
                   and the device derives the group statistics, offset included; the norm
                   costs no round trip and no upload, and no server learns anything new

The device checks at run time that the norm's input is that output (plus the offset,
recomputed and compared bit for bit) and falls back to a round trip if not. `Traffic`
keeps, per layer type, the bytes of every frame sent to and received from each server
(a batched frame counts as one conv exchange), the wall time of the exchanges, and the
FLOPs the servers did.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.ppidm.blocks import PartitionError, conv_blocks, plain_blocks, query_chunks
from lambdasplit.errors import LambdaSplitError, UnsupportedModelError

MODES = ("exact", "paper")
SMALL_MAPS = ("refuse", "local")
KIND_NAMES = {wire_ops.CONV: "conv", wire_ops.GROUP_NORM: "group_norm", wire_ops.ATTENTION: "attention"}


@dataclass
class KindTraffic:
    exchanges: int = 0
    seconds: float = 0.0
    server_flops: float = 0.0
    up: list[int] = field(default_factory=list)  # bytes per server (whole frames)
    down: list[int] = field(default_factory=list)
    per_layer_up: list[int] = field(default_factory=list)  # one server's upload per exchange (min / max per layer)
    per_layer_down: list[int] = field(default_factory=list)


@dataclass
class Traffic:
    """Per layer type: frames' bytes to / from each server, time, server FLOPs; plus what ran locally."""

    n: int
    kinds: dict[str, KindTraffic] = field(default_factory=dict)
    local_layers: dict[str, str] = field(default_factory=dict)  # layer -> why it ran on the device
    local_flops: float = 0.0  # conv / attention FLOPs of layers kept on the device (small maps)

    def kind(self, name: str) -> KindTraffic:
        if name not in self.kinds:
            self.kinds[name] = KindTraffic(up=[0] * self.n, down=[0] * self.n)
        return self.kinds[name]

    @property
    def round_trips(self) -> int:
        return sum(k.exchanges for k in self.kinds.values())

    def summary(self, steps: int) -> dict:
        """Per denoising step, per layer type: what the paper's Tables VIII-X report (MB = 1e6 bytes)."""
        out = {}
        for name, k in self.kinds.items():
            ups, downs = k.per_layer_up or [0], k.per_layer_down or [0]
            out[name] = {
                "exchanges_per_step": k.exchanges / steps,
                "up_bytes_per_server_per_step": [b / steps for b in k.up],
                "down_bytes_per_server_per_step": [b / steps for b in k.down],
                "up_min_layer_bytes": min(ups), "up_max_layer_bytes": max(ups),
                "down_min_layer_bytes": min(downs), "down_max_layer_bytes": max(downs),
                "seconds_per_step": k.seconds / steps,
                "server_flops_per_step": k.server_flops / steps,
            }
        return out


class ShardPool:
    """n shards (RemoteShard sessions or LocalShard), one exchange at a time, fanned out."""

    def __init__(self, shards: list, traffic: Traffic | None = None):
        self.shards = shards
        self.traffic = traffic or Traffic(len(shards))
        self.server_seconds = 0.0  # per exchange the slowest server's compute, summed
        self.stored_kv: dict[int, torch.Tensor] = {}  # attention slot -> the K the servers hold

    @property
    def n(self) -> int:
        return len(self.shards)

    def run(self, kind: int, per_server: list[list[wire_ops.Op]], flops: float = 0.0) -> list[list[torch.Tensor]]:
        began = time.perf_counter()
        sizes_up = [shard.send(server_ops) for shard, server_ops in zip(self.shards, per_server)]
        answers = [shard.receive() for shard in self.shards]
        stats = self.traffic.kind(KIND_NAMES[kind])
        stats.exchanges += 1
        stats.seconds += time.perf_counter() - began
        stats.server_flops += flops
        for i, (up, (_, down, _)) in enumerate(zip(sizes_up, answers)):
            stats.up[i] += up
            stats.down[i] += down
        stats.per_layer_up.append(sizes_up[0])
        stats.per_layer_down.append(answers[0][1])
        self.server_seconds += max(seconds for _, _, seconds in answers)
        return [tensors for tensors, _, _ in answers]

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class ShardedConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, index: int, name: str, owner: "ShardedUNet"):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedModelError(f"{name}: only zero-padded convolutions with integer padding can be cut into blocks")
        self.index, self.name, self.owner = index, name, [owner]  # a list: not a registered submodule
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.local: nn.Conv2d | None = None
        self.feeds: ShardedGroupNorm | None = None  # batching: the norm that reads this conv's output
        self.shortcut: tuple[ShardedConv, int] | None = None  # batching: (conv_shortcut, its resnet's id), for conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        ready = owner.precomputed.pop(self.name, None)
        if ready is not None and (ready[0] is x or _same(ready[0], x)):
            return ready[1]  # computed in an earlier layer's round trip (batching)
        try:
            blocks = self.blocks(x)
        except PartitionError as error:
            return owner.run_locally(self, error, lambda: F.conv2d(x, *self._local_weights(), self.stride, self.padding,
                                                                   self.dilation, self.groups))
        stats = owner.batching and self.feeds is not None
        per_server = self.ops(x, blocks, wire_ops.CONV_STATS if stats else wire_ops.CONV)
        flops = self.flops(x.shape[0], blocks[-1].out_rows[1], blocks[-1].out_cols[1])
        carried = self.carried_shortcut(owner)
        if carried is not None:
            shortcut, shortcut_x, shortcut_blocks = carried
            for ops, extra in zip(per_server, shortcut.ops(shortcut_x, shortcut_blocks, wire_ops.CONV)):
                ops.extend(extra)
            flops += shortcut.flops(shortcut_x.shape[0], shortcut_blocks[-1].out_rows[1], shortcut_blocks[-1].out_cols[1])
        answers = owner.pool.run(wire_ops.CONV, per_server, flops)
        results = iter(zip(*answers))  # per op position: the n servers' tensors
        out = self.assemble(x, blocks, next(results))
        if stats:
            owner.fused_stats[self.feeds.name] = (out, [piece.double() for piece in next(results)])
        if carried is not None:
            owner.precomputed[shortcut.name] = (shortcut_x, shortcut.assemble(shortcut_x, shortcut_blocks, next(results)))
        return out

    def blocks(self, x: torch.Tensor):
        return conv_blocks(*x.shape[2:], self.owner[0].pool.n, self.kernel_size, self.stride, self.padding, self.dilation,
                           what=self.name)

    def ops(self, x: torch.Tensor, blocks, kind: int) -> list[list[wire_ops.Op]]:
        return [[wire_ops.Op(kind, [self.index, *b.pads], [x[:, :, b.in_rows[0]:b.in_rows[1], b.in_cols[0]:b.in_cols[1]]],
                             self.name)] for b in blocks]

    def carried_shortcut(self, owner):
        """The resnet's conv_shortcut and its input, if it can ride in this (conv1's) frame."""
        if not owner.batching or self.shortcut is None:
            return None
        shortcut, resnet = self.shortcut
        shortcut_x = owner.resnet_inputs.pop(resnet, None)
        if shortcut_x is None:
            return None
        try:
            return shortcut, shortcut_x, shortcut.blocks(shortcut_x)
        except PartitionError:
            return None  # computed (or refused) when the resnet calls it

    def assemble(self, x: torch.Tensor, blocks, pieces) -> torch.Tensor:
        out_h, out_w = blocks[-1].out_rows[1], blocks[-1].out_cols[1]
        out = x.new_empty(x.shape[0], self.out_channels, out_h, out_w)
        for b, piece in zip(blocks, pieces):
            expected = (x.shape[0], self.out_channels, b.out_rows[1] - b.out_rows[0], b.out_cols[1] - b.out_cols[0])
            if tuple(piece.shape) != expected:
                raise LambdaSplitError(f"{self.name}: a shard returned {list(piece.shape)}, expected {list(expected)}")
            out[:, :, b.out_rows[0]:b.out_rows[1], b.out_cols[0]:b.out_cols[1]] = piece
        return out

    def flops(self, batch: int, out_h: int, out_w: int) -> float:
        k = self.kernel_size[0] * self.kernel_size[1] * self.in_channels // self.groups
        return 2.0 * batch * self.out_channels * k * out_h * out_w

    def _local_weights(self):
        if self.local is None:
            self.local = self.owner[0].read_tensors([f"{self.name}.weight", f"{self.name}.bias"])
        return self.local


class ShardedGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, name: str, owner: "ShardedUNet"):
        super().__init__()
        if not norm.affine:
            raise UnsupportedModelError(f"{name}: group norm without affine parameters is not handled")
        self.num_groups, self.num_channels, self.eps, self.name, self.owner = (
            norm.num_groups, norm.num_channels, norm.eps, name, [owner])
        self.weight = nn.Parameter(torch.empty(norm.num_channels, device="meta"))
        self.bias = nn.Parameter(torch.empty(norm.num_channels, device="meta"))
        self.offset_of: int | None = None  # batching: the resnet whose time embedding is added to the conv output

    def fused(self, x: torch.Tensor):
        """Block statistics [B, G, 2] derived from the feeding conv's per-channel ones, or None."""
        owner = self.owner[0]
        fed = owner.fused_stats.pop(self.name, None)
        if fed is None:
            return None
        out, channel_stats = fed
        if x is out:
            offset = None
        else:
            offset = owner.time_offsets.get(self.offset_of) if self.offset_of is not None else None
            if offset is None or offset.shape != out.shape[:2] or not _same(x, out + offset[:, :, None, None]):
                return None
        stats = []
        for s in channel_stats:
            if tuple(s.shape) != (*out.shape[:2], 2):
                raise LambdaSplitError(f"{self.name}: a shard returned channel statistics of shape {list(s.shape)}")
            means, variances = s[..., 0], s[..., 1]
            if offset is not None:
                means = means + offset.double()
            means = means.reshape(x.shape[0], self.num_groups, -1)
            variances = variances.reshape(x.shape[0], self.num_groups, -1)
            mean = means.mean(-1)
            stats.append(torch.stack([mean, (variances + (means - mean[..., None]) ** 2).mean(-1)], dim=-1))
        return stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        stats = self.fused(x) if x.dim() == 4 else None
        if stats is not None:
            return self.apply_stats(x, plain_blocks(*x.shape[2:], owner.pool.n, what=self.name), stats)
        if x.dim() != 4:
            return owner.run_locally(self, PartitionError(f"{self.name}: a {x.dim()}-d input is not a feature map"),
                                     lambda: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        try:
            blocks = plain_blocks(*x.shape[2:], owner.pool.n, what=self.name)
        except PartitionError as error:
            return owner.run_locally(self, error, lambda: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        per_server = [[wire_ops.Op(wire_ops.GROUP_NORM, [0, self.num_groups, 0, 0, 0],
                                   [x[:, :, b.in_rows[0]:b.in_rows[1], b.in_cols[0]:b.in_cols[1]]], self.name)]
                      for b in blocks]
        answers = owner.pool.run(wire_ops.GROUP_NORM, per_server, 3.0 * x.numel())
        stats = [piece.double() for (piece,) in answers]  # [B, G, 2] each
        return self.apply_stats(x, blocks, stats)

    def apply_stats(self, x: torch.Tensor, blocks, stats: list[torch.Tensor]) -> torch.Tensor:
        owner = self.owner[0]
        for piece in stats:
            if tuple(piece.shape) != (x.shape[0], self.num_groups, 2):
                raise LambdaSplitError(f"{self.name}: a shard returned statistics of shape {list(piece.shape)}")
        if owner.mode == "exact":
            # Every block has the same number of values, so the global mean is the mean of the
            # block means and the global variance the mean of (block variance + squared offset).
            means = torch.stack([s[..., 0] for s in stats])
            variances = torch.stack([s[..., 1] for s in stats])
            mean = means.mean(0)
            var = (variances + (means - mean) ** 2).mean(0)
            return self._normalize(x, mean, var)
        out = torch.empty_like(x)
        for b, s in zip(blocks, stats):
            region = (slice(None), slice(None), slice(*b.in_rows), slice(*b.in_cols))
            out[region] = self._normalize(x[region], s[..., 0], s[..., 1])
        return out

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        rstd = torch.rsqrt(var + self.eps)
        grouped = x.reshape(batch, self.num_groups, -1)
        y = ((grouped.double() - mean[..., None]) * rstd[..., None]).float().reshape(x.shape)
        return y * self.weight.view(1, channels, 1, 1) + self.bias.view(1, channels, 1, 1)


class ShardedAttention:
    """An attention processor: AttnProcessor2_0's arithmetic with the attention itself on the shards."""

    def __init__(self, slot: int, name: str, owner: "ShardedUNet"):
        self.slot, self.name, self.owner = slot, name, owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise UnsupportedModelError(f"{self.name}: attention masks are not supported by ppidm")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(query, key, value, cross)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, query, key, value, cross: bool) -> torch.Tensor:
        owner = self.owner
        pool = owner.pool
        try:
            chunks = query_chunks(query.shape[2], pool.n, what=self.name)
        except PartitionError as error:
            return owner.run_locally(self, error, lambda: wire_ops.attend(query, key, value))
        # Cross-attention's K, V come from the prompt embeddings alone: the same at every
        # step of one generation, so the servers keep them after the first step.
        stored = pool.stored_kv.get(self.slot)
        if cross and stored is not None and torch.equal(stored, key):
            kv, extra = wire_ops.KV_STORED, []
        else:
            kv, extra = (wire_ops.KV_STORE if cross else wire_ops.KV_SENT), [key, value]
            if cross:
                pool.stored_kv[self.slot] = key
        per_server = [[wire_ops.Op(wire_ops.ATTENTION, [self.slot, kv, 0, 0, 0], [query[:, :, a:b], *extra], self.name)]
                      for a, b in chunks]
        flops = 4.0 * query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] * query.shape[3]
        answers = owner.pool.run(wire_ops.ATTENTION, per_server, flops)
        return torch.cat([piece for (piece,) in answers], dim=2)


class ShardedUNet:
    """The device's U-Net for PPIDM. `unet` is a diffusers UNet2DConditionModel whose heavy layers are proxies."""

    def __init__(self, folder: Path, unet, mode: str, small_maps: str, batching: bool = True):
        self.folder, self.unet, self.mode, self.small_maps, self.batching = folder, unet, mode, small_maps, batching
        self.pool: ShardPool | None = None
        # batching state, per U-Net call: results computed ahead, what the fused norms need
        self.precomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # conv -> (its input, its output)
        self.fused_stats: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # norm -> (conv out, channel stats)
        self.resnet_inputs: dict[int, torch.Tensor] = {}
        self.time_offsets: dict[int, torch.Tensor] = {}

    @classmethod
    def load(cls, folder: Path, *, mode: str = "exact", small_maps: str = "refuse") -> "ShardedUNet":
        from diffusers import UNet2DConditionModel

        if mode not in MODES:
            raise LambdaSplitError(f"--ppidm-mode must be one of {', '.join(MODES)}, not {mode!r}")
        if small_maps not in SMALL_MAPS:
            raise LambdaSplitError(f"--ppidm-small-maps must be one of {', '.join(SMALL_MAPS)}, not {small_maps!r}")
        self = cls.skeleton(UNet2DConditionModel.load_config(folder / "unet"), mode=mode, small_maps=small_maps)
        self.folder = folder
        state = self.read_tensors(sorted(self.unet.state_dict()), as_dict=True)
        self.unet.load_state_dict(state, strict=True, assign=True)
        self.device_parameters = sum(t.numel() for t in state.values())
        return self

    @classmethod
    def skeleton(cls, config: dict, *, mode: str = "exact", small_maps: str = "refuse") -> "ShardedUNet":
        """The proxied U-Net on the meta device, no weights (load() fills them; bench.paper_scale runs it on shapes)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        self = cls(None, unet, mode, small_maps)
        for index, name in enumerate(wire_ops.conv_names(unet)):
            _replace(unet, name, ShardedConv(unet.get_submodule(name), index, name, self))
        for name, module in list(unet.named_modules()):
            if isinstance(module, nn.GroupNorm):
                _replace(unet, name, ShardedGroupNorm(module, name, self))
        attention = [name for name, module in unet.named_modules() if hasattr(module, "set_processor")]
        unet.set_attn_processor({f"{name}.processor": ShardedAttention(slot, name, self)
                                 for slot, name in enumerate(attention)})
        unet.eval()
        self.plan_batching()
        return self

    def plan_batching(self) -> None:
        """Which layers ride in which round trip (module docstring); applied only while `batching` is on."""
        from diffusers.models.resnet import ResnetBlock2D

        unet = self.unet

        def feeds(conv, norm, resnet=None):
            if isinstance(conv, ShardedConv) and isinstance(norm, ShardedGroupNorm):
                object.__setattr__(conv, "feeds", norm)  # a reference, not a submodule (no weights of its own)
                norm.offset_of = resnet

        blocks = list(unet.down_blocks)
        if blocks and getattr(blocks[0], "resnets", None):
            feeds(unet.conv_in, blocks[0].resnets[0].norm1)
        for block, following in zip(blocks, blocks[1:]):
            if getattr(block, "downsamplers", None) and getattr(following, "resnets", None):
                feeds(getattr(block.downsamplers[0], "conv", None), following.resnets[0].norm1)
        for module in unet.modules():
            if not isinstance(module, ResnetBlock2D) or module.upsample is not None or module.downsample is not None:
                continue
            key = id(module)
            if module.time_embedding_norm == "default":
                feeds(module.conv1, module.norm2, key if module.time_emb_proj is not None else None)
                if module.time_emb_proj is not None:
                    module.time_emb_proj.register_forward_hook(
                        lambda m, args, out, key=key: self.time_offsets.__setitem__(key, out))
            if isinstance(module.conv_shortcut, ShardedConv) and isinstance(module.conv1, ShardedConv):
                module.conv1.shortcut = (module.conv_shortcut, key)
                module.register_forward_pre_hook(
                    lambda m, args, key=key: self.resnet_inputs.__setitem__(key, args[0]) if args else None)

    def read_tensors(self, keys: list[str], as_dict: bool = False):
        """Only these tensors from unet/*.safetensors (the device never reads the convolution weights)."""
        from safetensors import safe_open

        files = sorted((self.folder / "unet").glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(f"{self.folder}/unet: ppidm reads the U-Net's safetensors selectively; none found")
        found = {}
        for path in files:
            with safe_open(path, "pt") as f:
                for key in set(f.keys()) & set(keys):
                    found[key] = f.get_tensor(key).float()
        missing = set(keys) - set(found)
        if missing:
            raise UnsupportedModelError(f"{self.folder}/unet: tensors not in the safetensors: {sorted(missing)[:3]}")
        return found if as_dict else [found[k] for k in keys]

    def run_locally(self, layer, error: PartitionError, compute):
        """A layer whose map is too small to cut: refuse by name, or compute it here (small_maps=local)."""
        if self.small_maps != "local":
            raise PartitionError(f"ppidm: {error}; use a larger image, fewer servers, or --ppidm-small-maps local "
                                 "to compute such layers on the device")
        self.pool.traffic.local_layers[layer.name] = str(error)
        return compute()

    def attach(self, pool: ShardPool) -> None:
        self.pool = pool
        for state in (self.precomputed, self.fused_stats, self.resnet_inputs, self.time_offsets):
            state.clear()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal (on the meta device, where bench's shape-only study runs: equal shapes)."""
    if a.device.type == "meta" or b.device.type == "meta":
        return a.shape == b.shape
    return torch.equal(a, b)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def unet_config(folder: Path) -> dict:
    return json.loads((folder / "unet" / "config.json").read_text())
