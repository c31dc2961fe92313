"""`imagine --protocol shared --servers A,B`: the U-Net's convolutions and linear projections on shares.

The device builds the pipeline's UNet2DConditionModel from its config, replaces every
Conv2d by a `SharedConv` and every Linear by a `SharedLinear` (no weights on the device),
and loads the rest from the safetensors: group norms, layer norms, the time-step
sinusoids. The stock diffusers forward then runs on the device (group norm, attention
softmax, activations, residuals, up-sampling) and the ordinary denoising loop
(diffusion/client.denoise) drives it with the scheduler and the VAE on the device; each
proxy computes its layer through the two servers (device.SharePair). Self-attention's
q, k, v go in one request, cross-attention's k, v in one.

The prompt never leaves the device in the clear (its embeddings reach the servers only as
shares of the cross-attention inputs), nor does any latent or feature map.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lambdasplit.diffusion.client import ImageResult, _Clock, default_settings, denoise
from lambdasplit.diffusion.split import Device
from lambdasplit.errors import LambdaSplitError
from lambdasplit.shares.device import SharedLinear, SharePair, SharesSession, group_siblings
from lambdasplit.shares.layers import unet_layer_names
from lambdasplit.shares.run import parse_servers
from lambdasplit.wire.link import Link


class SharedConv(SharedLinear):
    """A Conv2d computed on shares (the input is [B, C, H, W]); holds no weights."""


class SharedUNet:
    """The device's U-Net for the shared protocol; `unet` is a diffusers U-Net whose heavy layers are proxies."""

    def __init__(self, unet, fingerprint: str):
        self.unet, self.fingerprint = unet, fingerprint
        self.pair: SharePair | None = None
        self.device_parameters = 0

    @classmethod
    def load(cls, info) -> "SharedUNet":
        from diffusers import UNet2DConditionModel
        from safetensors import safe_open

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(info.folder / "unet"))
        self = cls(unet, info.fingerprint)
        for index, name in enumerate(unet_layer_names(unet)):
            meta = unet.get_submodule(name)
            if isinstance(meta, nn.Conv2d):
                proxy = SharedConv(index, name, meta.in_channels, meta.out_channels, self)
            else:
                proxy = SharedLinear(index, name, meta.in_features, meta.out_features, self)
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, proxy)
        group_siblings(unet)
        wanted = set(unet.state_dict())
        state = {}
        for path in sorted((info.folder / "unet").glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                for key in wanted & set(f.keys()):
                    state[key] = f.get_tensor(key).float()
        missing = wanted - set(state)
        if missing:
            raise LambdaSplitError(f"{info.folder}/unet: tensors not in the safetensors: {sorted(missing)[:3]}")
        unet.load_state_dict(state, strict=True, assign=True)
        self.device_parameters = sum(t.numel() for t in state.values())
        unet.eval()
        return self

    def connect(self, servers: list[str], *, token=None, tls_ca=None, link=None, captures=None, **options) -> SharePair:
        tokens = token if isinstance(token, (list, tuple)) else [token, token]
        cas = tls_ca if isinstance(tls_ca, (list, tuple)) else [tls_ca, tls_ca]
        shared_link = Link.parse(link) if isinstance(link, str) else link
        sessions = []
        try:
            for i, address in enumerate(servers):
                sessions.append(SharesSession(address, fingerprint=self.fingerprint, share=i, lm_head=False,
                                              token=tokens[i], tls_ca=cas[i], link=shared_link,
                                              capture=captures[i] if captures else None, **options))
            self.pair = SharePair(sessions, False)
        except BaseException:
            for session in sessions:
                session.close()
            raise
        return self.pair


def load_device(model, *, scheduler: str | None = None) -> Device:
    device = model if isinstance(model, Device) else Device.load(model, scheduler=scheduler)
    shared = SharedUNet.load(device.info)
    device.pipe.unet = shared.unet
    device.shared = shared
    device.loaded = [part for part in device.loaded if part != "unet"] + ["unet without convolution / linear weights"]
    return device


def imagine_shared(model, prompt: str, *, servers, steps: int | None = None, seed: int = 42,
                   guidance: float | None = None, negative_prompt: str | None = None, size=None,
                   scheduler: str | None = None, token=None, tls_ca=None, link=None, captures=None,
                   on_step=None, timeout: float | None = None) -> ImageResult:
    """One image with the U-Net on shares over the two servers; `model` may be a Device from load_device."""
    default_steps, default_guidance = default_settings()
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    addresses = parse_servers(servers)
    load_began = time.perf_counter()
    device = model if isinstance(model, Device) and hasattr(model, "shared") else load_device(model, scheduler=scheduler)
    record = {"mode": "split", "protocol": "shared", "prompt": prompt, "steps": steps, "seed": seed,
              "guidance": guidance, "codec": None, "loaded": list(device.loaded),
              "load_seconds": time.perf_counter() - load_began}
    pair = device.shared.connect(addresses, token=token, tls_ca=tls_ca, link=link, captures=captures,
                                 **({"timeout": timeout} if timeout else {}))
    clock = _Clock()
    began, cpu0 = time.perf_counter(), time.process_time()
    try:
        image = denoise(device, prompt, steps=steps, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                        size=size, clock=clock, on_step=on_step)
    finally:
        pair.close()
    seconds = time.perf_counter() - began
    unet_calls = len(device.pipe.scheduler.timesteps)
    costs = pair.costs
    record.update({
        "servers": addresses, "cloud_steps": unet_calls,
        "bytes_up": sum(pair.bytes_up), "bytes_down": sum(pair.bytes_down),
        "bytes_up_per_server": pair.bytes_up, "bytes_down_per_server": pair.bytes_down,
        "round_trips": costs.requests, "round_trips_per_step": costs.requests / unet_calls,
        "seconds": seconds, "device_cpu_seconds": time.process_time() - cpu0,
        "cloud_seconds": costs.server_seconds, "comm_seconds": max(0.0, costs.wait_seconds - costs.server_seconds),
        "local_seconds": max(0.0, seconds - costs.wait_seconds),
    })
    return ImageResult(image, record)


def imagine_for_command(args):
    """`imagine --protocol shared`: a function with client.imagine's signature."""

    def run(model, prompt, *, mode, server, protocol, local_steps, verify, keep_wire, codec, up_codec, **options):
        if mode != "split":
            raise LambdaSplitError("--protocol shared is a split mode (drop --mode local/cloud)")
        if server:
            raise LambdaSplitError("--protocol shared takes --servers A,B (two `serve --component shares` servers), "
                                   "not --server")
        if local_steps or verify or keep_wire or codec != "fp32" or up_codec != "fp32":
            raise LambdaSplitError("--local-steps, --verify-sync, --show-wire and --codec / --up-codec are not "
                                   "available with --protocol shared (shares are exact ring elements)")
        return imagine_shared(model, prompt, servers=args.servers, **options)

    return run
