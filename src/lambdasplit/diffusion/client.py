"""Text to image on the device, in any mode, with its measurements: what `imagine --json` prints.

    local  the whole pipeline here; nothing crosses a network
    split  head (text encoders, noise sampler) and tail (scheduler, VAE decoder) here, the
           U-Net on a server, over the cloud-latent or client-latent protocol
           (diffusion/protocols.py); `local_steps=K` keeps the last K denoising steps here
           (the device then loads the U-Net too), so the cloud never sees the final latents
    cloud  the prompt text goes to the server, which runs the whole pipeline (baseline)

One loop (`denoise`) serves every mode: only where the noise of step i comes from
differs, so the same seed gives the same image everywhere (bit-exact with fp32 codecs).
Time is split as in generate: local (device compute), cloud (U-Net compute, timed by the
server), communication (the rest of the wall time).

The record has the same keys in every mode, and every key of `generate --json` that
means something for an image, under the same name (RECORD_KEYS); the LLM-only ones
(LLM_ONLY_KEYS: text, token counts, KV cache, layer split) are left out rather than
filled with values that would mean something else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lambdasplit.diffusion import protocols as proto
from lambdasplit.diffusion.split import Device, PipelineInfo, check_scheduler, predict_noise, to_pil
from lambdasplit.errors import LambdaSplitError


RECORD_KEYS = (
    # shared with generate --json (client/run.py), same names and meaning
    "mode", "codec", "bytes_up", "bytes_down", "round_trips", "seconds", "local_seconds", "cloud_seconds",
    "comm_seconds", "payload_bytes", "scale_bytes",
    # diffusion's own
    "protocol", "prompt", "steps", "seed", "guidance", "up_codec", "local_steps", "loaded", "load_seconds",
    "payload_bytes_up", "payload_bytes_down", "scale_bytes_up", "scale_bytes_down", "blob_header_bytes",
    "sync_bytes_down", "framing_bytes", "noise_payload_bytes_per_step", "cloud_steps",
)
LLM_ONLY_KEYS = ("split", "cache", "text", "token_ids", "prompt_tokens", "new_tokens", "tokens_per_second")


def default_settings() -> tuple[int, float]:
    """Steps and guidance the bundled digits model is evaluated with."""
    from lambdasplit.zoo.digits import GUIDANCE, STEPS

    return STEPS, GUIDANCE


@dataclass
class ImageResult:
    image: np.ndarray  # (H, W, C) float32 in [0, 1], the pipeline's output_type="np"
    record: dict
    wire: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> noise as the device received it

    @property
    def pil(self):
        return to_pil(self.image)


@dataclass
class _Clock:
    local: float = 0.0

    def run(self, fn, *args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.local += time.perf_counter() - began


def denoise(device: Device, prompt: str, *, steps: int, seed: int, guidance: float, negative_prompt: str | None = None,
            size: tuple[int, int] | None = None, remote=None, local_steps: int = 0, clock: _Clock | None = None,
            on_step=None) -> np.ndarray:
    """The one denoising loop. `remote` (a protocols session opener) supplies the noise of the
    first steps - local_steps; the device's own U-Net the rest (all of them when remote is None)."""
    clock = clock or _Clock()
    size = tuple(size) if size else (device.info.default_size(),) * 2
    factor = device.pipe.vae_scale_factor
    if len(size) != 2 or any(side <= 0 or side % factor for side in size):
        raise LambdaSplitError(f"image size must be two positive multiples of {factor} (the VAE's scale factor), got {size}")
    generator = torch.Generator().manual_seed(seed)
    cond = clock.run(device.encode, prompt, negative_prompt, guidance, size)
    timesteps = device.timesteps(steps)
    latents = clock.run(device.initial_latents, generator, size)
    step_kwargs = device.step_kwargs(generator)
    scheduler = device.pipe.scheduler
    # Steps are counted as U-Net calls (schedule entries), as the server counts cloud_steps:
    # more than `steps` for PNDM, 2 steps - 1 for Heun.
    cloud_steps = len(timesteps) - local_steps if remote is not None else 0
    if cloud_steps < 0 or local_steps < 0:
        raise LambdaSplitError(f"--local-steps must be between 0 and the {len(timesteps)} U-Net calls of the "
                               f"{type(scheduler).__name__} schedule of {steps} steps")
    if local_steps and device.unet is None:
        raise LambdaSplitError("local steps need the U-Net on the device (load the Device with with_unet=True)")
    session = remote(timesteps, cloud_steps) if cloud_steps else None
    if isinstance(session, proto.CloudLatentSession):
        latents = session.start(cond.tensors(), latents)
    for i, t in enumerate(timesteps):
        # Scaled in every mode, as the pipeline does: cloud-latent does not send it, but some
        # schedulers keep state in scale_model_input (Euler warns when step() runs without it).
        model_input = clock.run(scheduler.scale_model_input, latents, t)
        if i < cloud_steps and isinstance(session, proto.CloudLatentSession):
            noise, digest = session.noise(i)
        elif i < cloud_steps:
            noise, digest = session.noise(i, model_input, cond.tensors() if i == 0 else None), None
        else:
            noise, digest = clock.run(predict_noise, device.unet, model_input, t, cond, guidance), None
        latents = clock.run(scheduler.step, noise, t, latents, **step_kwargs, return_dict=False)[0]
        if digest is not None and not torch.equal(digest, proto.latent_digest(latents)):
            raise LambdaSplitError(f"cloud-latent: the cloud's latent differs from the device's after step {i}")
        if on_step:
            on_step(i, len(timesteps))
    return clock.run(device.decode, latents, generator)


def generate_local(device: Device, prompt: str, **options) -> np.ndarray:
    return denoise(device, prompt, **options)


def imagine(model: str | Device, prompt: str, *, mode: str = "split", server: str | None = None,
            protocol: str = "cloud-latent", steps: int | None = None, seed: int = 42, guidance: float | None = None,
            negative_prompt: str | None = None, size: tuple[int, int] | None = None, codec: str = "fp32",
            up_codec: str = "fp32", local_steps: int = 0, scheduler: str | None = None, verify: bool = False,
            keep_wire: tuple[int, ...] = (), token: str | None = None, tls_ca: str | None = None, link=None,
            capture: list | None = None, on_step=None) -> ImageResult:
    """Make one image and measure it. Pass a loaded `Device` as `model` to reuse its weights."""
    default_steps, default_guidance = default_settings()
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    options = dict(token=token, tls_ca=tls_ca, link=link, capture=capture)
    record = {"mode": mode, "protocol": protocol if mode == "split" else None, "prompt": prompt, "steps": steps,
              "seed": seed, "guidance": guidance, "codec": codec if mode == "split" else None,
              "up_codec": up_codec if mode == "split" else None, "local_steps": local_steps if mode == "split" else 0}
    began = time.perf_counter()  # reset once the weights (cloud mode: the configs) are loaded
    if mode == "cloud":
        if not server:
            raise LambdaSplitError("cloud mode needs --server HOST:PORT (a `serve --component pipeline` server)")
        info = model.info if isinstance(model, Device) else PipelineInfo.read(model)  # configs only
        record.update(loaded=[], load_seconds=time.perf_counter() - began)
        request = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "seed": seed,
                   "guidance": guidance, "size": list(size) if size else None}
        began = time.perf_counter()
        with proto.CloudImageClient(server, fingerprint=info.fingerprint, **options) as client:
            image, done = client.generate(request)
            client.close()
        record.update(_measures(client, time.perf_counter() - began, 0.0), **_payloads(client))
        record["cloud_steps"] = int(done.get("cloud_steps", steps))  # every U-Net call ran in the cloud
        return ImageResult(image, record)
    if mode not in ("local", "split"):
        raise LambdaSplitError(f"mode must be split, local or cloud, not {mode!r}")
    if mode == "split" and protocol not in proto.PROTOCOLS:
        raise LambdaSplitError(f"protocol must be one of {', '.join(proto.PROTOCOLS)}, not {protocol!r}")
    if mode == "split" and not server:
        raise LambdaSplitError("split mode needs --server HOST:PORT (a `serve --component unet` server)")
    needs_unet = mode == "local" or local_steps > 0
    clock = _Clock()
    load_began = time.perf_counter()
    if isinstance(model, Device):
        device = model
        if needs_unet and device.unet is None:
            raise LambdaSplitError("this mode runs U-Net steps on the device: load the Device with with_unet=True")
    else:
        device = Device.load(model, with_unet=needs_unet, scheduler=scheduler)
    record["loaded"] = list(device.loaded)
    record["load_seconds"] = time.perf_counter() - load_began
    began = time.perf_counter()  # timings cover generation, not loading weights (as generate --json)
    sessions = []

    def remote(timesteps, cloud_steps):
        if protocol == "cloud-latent":
            reason = check_scheduler(device.pipe.scheduler)
            if reason:
                raise LambdaSplitError(f"cloud-latent: {reason}")
            session = proto.CloudLatentSession(
                server, fingerprint=device.info.fingerprint, steps=steps, cloud_steps=cloud_steps, guidance=guidance,
                scheduler=device.pipe.scheduler, codec=codec, up_codec=up_codec, verify=verify, **options)
        else:
            session = proto.ClientLatentSession(server, fingerprint=device.info.fingerprint, timesteps=timesteps,
                                                guidance=guidance, codec=codec, up_codec=up_codec, **options)
        session.keep = set(keep_wire)
        sessions.append(session)
        return session

    try:
        image = denoise(device, prompt, steps=steps, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                        size=size, remote=remote if mode == "split" else None,
                        local_steps=local_steps if mode == "split" else 0, clock=clock, on_step=on_step)
    finally:
        for session in sessions:
            session.close()
    session = sessions[0] if sessions else None
    record.update(_measures(session, time.perf_counter() - began, clock.local), **_payloads(session))
    return ImageResult(image, record, dict(session.received) if session else {})


def _measures(session, seconds: float, local_s: float) -> dict:
    cloud_s = session.cloud_seconds if session else 0.0
    return {
        "bytes_up": session.bytes_up if session else 0,
        "bytes_down": session.bytes_down if session else 0,
        "round_trips": session.round_trips if session else 0,
        "seconds": seconds, "local_seconds": local_s, "cloud_seconds": cloud_s,
        "comm_seconds": max(0.0, seconds - local_s - cloud_s) if session else 0.0,
    }


def _payloads(session) -> dict:
    """Where the socket bytes went; they add up: payload + scales + blob headers + sync + framing.
    `session` is a DiffusionSession, a CloudImageClient (the image is the payload) or None (local)."""
    up, down = (session.up, session.down) if session is not None else (proto.Accounting(), proto.Accounting())
    blob_bytes = sum(a.payload_bytes + a.scale_bytes + a.header_bytes + a.sync_bytes for a in (up, down))
    return {
        "payload_bytes": up.payload_bytes + down.payload_bytes,
        "payload_bytes_up": up.payload_bytes, "payload_bytes_down": down.payload_bytes,
        "scale_bytes": up.scale_bytes + down.scale_bytes,
        "scale_bytes_up": up.scale_bytes, "scale_bytes_down": down.scale_bytes,
        "blob_header_bytes": up.header_bytes + down.header_bytes,
        "sync_bytes_down": down.sync_bytes,  # --verify-sync digests (whole blobs), not payload
        # everything else on the socket: frame headers, HELLO / WELCOME / GENERATE / CLOSE JSON, TLS records
        "framing_bytes": session.bytes_up + session.bytes_down - blob_bytes if session is not None else 0,
        "noise_payload_bytes_per_step": down.per_step_payload[0] if down.per_step_payload else 0,
        "cloud_steps": len(down.per_step_payload),
    }
