"""The shares server: `lambdasplit serve --component shares --model M --share 0|1` (role "shares").

For a language model the shared layers are the decoder's linear layers (and the LM head);
for a diffusers pipeline (`--model zoo:digits`) the U-Net's convolutions and linear
projections, where a request's input is [n = batch, C, H, W].
It holds only the fixed-point weights of the shared layers (layers.py) and nothing else of
the model: no embedding table for lookups, no norms, no KV cache, no state between requests.
It answers one kind of request (docs/protocol.md, "Secret-shared mode"):

    STEP    u32 seq | u16 k | k x u16 layer index | u32 n | [u16 H | u16 W: convolutions] | payload
            share 0: payload = n x in uint64 (its share x - r, little-endian)
            share 1: no payload: r is the next n x in elements of the session's mask stream
            k = 0:   describe (the session's first request): the answer is the JSON table of layers
                     (names, shapes, input bounds); to share 1 its payload is the session's
                     32-byte ChaCha20 key (ring.MaskStream), drawn fresh by the device
    RESULT  u32 seq | u32 compute microseconds | for each layer, n x out uint64 (W share (+ bias on share 0))

    PLAN    u32 seq | u16 0xFFFF | u32 n | u16 m | m x (u16 k | k x u16 layer index)   (share 1 only)
            m requests of n rows at once, answered by m RESULTs (seq .. seq + m - 1) streamed as
            each is computed: share 1's inputs are its mask stream, so it can run a whole decode
            step's requests without waiting for the device, and the device sends it one frame
            per step instead of one per request

With `--shares-merge` (auto: where layers.merge_refusal allows) the table is the merged one
(layers.merge_plan: 2 requests per decoder layer, RMSNorm folded into the weights).
The two servers are configured independently and never talk to each other; server 0 adds
the biases (once). Every client mistake is a ProtocolError for that session only.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np

from lambdasplit.errors import ProtocolError, UnsupportedModelError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.families import family_for
from lambdasplit.server.services import Service, SessionHandler, public_model_name
from lambdasplit.shares.layers import load_fixed_layers, load_fixed_unet, load_merged_layers, merge_refusal, table_digest
from lambdasplit.shares.ring import SEED_BYTES, MaskStream
from lambdasplit.wire.frames import FrameType, frame

ROLE = "shares"
MAX_LAYERS_PER_REQUEST = 16
PLAN_MARK = 0xFFFF  # in a STEP's layer count: a plan follows (share 1)
MAX_PLAN_REQUESTS = 4096
PLAN_COUNT = struct.Struct("<H")
REQUEST_HEAD = struct.Struct("<IH")
ROWS = struct.Struct("<I")
SPATIAL = struct.Struct("<HH")
RESULT_HEAD = struct.Struct("<II")


class SharesService(Service):
    role = ROLE

    def __init__(self, model: str, share: int, lm_head: bool = True, dtype: str = "float32", merge: bool | None = None):
        """`merge`: the merged layers (2 requests per decoder layer); None: merged where the model allows it."""
        if share not in (0, 1):
            raise UnsupportedModelError(f"--share must be 0 or 1, got {share!r}")
        if dtype != "float32":
            raise UnsupportedModelError("shares computes in the ring Z mod 2^64; pass --dtype float32 (the default)")
        self.share, self.lm_head = share, lm_head
        pipeline = _pipeline_info(model)
        if pipeline is not None:
            self.lm_head = False  # a U-Net has none
            if merge:
                raise UnsupportedModelError("--shares-merge on: a U-Net has no RMSNorm layers to merge")
            self.merge = False
            self.layers = load_fixed_unet(pipeline.folder)
            self.fingerprint = pipeline.fingerprint
            what = f"{len(self.layers)} U-Net convolutions and linear projections"
        else:
            checkpoint = Checkpoint(model)
            family = family_for(checkpoint.config)
            self.merge = merge if merge is not None else merge_refusal(checkpoint.skeleton(), family) is None
            load = load_merged_layers if self.merge else load_fixed_layers
            self.layers = load(checkpoint, family, lm_head=lm_head)
            self.fingerprint = checkpoint.fingerprint
            what = (f"{len(self.layers)} {'merged ' if self.merge else ''}linear layers"
                    f"{' incl. the LM head' if lm_head else ''}")
        self.table = [layer.describe() for layer in self.layers]
        self.digest = table_digest(self.table)
        weights = sum(int(layer.matmul.weight_t.numel()) for layer in self.layers)
        self.description = (f"{public_model_name(model, self.fingerprint)} share {share}: {what} in fixed point "
                            f"({weights} weights)")

    def check_hello(self, hello: dict) -> str | None:
        share, lm_head, merge = hello.get("share"), hello.get("lm_head", True), hello.get("merge", False)
        if type(share) is not int or type(lm_head) is not bool or type(merge) is not bool:
            raise ProtocolError("bad_hello", "a shares HELLO needs \"share\" (0 or 1), \"lm_head\" and \"merge\" "
                                             "(booleans)")
        if share != self.share:
            return f"this server holds share {self.share}, not {share}"
        if lm_head != self.lm_head:
            return f"this server {'holds' if self.lm_head else 'does not hold'} the LM head"
        if merge != self.merge:
            return (f"this server computes the {'merged' if self.merge else 'plain'} layers (--shares-merge "
                    f"{'on' if self.merge else 'off'}), the device asked for the {'merged' if merge else 'plain'} ones")
        return None

    def open(self, hello: dict, limits) -> "SharesSession":
        return SharesSession(self, limits)


class SharesSession(SessionHandler):
    def __init__(self, service: SharesService, limits):
        self.service, self.limits = service, limits
        self.next = 0
        self.masks: MaskStream | None = None
        self.spatial: tuple[int, int] | None = None

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a shares session takes STEP frames, got {frame_type.name}")
        if len(body) >= REQUEST_HEAD.size and REQUEST_HEAD.unpack_from(body, 0)[1] == PLAN_MARK:
            return self.run_plan(body, emit)
        began = time.perf_counter()
        layers, rows, payload, seq = self.parse(body)
        if not layers:
            self.start_masks(seq, payload)
            out = json.dumps({"digest": self.service.digest, "layers": self.service.table}).encode()
        else:
            shares = self.share_of(layers[0], rows, payload)
            add_bias = self.service.share == 0
            try:
                out = b"".join(layer.apply(shares, add_bias).astype("<u8", copy=False).tobytes() for layer in layers)
            except RuntimeError as error:  # e.g. a map smaller than the kernel
                raise ProtocolError("bad_shape", f"{layers[0].name}: {str(error).splitlines()[0]}") from None
        compute_us = min(int((time.perf_counter() - began) * 1e6), 2**32 - 1)
        emit(frame(FrameType.RESULT, RESULT_HEAD.pack(seq, compute_us) + out))

    def run_plan(self, body: memoryview, emit) -> None:
        """A PLAN: every request checked first, then each answered as soon as it is computed."""
        seq, _ = REQUEST_HEAD.unpack_from(body, 0)
        if self.service.share != 1:
            raise ProtocolError("bad_step", "only share 1 runs plans (share 0's inputs come with each request)")
        if self.masks is None:
            raise ProtocolError("bad_step", "share 1 needs the describe request (the mask key) first")
        if seq != self.next:
            raise ProtocolError("out_of_order", f"expected request {self.next}, got {seq}")
        offset = REQUEST_HEAD.size
        if len(body) < offset + ROWS.size + PLAN_COUNT.size:
            raise ProtocolError("bad_frame", "shares PLAN frame too short")
        (rows,) = ROWS.unpack_from(body, offset)
        (count,) = PLAN_COUNT.unpack_from(body, offset + ROWS.size)
        offset += ROWS.size + PLAN_COUNT.size
        if not 1 <= count <= MAX_PLAN_REQUESTS:
            raise ProtocolError("bad_step", f"a plan of {count} requests; it takes 1..{MAX_PLAN_REQUESTS}")
        if not 1 <= rows <= self.limits.max_positions:
            raise ProtocolError("too_many_positions", f"{rows} rows in one request; need 1..{self.limits.max_positions}")
        self.spatial = None
        plan, answer_bytes = [], 0
        for _ in range(count):
            if len(body) < offset + PLAN_COUNT.size:
                raise ProtocolError("bad_frame", "shares PLAN frame too short for its requests")
            (k,) = PLAN_COUNT.unpack_from(body, offset)
            if not 1 <= k <= MAX_LAYERS_PER_REQUEST:
                raise ProtocolError("bad_step", f"{k} layers in one planned request; it takes 1..{MAX_LAYERS_PER_REQUEST}")
            if len(body) < offset + PLAN_COUNT.size + 2 * k:
                raise ProtocolError("bad_frame", "shares PLAN frame too short for its layer lists")
            layers = self.layers_of(struct.unpack_from(f"<{k}H", body, offset + PLAN_COUNT.size))
            offset += PLAN_COUNT.size + 2 * k
            if layers[0].conv is not None:
                raise ProtocolError("bad_step", f"{layers[0].name} is a convolution: plans take linear layers only")
            self.check_answer_size(layers, rows)
            plan.append(layers)
            answer_bytes += 8 * rows * sum(layer.out_features for layer in layers)
        if offset != len(body):
            raise ProtocolError("bad_frame", f"shares PLAN frame has {len(body) - offset} bytes after its requests")
        if answer_bytes > self.limits.max_unsent_bytes:
            raise ProtocolError("frame_too_large", f"a plan answered by {answer_bytes} bytes, above this server's "
                                                   f"{self.limits.max_unsent_bytes}-byte limit of unread replies: "
                                                   "plan fewer requests or rows")
        self.next = seq + count
        for j, layers in enumerate(plan):
            began = time.perf_counter()
            shares = self.share_of(layers[0], rows, b"")
            out = b"".join(layer.apply(shares, False).astype("<u8", copy=False).tobytes() for layer in layers)
            compute_us = min(int((time.perf_counter() - began) * 1e6), 2**32 - 1)
            emit(frame(FrameType.RESULT, RESULT_HEAD.pack(seq + j, compute_us) + out))

    def layers_of(self, indices) -> list:
        table = self.service.layers
        for index in indices:
            if index >= len(table):
                raise ProtocolError("bad_step", f"layer {index} does not exist (this model has {len(table)} shared layers)")
        layers = [table[i] for i in indices]
        if len({(layer.in_features, layer.conv is None) for layer in layers}) > 1:
            raise ProtocolError("bad_step", "the layers of one request must take the same input "
                                            f"({', '.join(layer.name for layer in layers)} do not)")
        return layers

    def parse(self, body: memoryview):
        if len(body) < REQUEST_HEAD.size:
            raise ProtocolError("bad_frame", "shares STEP frame too short")
        seq, count = REQUEST_HEAD.unpack_from(body, 0)
        if seq != self.next:
            raise ProtocolError("out_of_order", f"expected request {self.next}, got {seq}")
        self.next += 1
        if count > MAX_LAYERS_PER_REQUEST:
            raise ProtocolError("bad_step", f"{count} layers in one request; the limit is {MAX_LAYERS_PER_REQUEST}")
        offset = REQUEST_HEAD.size
        if len(body) < offset + 2 * count + ROWS.size:
            raise ProtocolError("bad_frame", "shares STEP frame too short for its layer list")
        indices = struct.unpack_from(f"<{count}H", body, offset)
        offset += 2 * count
        (rows,) = ROWS.unpack_from(body, offset)
        offset += ROWS.size
        layers = self.layers_of(indices)
        if layers and not 1 <= rows <= self.limits.max_positions:
            raise ProtocolError("too_many_positions", f"{rows} rows in one request; need 1..{self.limits.max_positions}")
        self.spatial = None
        if layers and layers[0].conv is not None:
            if len(body) < offset + SPATIAL.size:
                raise ProtocolError("bad_frame", "a convolution request needs its map's height and width")
            self.spatial = SPATIAL.unpack_from(body, offset)
            offset += SPATIAL.size
            if min(self.spatial) < 1 or rows > 64:
                raise ProtocolError("bad_shape", f"a convolution takes 1..64 maps of at least 1 x 1, got {rows} of "
                                                 f"{self.spatial[0]} x {self.spatial[1]}")
        if layers:
            self.check_answer_size(layers, rows)
        return layers, rows, body[offset:], seq

    def check_answer_size(self, layers, rows: int) -> None:
        """An answer is never larger than the largest frame this server accepts (before anything is allocated)."""
        area = 1
        if self.spatial is not None:
            conv = layers[0].conv
            area = 1
            for size, p, d, k, stride in zip(self.spatial, conv["padding"], conv["dilation"], conv["kernel"],
                                             conv["stride"]):
                side = (size + 2 * p - d * (k - 1) - 1) // stride + 1
                if side < 1:
                    raise ProtocolError("bad_shape", f"{layers[0].name}: a {self.spatial[0]} x {self.spatial[1]} map is "
                                                     "smaller than its kernel")
                area *= side
            area = max(area, self.spatial[0] * self.spatial[1])  # the limbs of the input are as large
        words = rows * area * max(sum(layer.out_features for layer in layers), layers[0].in_features)
        if 8 * words > self.limits.max_frame_bytes:
            raise ProtocolError("frame_too_large", f"{rows} rows for {', '.join(l.name for l in layers)} would be "
                                                   f"{8 * words} bytes, above this server's {self.limits.max_frame_bytes}"
                                                   "-byte frame limit: send fewer positions per request")

    def start_masks(self, seq: int, payload: memoryview) -> None:
        if seq != 0:
            raise ProtocolError("bad_step", "describe is the session's first request")
        if self.service.share == 0:
            if len(payload):
                raise ProtocolError("bad_step", "share 0's describe request carries no payload")
            return
        if len(payload) != SEED_BYTES:
            raise ProtocolError("bad_step", f"share 1's describe request carries the {SEED_BYTES}-byte mask key, "
                                            f"got {len(payload)} bytes")
        self.masks = MaskStream(bytes(payload))

    def share_of(self, layer, rows: int, payload: memoryview) -> np.ndarray:
        shape = (rows, layer.in_features) + (tuple(self.spatial) if self.spatial else ())
        count = int(np.prod(shape))
        if self.service.share == 1:
            if self.masks is None:
                raise ProtocolError("bad_step", "share 1 needs the describe request (the mask key) first")
            if len(payload):
                raise ProtocolError("bad_step", f"share 1 takes no payload (its share is the mask stream), got "
                                                f"{len(payload)} bytes")
            return self.masks.next(count).reshape(shape)
        if len(payload) != 8 * count:
            raise ProtocolError("bad_step", f"share 0 takes {' x '.join(map(str, shape))} uint64 = {8 * count} bytes, "
                                            f"got {len(payload)}")
        return np.frombuffer(payload, dtype="<u8").reshape(shape)


def _pipeline_info(model: str):
    """The PipelineInfo when `model` is a diffusers pipeline (model_index.json), else None."""
    from lambdasplit.zoo import resolve

    folder = resolve(model)
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "model_index.json")):
        from lambdasplit.diffusion.split import PipelineInfo

        return PipelineInfo.read(model)
    return None
