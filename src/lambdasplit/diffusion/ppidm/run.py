"""`imagine --protocol ppidm`: one image with the U-Net's heavy layers on n shard servers.

The device loads the pipeline's head and tail as in split mode (text encoders, scheduler,
VAE decoder) plus the U-Net minus its convolution weights (driver.ShardedUNet), opens one
session per server, and runs the ordinary denoising loop (client.denoise). With a link
(`--link 5g`) ONE emulated link is shared by all n sessions: the device has one uplink.
"""

from __future__ import annotations

import time

from lambdasplit.diffusion.client import ImageResult, _Clock, default_settings, denoise
from lambdasplit.diffusion.ppidm.driver import ShardedUNet, ShardPool, Traffic
from lambdasplit.diffusion.ppidm.shards import LocalShard, RemoteShard
from lambdasplit.diffusion.split import Device
from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.link import Link


def parse_servers(text: str | list[str] | None) -> list[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text or [])
    if len(servers) < 2:
        raise LambdaSplitError("ppidm needs --servers A,B[,...]: at least two `serve --component unet-shard` servers "
                               "(one alone would see every feature map)")
    if len(set(servers)) != len(servers):
        raise LambdaSplitError("ppidm: the same server is listed twice in --servers (it would see two blocks)")
    return servers


def load_device(model, *, mode: str, small_maps: str, scheduler: str | None = None) -> Device:
    """The device for ppidm: Device without the U-Net, then the sharded U-Net in its place."""
    device = model if isinstance(model, Device) else Device.load(model, scheduler=scheduler)
    sharded = ShardedUNet.load(device.info.folder, mode=mode, small_maps=small_maps)
    device.pipe.unet = sharded.unet
    device.sharded = sharded
    device.loaded = [part for part in device.loaded if part != "unet"] + ["unet without convolution weights"]
    return device


def imagine_ppidm(model, prompt: str, *, servers=None, local_services=None, mode: str = "exact",
                  small_maps: str = "refuse", steps: int | None = None, seed: int = 42, guidance: float | None = None,
                  negative_prompt: str | None = None, size=None, codec: str = "fp32", up_codec: str = "fp32",
                  scheduler: str | None = None, token: str | None = None, tls_ca: str | None = None, link=None,
                  captures: list[list] | None = None, on_step=None, batching: bool = True) -> ImageResult:
    """Make one image over n shard servers (`servers`: addresses) or n in-process `local_services`.

    `model` may be a Device from `load_device` (reused across images, its mode and small-maps
    policy are set again here). `captures`, one list per server, records each session's bytes.
    """
    default_steps, default_guidance = default_settings()
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    load_began = time.perf_counter()
    device = model if isinstance(model, Device) and hasattr(model, "sharded") else \
        load_device(model, mode=mode, small_maps=small_maps, scheduler=scheduler)
    device.sharded.mode, device.sharded.small_maps, device.sharded.batching = mode, small_maps, batching
    load_seconds = time.perf_counter() - load_began
    record = {"mode": "split", "protocol": "ppidm", "ppidm_mode": mode, "ppidm_small_maps": small_maps,
              "ppidm_batching": batching,
              "prompt": prompt, "steps": steps, "seed": seed, "guidance": guidance, "codec": codec,
              "up_codec": up_codec, "local_steps": 0, "loaded": list(device.loaded), "load_seconds": load_seconds}
    shared_link = Link.parse(link)
    if local_services is not None:
        shards = [LocalShard(service, codec=codec, up_codec=up_codec) for service in local_services]
    else:
        addresses = parse_servers(servers)
        shards = []
        try:
            for i, address in enumerate(addresses):
                shards.append(RemoteShard(address, fingerprint=device.info.fingerprint, codec=codec, up_codec=up_codec,
                                          token=token, tls_ca=tls_ca, link=shared_link,
                                          capture=captures[i] if captures is not None else None))
        except BaseException:
            for shard in shards:
                shard.close()
            raise
    pool = ShardPool(shards, Traffic(len(shards)))
    device.sharded.attach(pool)
    clock = _Clock()
    began = time.perf_counter()
    try:
        image = denoise(device, prompt, steps=steps, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                        size=size, clock=clock, on_step=on_step)
    finally:
        pool.close()
    seconds = time.perf_counter() - began
    unet_calls = len(device.pipe.scheduler.timesteps)
    exchange_seconds = sum(k.seconds for k in pool.traffic.kinds.values())
    record.update({
        "servers": len(shards),
        "bytes_up": sum(s.bytes_up for s in shards), "bytes_down": sum(s.bytes_down for s in shards),
        "bytes_up_per_server": [s.bytes_up for s in shards], "bytes_down_per_server": [s.bytes_down for s in shards],
        "round_trips": pool.traffic.round_trips, "round_trips_per_step": pool.traffic.round_trips / unet_calls,
        "cloud_steps": unet_calls, "seconds": seconds,
        "local_seconds": clock.local - exchange_seconds, "cloud_seconds": pool.server_seconds,
        "comm_seconds": max(0.0, exchange_seconds - pool.server_seconds),
        "per_layer_type": pool.traffic.summary(unet_calls),
        "server_flops_per_step": sum(k.server_flops for k in pool.traffic.kinds.values()) / unet_calls,
        "device_local_layers": dict(pool.traffic.local_layers),
    })
    return ImageResult(image, record)


def imagine_for_command(args):
    """`imagine --protocol ppidm`: a function with client.imagine's signature that runs ppidm."""

    def run(model, prompt, *, mode, server, protocol, local_steps, verify, keep_wire, **options):
        if mode != "split":
            raise LambdaSplitError("--protocol ppidm is a split mode (drop --mode local/cloud)")
        if server:
            raise LambdaSplitError("--protocol ppidm takes --servers A,B,... (n unet-shard servers), not --server")
        if local_steps or verify or keep_wire:
            raise LambdaSplitError("--local-steps, --verify-sync and --show-wire are not available with --protocol ppidm")
        return imagine_ppidm(model, prompt, servers=parse_servers(args.servers), mode=args.ppidm_mode,
                             small_maps=args.ppidm_small_maps,
                             batching=getattr(args, "ppidm_batching", "on") == "on", **options)

    return run
