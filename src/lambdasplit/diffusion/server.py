"""The cloud side of split diffusion: `lambdasplit serve --component unet|pipeline`.

    UNetService      role "unet": loads ONLY the U-Net (plus the tiny JSON configs) and serves
                     the cloud-latent and client-latent protocols (diffusion/protocols.py)
    PipelineService  role "diffusion-cloud": the whole pipeline, for the honest cloud-only
                     baseline (prompt text in, image out)

Every client mistake (shapes, step order, scheduler, codec) is a ProtocolError: that
session gets an ERROR frame and closes, every other session keeps being served. A STEP's
tensors are checked from their blob headers (count, shapes, codec) before any is decoded, so
a hostile frame costs no more than its own size (tests/test_hardening_diffusion.py).

Tensors always cross the wire in float32 (before the codec), whatever the server's
`--dtype`: the device computes in float32, and a float16 / bfloat16 U-Net casts its input
down and its predicted noise back up to float32. The HELLO's "dtype" is that wire and
device dtype, so it must be float32; the server's own dtype is its business (and is not
bit-exact with the float32 pipeline).
"""

from __future__ import annotations

import struct
import threading
import time

import torch

from lambdasplit.diffusion import protocols as proto
from lambdasplit.diffusion.split import (
    Conditioning, Device, PipelineInfo, check_scheduler, load_unet, make_scheduler, predict_noise,
)
from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.server.services import Service, SessionHandler, public_model_name
from lambdasplit.wire.codecs import BlobHeader, decode, decode_blob, encode, get_codec
from lambdasplit.wire.frames import FrameType, json_frame, parse_json

MAX_STEPS = 1000
MAX_LATENT_SIDE = 256  # latent pixels per side (a 2048 px image at VAE factor 8)
MAX_PROMPT_TOKENS = 1024  # prompt embedding positions (CLIP encoders take 77)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UNetService(Service):
    role = proto.ROLE

    def __init__(self, model: str, dtype: str = "float32"):
        self.info = PipelineInfo.read(model)
        self.dtype_name = dtype
        self.unet = load_unet(self.info.folder, DTYPES[dtype])
        self.fingerprint = self.info.fingerprint
        self.description = f"{public_model_name(model, self.fingerprint)} U-Net ({self.info.class_name}, {dtype}; cloud-latent and client-latent)"

    def check_hello(self, hello: dict) -> str | None:
        return None  # any client of this model; open() checks the rest with diffusion-worded errors

    def open(self, hello: dict, limits) -> SessionHandler:
        check_wire_dtype(hello)
        protocol = hello.get("diffusion")
        codec = proto.diffusion_codec(str(hello.get("codec", "fp32")))
        try:
            guidance = float(hello.get("guidance", 1.0))
        except (TypeError, ValueError):
            raise ProtocolError("bad_hello", "guidance must be a number") from None
        if protocol == "cloud-latent":
            return CloudLatentHandler(self, hello, codec, guidance)
        if protocol == "client-latent":
            return ClientLatentHandler(self, hello, codec, guidance)
        raise ProtocolError("bad_hello", f"diffusion protocol must be one of {', '.join(proto.PROTOCOLS)}, got {protocol!r}")

    # -- validation shared by both protocols, on the declared shapes (blob headers), before decoding
    def check_latent(self, shape: tuple[int, ...], what: str) -> None:
        c = self.info.unet_config["in_channels"]
        if len(shape) != 4 or shape[0] != 1 or shape[1] != c:
            raise ProtocolError("bad_shape", f"{what} must have shape [1, {c}, h, w], got {list(shape)}")
        if not (1 <= min(shape[2:]) and max(shape[2:]) <= MAX_LATENT_SIDE):
            raise ProtocolError("bad_shape", f"{what}: latent sides must be 1..{MAX_LATENT_SIDE}")

    def check_conditioning(self, shapes: list[tuple[int, ...]], guidance: float) -> None:
        batch = 2 if guidance > 1.0 else 1
        config = self.info.unet_config
        wanted = 3 if self.info.kind == "sdxl" else 1
        if len(shapes) != wanted:
            raise ProtocolError("bad_step", f"a {self.info.class_name} needs {wanted} conditioning tensor(s), got {len(shapes)}")
        embeds = shapes[0]
        if len(embeds) != 3 or embeds[0] != batch or embeds[2] != config["cross_attention_dim"] \
                or not 1 <= embeds[1] <= MAX_PROMPT_TOKENS:
            raise ProtocolError("bad_shape", f"prompt embeddings must be [{batch}, 1..{MAX_PROMPT_TOKENS}, "
                                             f"{config['cross_attention_dim']}] (guidance {guidance:g}), got {list(embeds)}")
        if wanted == 3:
            pooled, time_ids = shapes[1], shapes[2]
            pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            if list(pooled) != [batch, pooled_dim] or list(time_ids) != [batch, 6]:
                raise ProtocolError("bad_shape", f"pooled embeddings [{batch}, {pooled_dim}] and time ids [{batch}, 6] "
                                                 f"expected, got {list(pooled)} and {list(time_ids)}")

    def conditioning(self, tensors: list[torch.Tensor]) -> Conditioning:
        return Conditioning.from_tensors([t.to(self.unet.dtype) for t in tensors])

    def noise(self, model_input, t, cond, guidance) -> torch.Tensor:
        return predict_noise(self.unet, model_input.to(self.unet.dtype), t, cond, guidance).float()


def check_wire_dtype(hello: dict) -> None:
    if hello.get("dtype", "float32") != "float32":
        raise ProtocolError("bad_hello", f"diffusion tensors cross the wire in float32, the device asked for "
                                         f"{hello.get('dtype')!r} (the server casts them to its own --dtype)")


def _result(position: int, began: float, blobs: list[bytes]) -> bytes:
    compute_us = min(int((time.perf_counter() - began) * 1e6), 2**32 - 1)
    return proto.tensors_frame(FrameType.RESULT, struct.pack("<II", position, compute_us), blobs)


def _step_headers(body) -> tuple[int, list[BlobHeader]]:
    """A STEP's position and blob headers; the handlers check them before `_decode`."""
    if len(body) < 4:
        raise ProtocolError("bad_frame", "STEP frame too short")
    (position,) = struct.unpack_from("<I", body, 0)
    return position, proto.parse_blob_headers(body, 4)


def _decode(body, headers: list[BlobHeader]) -> list[torch.Tensor]:
    tensors = [decode_blob(body, header) for header in headers]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ProtocolError("bad_tensor", "a tensor contains NaN or infinity")
    return tensors


class CloudLatentHandler(SessionHandler):
    """Holds the cloud's copy of the latent and its own scheduler; streams the noise."""

    def __init__(self, service: UNetService, hello: dict, codec, guidance: float):
        self.service, self.codec, self.guidance = service, codec, guidance
        self.verify = bool(hello.get("verify", False))
        spec = hello.get("scheduler") or {}
        try:
            steps, self.cloud_steps = int(hello["steps"]), int(hello["cloud_steps"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("bad_hello", "cloud-latent needs integer steps and cloud_steps") from None
        if not 1 <= steps <= MAX_STEPS:
            raise ProtocolError("bad_hello", f"need 1 <= steps <= {MAX_STEPS}, got {steps}")
        try:
            self.scheduler = make_scheduler(str(spec.get("class")), dict(spec.get("config") or {}))
        except (LambdaSplitError, TypeError, ValueError) as error:
            raise ProtocolError("bad_scheduler", f"cloud-latent: {error}") from None
        reason = check_scheduler(self.scheduler)
        if reason:
            raise ProtocolError("bad_scheduler", f"cloud-latent: {reason}")
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        try:
            self.timesteps, _ = retrieve_timesteps(self.scheduler, steps, "cpu")
        except (TypeError, ValueError) as error:  # e.g. PNDM with PRK steps and too few steps
            raise ProtocolError("bad_scheduler", f"cloud-latent: {type(self.scheduler).__name__} cannot make "
                                                 f"{steps} steps: {error}") from None
        # cloud_steps counts U-Net calls, i.e. schedule entries: PNDM's schedule is longer than
        # `steps`, Heun's is 2 steps - 1. The device counts them the same way (client.denoise).
        if not 0 <= self.cloud_steps <= len(self.timesteps):
            raise ProtocolError("bad_hello", f"need 0 <= cloud_steps <= {len(self.timesteps)} (the schedule of "
                                             f"{steps} steps), got {self.cloud_steps}")
        if service.info.kind == "sdxl" and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        # What the device's pipeline passes to step(): eta 0 (DDIM), and no generator (the
        # deterministic schedulers never use its draws for the result).
        import inspect

        self.step_kwargs = {"eta": 0.0} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        self.started = False

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a cloud-latent session takes one STEP frame, got {frame_type.name}")
        if self.started:
            raise ProtocolError("out_of_order", "cloud-latent takes a single STEP (conditioning + initial latent)")
        self.started = True
        _, headers = _step_headers(body)
        if len(headers) < 2:
            raise ProtocolError("bad_step", "cloud-latent STEP carries the conditioning and the initial latent")
        self.service.check_latent(headers[-1].shape, "the initial latent")
        self.service.check_conditioning([h.shape for h in headers[:-1]], self.guidance)
        tensors = _decode(body, headers)
        latents = tensors[-1]
        cond = self.service.conditioning(tensors[:-1])
        for i in range(self.cloud_steps):
            began = time.perf_counter()
            t = self.timesteps[i]
            model_input = self.scheduler.scale_model_input(latents, t)
            noise = self.service.noise(model_input, t, cond, self.guidance)
            blob = encode(noise, self.codec).blob
            # Step with exactly what the device will decode, so both copies stay bit-identical.
            received = decode(blob)[0]
            latents = self.scheduler.step(received, t, latents, **self.step_kwargs, return_dict=False)[0]
            blobs = [blob]
            if self.verify:
                blobs.append(encode(proto.latent_digest(latents), get_codec("fp32")).blob)
            emit(_result(i, began, blobs))


class ClientLatentHandler(SessionHandler):
    """Stateless per step apart from the conditioning: x_t in, guided noise out."""

    def __init__(self, service: UNetService, hello: dict, codec, guidance: float):
        self.service, self.codec, self.guidance = service, codec, guidance
        values, dtype = hello.get("timesteps"), hello.get("timestep_dtype", "int64")
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_STEPS or dtype not in ("int64", "float32"):
            raise ProtocolError("bad_hello", f"client-latent needs a list of 1..{MAX_STEPS} timesteps (int64 or float32)")
        try:
            self.timesteps = torch.tensor(values, dtype=torch.int64 if dtype == "int64" else torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ProtocolError("bad_hello", f"timesteps: {error}") from None
        self.cond: Conditioning | None = None
        self.next = 0

    def handle(self, frame_type, body, emit) -> None:
        if frame_type != FrameType.STEP:
            raise ProtocolError("unexpected_frame", f"a client-latent session takes STEP frames, got {frame_type.name}")
        began = time.perf_counter()
        position, headers = _step_headers(body)
        if position != self.next or position >= len(self.timesteps):
            raise ProtocolError("out_of_order", f"expected step {self.next} of {len(self.timesteps)}, got {position}")
        if not headers:
            raise ProtocolError("bad_step", "a client-latent STEP carries the scaled latent")
        self.service.check_latent(headers[0].shape, "x_t")
        if position == 0:
            self.service.check_conditioning([h.shape for h in headers[1:]], self.guidance)
        elif len(headers) != 1:
            raise ProtocolError("bad_step", "the conditioning is sent once, in step 0")
        tensors = _decode(body, headers)
        if position == 0:
            self.cond = self.service.conditioning(tensors[1:])
        self.next += 1
        noise = self.service.noise(tensors[0], self.timesteps[position], self.cond, self.guidance)
        emit(_result(position, began, [encode(noise, self.codec).blob]))


class PipelineService(Service):
    """The whole pipeline in the cloud (baseline): the cloud sees the prompt and the image."""

    role = proto.CLOUD_ROLE

    def __init__(self, model: str, dtype: str = "float32"):
        if dtype != "float32":
            raise LambdaSplitError("the cloud-only diffusion baseline runs in float32")
        self.device = Device.load(model, with_unet=True)
        self.fingerprint = self.device.info.fingerprint
        self.description = f"{public_model_name(model, self.fingerprint)} whole pipeline ({self.device.info.class_name}), cloud-only mode"
        # One pipeline, one scheduler with per-run state (its timesteps): one generation at a time.
        self.lock = threading.Lock()

    def check_hello(self, hello: dict) -> str | None:
        return None  # open() checks the dtype with a diffusion-worded error

    def open(self, hello: dict, limits) -> SessionHandler:
        check_wire_dtype(hello)
        return PipelineHandler(self)


class PipelineHandler(SessionHandler):
    def __init__(self, service: PipelineService):
        self.service = service

    def handle(self, frame_type, body, emit) -> None:
        from lambdasplit.diffusion.client import generate_local

        if frame_type != FrameType.GENERATE:
            raise ProtocolError("unexpected_frame", f"a diffusion-cloud session takes GENERATE frames, got {frame_type.name}")
        request = parse_json(body)
        try:
            prompt = str(request["prompt"])
            steps, seed, guidance = int(request["steps"]), int(request["seed"]), float(request["guidance"])
            size = tuple(int(v) for v in request.get("size") or ()) or None
            negative = request.get("negative_prompt")
            if not 1 <= steps <= MAX_STEPS or (size and len(size) != 2):
                raise ValueError(f"steps must be 1..{MAX_STEPS}; size is [height, width]")
            if size and not all(8 <= side <= 8 * MAX_LATENT_SIDE for side in size):  # bounds the latent it allocates
                raise ValueError(f"image sides must be 8..{8 * MAX_LATENT_SIDE} pixels, got {list(size)}")
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError("bad_request", f"GENERATE request: {error}") from None
        with self.service.lock:
            began = time.perf_counter()
            image = generate_local(self.service.device, prompt, steps=steps, seed=seed, guidance=guidance,
                                   negative_prompt=negative, size=size)
            cloud_steps = len(self.service.device.pipe.scheduler.timesteps)
        # a fresh copy: a grey image is a (H, W, 1) view whose last stride is not 1 (numpy still calls it contiguous)
        blob = encode(torch.from_numpy(image.copy(order="C")), get_codec("fp32")).blob
        emit(_result(0, began, [blob]))
        # cloud_steps: the U-Net calls of the schedule (more than `steps` for PNDM or Heun), as in split mode
        emit(json_frame(FrameType.DONE, {"compute_seconds": time.perf_counter() - began,
                                         "cloud_steps": cloud_steps}))
