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
answer read; the servers work in parallel). `Traffic` keeps, per layer type, the bytes of
every frame sent to and received from each server, the wall time of the exchanges, and
the FLOPs the servers did.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        height, width = x.shape[2:]
        try:
            blocks = conv_blocks(height, width, owner.pool.n, self.kernel_size, self.stride, self.padding, self.dilation,
                                 what=self.name)
        except PartitionError as error:
            return owner.run_locally(self, error, lambda: F.conv2d(x, *self._local_weights(), self.stride, self.padding,
                                                                   self.dilation, self.groups))
        per_server = [[wire_ops.Op(wire_ops.CONV, [self.index, *b.pads],
                                   [x[:, :, b.in_rows[0]:b.in_rows[1], b.in_cols[0]:b.in_cols[1]]], self.name)]
                      for b in blocks]
        out_h, out_w = blocks[-1].out_rows[1], blocks[-1].out_cols[1]
        flops = self.flops(x.shape[0], out_h, out_w)
        answers = owner.pool.run(wire_ops.CONV, per_server, flops)
        out = x.new_empty(x.shape[0], self.out_channels, out_h, out_w)
        for b, (piece,) in zip(blocks, answers):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
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

    def __init__(self, folder: Path, unet, mode: str, small_maps: str):
        self.folder, self.unet, self.mode, self.small_maps = folder, unet, mode, small_maps
        self.pool: ShardPool | None = None

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
        return self

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


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def unet_config(folder: Path) -> dict:
    return json.loads((folder / "unet" / "config.json").read_text())
