"""The two diffusion session protocols, device side, over the generic lambdasplit session.

Both open with a HELLO (role "unet") that carries only small, non-private JSON: the
protocol name, codec, guidance scale, the step schedule. Tensors always travel as binary
blobs in STEP / RESULT frames (position = denoising step index).

cloud-latent (the paper's protocol; one request, N streamed answers)
    up    STEP 0: conditioning (prompt embeds [+ pooled, time ids]) and the initial latent, once
    down  RESULT i for each cloud step i: the guided predicted noise, through the codec
          (+ with `verify`, a 32-value sha256 digest of the cloud's latent after step i)
    `cloud_steps` counts U-Net calls, i.e. entries of the scheduler's schedule: that is
    `steps` for DDIM or Euler, more for PNDM, 2 steps - 1 for Heun.
    The cloud keeps its own latent and scheduler and steps them with the *dequantized* noise
    it sent, exactly as the device does, so the two copies stay bit-identical.
    Deterministic schedulers only (split.DETERMINISTIC_SCHEDULERS).

client-latent (the cloud is stateless beyond the conditioning)
    up    STEP i: the scheduler-scaled latent x_t (+ the conditioning in STEP 0)
    down  RESULT i: the guided predicted noise, through the codec
    The device runs the scheduler; the cloud never sees a scheduler or keeps a latent.
    Guidance runs in the cloud: it halves the downlink (one noise tensor, not two) and
    quantization then applies to the guided noise, instead of being amplified by the
    guidance scale as it would be if uncond/text noise were quantized separately.
    The cloud learns the guidance scale, which says nothing about the prompt.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from lambdasplit.client.remote import Session
from lambdasplit.errors import ProtocolError
from lambdasplit.wire.codecs import AFFINE, BlobHeader, Codec, decode, decode_blob, encode, get_codec, read_header
from lambdasplit.wire.frames import FrameType, frame, parse_json

PROTOCOLS = ("cloud-latent", "client-latent")
ROLE = "unet"
CLOUD_ROLE = "diffusion-cloud"


def diffusion_codec(name: str) -> Codec:
    """Codec names for diffusion tensors: intN means per-tensor (the paper's), intN/channel per latent channel."""
    try:
        return get_codec(name, default_granularity="tensor")
    except ValueError as error:
        raise ProtocolError("bad_codec", str(error)) from None


@dataclass
class Accounting:
    """Bytes of tensor blobs, split as the issue asks: values, affine scales, blob headers;
    and whole blobs of the --verify-sync digest, which are checks, not payload."""

    payload_bytes: int = 0
    scale_bytes: int = 0
    header_bytes: int = 0
    sync_bytes: int = 0
    per_step_payload: list[int] = field(default_factory=list)

    def add(self, codec: Codec, shape: tuple[int, ...], blob_bytes: int) -> int:
        numel = math.prod(shape)
        if codec.kind == AFFINE:
            groups = shape[1] if codec.granularity == "channel" else (numel // shape[-1] if codec.granularity == "token" else 1)
            payload, scales = math.ceil(numel * codec.bits / 8), 8 * groups
        else:
            payload, scales = numel * codec.bits // 8, 0
        self.payload_bytes += payload
        self.scale_bytes += scales
        self.header_bytes += blob_bytes - payload - scales
        return payload


def tensors_frame(frame_type: FrameType, prefix: bytes, blobs: list[bytes]) -> bytes:
    """A STEP/RESULT frame from already encoded blobs (each blob names its own codec)."""
    return frame(frame_type, prefix + struct.pack("<B", len(blobs)) + b"".join(blobs))


def parse_blob_headers(body: memoryview, offset: int) -> list[BlobHeader]:
    """The header of each blob after `offset` (a u8 count, then the blobs), nothing decoded: a server
    checks the declared shapes against what it expects before `decode_blob` allocates anything."""
    if offset + 1 > len(body):
        raise ProtocolError("bad_frame", "frame too short for its tensor count")
    count = body[offset]
    offset += 1
    headers = []
    for _ in range(count):
        headers.append(read_header(body, offset))
        offset = headers[-1].end
    if offset != len(body):
        raise ProtocolError("bad_frame", f"{len(body) - offset} unexpected bytes after the tensors")
    return headers


def parse_blobs(body: memoryview, offset: int) -> list[tuple[torch.Tensor, Codec, int]]:
    """(tensor, codec, blob size) for each blob after `offset` (a u8 count, then the blobs)."""
    return [(decode_blob(body, header), header.codec, header.end - header.start)
            for header in parse_blob_headers(body, offset)]


def latent_digest(latents: torch.Tensor) -> torch.Tensor:
    """sha256 of the latent's bytes as 32 float values (exact in fp32): a cheap bit-identity check."""
    digest = hashlib.sha256(latents.detach().contiguous().numpy().tobytes()).digest()
    return torch.tensor(np.frombuffer(digest, dtype=np.uint8).astype(np.float32))


def timestep_list(timesteps: torch.Tensor) -> tuple[list, str]:
    """Timesteps as JSON numbers plus their dtype; float32 -> float64 -> JSON -> float32 is exact."""
    dtype = "int64" if not timesteps.is_floating_point() else "float32"
    return [float(t) if dtype == "float32" else int(t) for t in timesteps.tolist()], dtype


class DiffusionSession(Session):
    """Common device-side bookkeeping: codecs, byte accounting, cloud time, received noise."""

    def __init__(self, address: str, hello: dict, *, codec: str, up_codec: str, **options):
        self.codec, self.up_codec = diffusion_codec(codec), diffusion_codec(up_codec)
        self.up, self.down = Accounting(), Accounting()
        self.received: dict[int, torch.Tensor] = {}  # step -> noise as received (kept only if asked)
        self.keep: set[int] = set()
        super().__init__(address, {"role": ROLE, "codec": self.codec.name, **hello}, **options)

    def _send_step(self, position: int, tensors: list[torch.Tensor]) -> None:
        blobs = []
        for tensor in tensors:
            blob = encode(tensor, self.up_codec).blob
            self.up.add(self.up_codec, tuple(tensor.shape), len(blob))
            blobs.append(blob)
        self.transport.send(tensors_frame(FrameType.STEP, struct.pack("<I", position), blobs))

    def _receive(self, position: int) -> list[torch.Tensor]:
        body = self.expect(FrameType.RESULT)
        if len(body) < 8:
            raise ProtocolError("bad_frame", "RESULT frame too short")
        got, compute_us = struct.unpack_from("<II", body, 0)
        blobs = parse_blobs(body, 8)
        if got != position or not blobs:
            self.close()
            raise ProtocolError("bad_result", f"expected the noise of step {position}, got step {got}")
        self.cloud_seconds += compute_us / 1e6
        noise, codec, size = blobs[0]
        self.down.per_step_payload.append(self.down.add(codec, tuple(noise.shape), size))
        self.down.sync_bytes += sum(size for _, _, size in blobs[1:])  # the only second blob: the latent digest
        if position in self.keep:
            self.received[position] = noise
        return [t for t, _, _ in blobs]


class CloudLatentSession(DiffusionSession):
    """The cloud holds a copy of the latent and steps it; it streams one noise per step."""

    def __init__(self, address: str, *, fingerprint: str, steps: int, cloud_steps: int, guidance: float,
                 scheduler, codec: str = "fp32", up_codec: str = "fp32", verify: bool = False, **options):
        self.verify = verify
        hello = {"model": fingerprint, "dtype": "float32", "diffusion": "cloud-latent", "guidance": guidance,
                 "steps": steps, "cloud_steps": cloud_steps, "verify": verify,
                 "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)}}
        super().__init__(address, hello, codec=codec, up_codec=up_codec, **options)

    def start(self, conditioning: list[torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """Send the conditioning and initial latent once; return the latent as the cloud decoded it.

        With a lossy uplink codec the device continues from that decoded latent too,
        so both copies start equal.
        """
        self._send_step(0, [*conditioning, latents])
        self.round_trips += 1
        return decode(encode(latents, self.up_codec).blob)[0] if not self.up_codec.lossless else latents

    def noise(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next streamed noise (as dequantized by the codec) and, with verify, the cloud's latent digest."""
        tensors = self._receive(step)
        return tensors[0], (tensors[1] if self.verify and len(tensors) > 1 else None)


class ClientLatentSession(DiffusionSession):
    """The device holds the latent; each step it sends x_t and gets the noise back."""

    def __init__(self, address: str, *, fingerprint: str, timesteps: torch.Tensor, guidance: float,
                 codec: str = "fp32", up_codec: str = "fp32", **options):
        values, dtype = timestep_list(timesteps)
        hello = {"model": fingerprint, "dtype": "float32", "diffusion": "client-latent", "guidance": guidance,
                 "timesteps": values, "timestep_dtype": dtype}
        super().__init__(address, hello, codec=codec, up_codec=up_codec, **options)

    def noise(self, step: int, model_input: torch.Tensor, conditioning: list[torch.Tensor] | None) -> torch.Tensor:
        self._send_step(step, [model_input, *(conditioning or [])])
        tensors = self._receive(step)
        self.round_trips += 1
        return tensors[0]


class CloudImageClient(Session):
    """Cloud-only baseline: the prompt text goes up, the finished image comes down."""

    def __init__(self, address: str, *, fingerprint: str, **options):
        self.up, self.down = Accounting(), Accounting()  # up stays 0: the prompt goes as JSON (framing)
        super().__init__(address, {"role": CLOUD_ROLE, "model": fingerprint, "dtype": "float32"}, **options)

    def generate(self, request: dict) -> tuple[np.ndarray, dict]:
        from lambdasplit.wire.frames import json_frame

        self.transport.send(json_frame(FrameType.GENERATE, request))
        body = self.expect(FrameType.RESULT)
        _, compute_us = struct.unpack_from("<II", body, 0)
        image, codec, size = parse_blobs(body, 8)[0]
        self.down.add(codec, tuple(image.shape), size)
        self.round_trips += 1
        self.cloud_seconds += compute_us / 1e6
        return image.numpy(), parse_json(self.expect(FrameType.DONE))


def split_frames(stream: bytes) -> list[tuple[FrameType, memoryview]]:
    """Cut one direction of a captured byte stream (plain TCP) back into frames."""
    from lambdasplit.wire.frames import FRAME_HEADER

    frames, offset, data = [], 0, memoryview(stream)
    while offset + FRAME_HEADER.size <= len(data):
        length, kind = FRAME_HEADER.unpack_from(data, offset)
        frames.append((FrameType(kind), data[offset + FRAME_HEADER.size: offset + FRAME_HEADER.size - 1 + length]))
        offset += FRAME_HEADER.size - 1 + length
    return frames


def replay_cloud_latent(capture: list[tuple[str, bytes]], device) -> tuple[torch.Tensor, int]:
    """What an eavesdropper on a plain-TCP cloud-latent session can rebuild, with only public parts.

    The HELLO names the scheduler and its config, STEP 0 carries the initial latent, and
    each RESULT the noise the device stepped with; replaying the scheduler gives the
    device's latent after the last cloud step, and the model's public VAE decodes it.
    Returns (that latent, the number of steps replayed). With local_steps = 0 it is the
    final latent, so the eavesdropper gets the image itself: the noise looks like noise,
    but together with the initial latent it is not private (use TLS; see docs/diffusion.md).
    """
    up = b"".join(data for direction, data in capture if direction == "up")
    down = b"".join(data for direction, data in capture if direction == "down")
    up_frames, down_frames = split_frames(up), split_frames(down)
    hello = parse_json(up_frames[0][1])
    from lambdasplit.diffusion.split import make_scheduler

    scheduler = make_scheduler(hello["scheduler"]["class"], hello["scheduler"]["config"])
    scheduler.set_timesteps(int(hello["steps"]))
    if device.info.kind == "sdxl" and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    step = next(body for kind, body in up_frames if kind == FrameType.STEP)
    latents = parse_blobs(step, 4)[-1][0]
    kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    replayed = 0
    for kind, body in down_frames:
        if kind != FrameType.RESULT:
            continue
        noise = parse_blobs(body, 8)[0][0]
        latents = scheduler.step(noise, scheduler.timesteps[replayed], latents, **kwargs, return_dict=False)[0]
        replayed += 1
    return latents, replayed
