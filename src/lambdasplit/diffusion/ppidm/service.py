"""The shard server: `lambdasplit serve --component unet-shard --model M` (role "unet-shard").

It holds ONLY the U-Net's Conv2d weights (read selectively from the safetensors; group
norm and attention need no weights on this side) and answers PPIDM requests (ops.py):
convolve a block (and, if asked, give its output's per-channel statistics), give a block's
group statistics, attend a chunk of queries. It keeps
nothing between requests except the cross-attention K, V a client asked it to store.
It does not know which block of the map it was given beyond what the halo and the zero
padding it is asked to add imply, nor the mode (exact or paper), nor the other servers.

Every client mistake is a ProtocolError for that session only.
"""

from __future__ import annotations

import struct
import time

import torch
from torch import nn

from lambdasplit.diffusion import protocols as proto
from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.split import PipelineInfo
from lambdasplit.errors import ProtocolError, UnsupportedModelError
from lambdasplit.server.services import Service, SessionHandler
from lambdasplit.wire.codecs import encode, get_codec
from lambdasplit.wire.frames import FrameType

ROLE = "unet-shard"
MAX_BATCH = 8
MAX_SIDE = 1024


def load_convs(info: PipelineInfo) -> list[nn.Conv2d]:
    """The U-Net's Conv2d modules in module order, with their weights and nothing else."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(info.folder / "unet"))
    names = wire_ops.conv_names(skeleton)
    wanted = {f"{name}.{part}" for name in names for part in ("weight", "bias")}
    files = sorted((info.folder / "unet").glob("*.safetensors"))
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in wanted & set(f.keys()):
                state[key] = f.get_tensor(key).float()
    convs = []
    for name in names:
        meta = skeleton.get_submodule(name)
        conv = nn.Conv2d(meta.in_channels, meta.out_channels, meta.kernel_size, meta.stride, meta.padding,
                         meta.dilation, meta.groups, bias=meta.bias is not None, device="meta")
        parts = {p: state.get(f"{name}.{p}") for p in ("weight",) + (("bias",) if meta.bias is not None else ())}
        if any(v is None for v in parts.values()):
            raise UnsupportedModelError(f"{info.folder}/unet: no safetensors weights for {name}")
        conv.load_state_dict(parts, assign=True)
        convs.append(conv.eval())
    return convs


class UNetShardService(Service):
    role = ROLE

    def __init__(self, model: str, dtype: str = "float32"):
        if dtype != "float32":
            raise UnsupportedModelError("unet-shard computes in float32 (ppidm exact mode is a float32 guarantee)")
        self.info = PipelineInfo.read(model)
        self.convs = load_convs(self.info)
        self.fingerprint = self.info.fingerprint
        weights = sum(p.numel() for conv in self.convs for p in conv.parameters())
        self.description = (f"{model} U-Net shard ({self.info.class_name}: {len(self.convs)} convolutions, "
                            f"{weights} weights; group-norm statistics, split-Q attention)")

    def check_hello(self, hello: dict) -> str | None:
        return None

    def open(self, hello: dict, limits) -> SessionHandler:
        if hello.get("dtype", "float32") != "float32":
            raise ProtocolError("bad_hello", "unet-shard tensors cross the wire in float32")
        return ShardHandler(self, proto.diffusion_codec(str(hello.get("codec", "fp32"))))


class ShardHandler(SessionHandler):
    def __init__(self, service: UNetShardService, codec):
        self.service, self.codec = service, codec
        self.stats_codec = get_codec("fp32")
        self.next = 0
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def memory_bytes(self) -> int:
        return sum(k.numel() * 4 + v.numel() * 4 for k, v in self.stored.values())

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a unet-shard session takes STEP frames, got {frame_type.name}")
        began = time.perf_counter()
        if len(body) < 4:
            raise ProtocolError("bad_frame", "STEP frame too short")
        (position,) = struct.unpack_from("<I", body, 0)
        if position != self.next:
            raise ProtocolError("out_of_order", f"expected request {self.next}, got {position}")
        self.next += 1
        operations = wire_ops.parse_ops([t for t, _, _ in proto.parse_blobs(body, 4)])
        blobs = []
        for op in operations:
            out = self.run(op)
            if op.kind == wire_ops.CONV_STATS:  # the output block, then its per-channel statistics
                blobs += [encode(out, self.codec).blob, encode(wire_ops.channel_stats(out), self.stats_codec).blob]
                continue
            codec = self.stats_codec if op.kind == wire_ops.GROUP_NORM else self.codec
            blobs.append(encode(out, codec).blob)
        compute_us = min(int((time.perf_counter() - began) * 1e6), 2**32 - 1)
        emit(proto.tensors_frame(FrameType.RESULT, struct.pack("<II", position, compute_us), blobs))

    def run(self, op: wire_ops.Op) -> torch.Tensor:
        for tensor in op.tensors:
            if tensor.dim() != 4 or not 1 <= tensor.shape[0] <= MAX_BATCH or max(tensor.shape[2:]) > MAX_SIDE * MAX_SIDE:
                raise ProtocolError("bad_shape", f"tensors are [batch <= {MAX_BATCH}, C, H, W] (attention: "
                                                 f"[batch, heads, tokens, head dim]), got {list(tensor.shape)}")
        try:
            with torch.no_grad():
                if op.kind in wire_ops.CONV_KINDS:
                    return self._conv(op)
                if op.kind == wire_ops.GROUP_NORM:
                    return self._group_norm(op)
                return self._attention(op)
        except RuntimeError as error:  # shapes torch refuses, whatever got past the checks
            raise ProtocolError("bad_step", f"{wire_ops.KINDS[op.kind]}: {str(error).splitlines()[0]}") from None

    def _conv(self, op: wire_ops.Op) -> torch.Tensor:
        index, pads = op.header[0], tuple(op.header[1:5])
        convs = self.service.convs
        if not 0 <= index < len(convs):
            raise ProtocolError("bad_step", f"convolution {index} does not exist (this U-Net has {len(convs)})")
        conv = convs[index]
        (x,) = op.tensors
        if x.shape[1] != conv.in_channels:
            raise ProtocolError("bad_shape", f"convolution {index} takes {conv.in_channels} channels, got {x.shape[1]}")
        if any(not 0 <= p <= conv.padding[i // 2] for i, p in enumerate(pads)):
            raise ProtocolError("bad_step", f"convolution {index}: border padding {list(pads)} exceeds its own "
                                            f"{list(conv.padding)}")
        return wire_ops.conv_block(x, conv, pads)

    def _group_norm(self, op: wire_ops.Op) -> torch.Tensor:
        groups = op.header[1]
        (x,) = op.tensors
        if groups < 1 or x.shape[1] % groups:
            raise ProtocolError("bad_step", f"group norm: {x.shape[1]} channels do not divide into {groups} groups")
        return wire_ops.group_stats(x, groups)

    def _attention(self, op: wire_ops.Op) -> torch.Tensor:
        slot, kv = op.header[0], op.header[1]
        if not 0 <= slot < wire_ops.MAX_SLOTS or kv not in (wire_ops.KV_SENT, wire_ops.KV_STORE, wire_ops.KV_STORED):
            raise ProtocolError("bad_step", f"attention: slot 0..{wire_ops.MAX_SLOTS - 1} and kv 0..2, got {slot}, {kv}")
        if kv == wire_ops.KV_STORED:
            if slot not in self.stored:
                raise ProtocolError("bad_step", f"attention: nothing stored under slot {slot}")
            (q,), (k, v) = op.tensors, self.stored[slot]
        else:
            q, k, v = op.tensors
            if kv == wire_ops.KV_STORE:
                self.stored[slot] = (k, v)
        if not (q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[3] == k.shape[3] and k.shape[2] == v.shape[2]):
            raise ProtocolError("bad_shape", f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                                             "do not fit [batch, heads, tokens, head dim]")
        return wire_ops.attend(q, k, v)
