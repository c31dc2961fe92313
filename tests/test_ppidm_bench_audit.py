"""`bench ppidm` and `audit diffusion --protocol ppidm` on a tiny pipeline (their full runs: docs/diffusion.md,
docs/privacy.md), and the shape-only traffic model that gives the paper-scale tables."""

from __future__ import annotations

import json

import pytest
import torch

from lambdasplit.cli import main
from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.ppidm.driver import ShardedUNet, ShardPool, Traffic
from lambdasplit.diffusion.ppidm.run import load_device
from lambdasplit.diffusion.ppidm.service import UNetShardService
from lambdasplit.diffusion.ppidm.shards import LocalShard, ShapeShard
from lambdasplit.diffusion.split import Device, predict_noise
from lambdasplit.diffusion.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("ppidm-bench") / "sd", "sd")


def test_shape_only_traffic_equals_real_frames(folder):
    """bench's paper-scale tables come from ShapeShard: its byte counts must be the real frames'."""
    local = Device.load(folder, with_unet=True)
    cond = local.encode("a cat", None, 3.0, (16, 16))
    latents = local.initial_latents(torch.Generator().manual_seed(0), (16, 16))
    t = local.timesteps(2)[0]
    device = load_device(folder, mode="exact", small_maps="refuse")
    service = UNetShardService(str(folder))
    for codec in ("fp32", "fp16"):
        real = ShardPool([LocalShard(service, codec=codec, up_codec=codec) for _ in range(4)])
        device.sharded.attach(real)
        predict_noise(device.unet, latents, t, cond, 3.0)
        skeleton = ShardedUNet.skeleton(local.unet.config)
        convs = [local.unet.get_submodule(name).to("meta") for name in wire_ops.conv_names(local.unet)]
        shapes = ShardPool([ShapeShard(convs, codec=codec, up_codec=codec) for _ in range(4)], Traffic(4))
        skeleton.attach(shapes)
        skeleton.unet(torch.cat([latents] * 2).to("meta"), t, encoder_hidden_states=cond.prompt_embeds.to("meta"))
        def bytes_only(pool):
            return {kind: {k: v for k, v in row.items() if k != "seconds_per_step"}
                    for kind, row in pool.traffic.summary(1).items()}

        assert bytes_only(real) == bytes_only(shapes) and bytes_only(real)["conv"]["up_max_layer_bytes"] > 0


def test_bench_ppidm_tiny(folder, capsys):
    assert main(["bench", "ppidm", "--model", str(folder), "--servers", "2", "--codecs", "fp32", "--prompts", "1",
                 "--steps", "2", "--in-thread", "--small-maps", "refuse", "--no-paper-scale", "--batching", "off,on",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["mode"], r["codec"]): r for r in report["quality"]}
    assert rows[("exact", "fp32")]["identical"] == 1 and rows[("exact", "fp32")]["max_abs"] < 1e-5
    assert rows[("paper", "fp32")]["identical"] == 0
    single, batched = report["traffic"]  # the same image with one layer per round trip, then batched
    assert not single["batching"] and batched["batching"]
    assert single["round_trips_per_step"] > batched["round_trips_per_step"] > 0
    assert sum(single["bytes_up_per_server"]) > sum(batched["bytes_up_per_server"])
    assert batched["per_layer_type"]["conv"]["up_bytes_per_server_per_step"][0] > 0
    compute = report["compute"][0]
    assert 0.5 < compute["offloaded"] < 1.0
    assert compute["round_trips_unbatched"] == single["round_trips_per_step"]
    assert compute["round_trips_batched"] == batched["round_trips_per_step"]


def test_audit_ppidm_tiny(folder, capsys):
    assert main(["audit", "diffusion", "--protocol", "ppidm", "--model", str(folder), "--servers", "2", "--prompts", "2",
                 "--steps", "2", "--train-images", "4", "--cnn-seconds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    results = {r["attack"]: r for r in report["results"]}
    one = results["latent block: 1 server"]
    everything = next(r for name, r in results.items() if name.startswith("latent block: all"))
    assert one["area"] == 0.5 and everything["area"] == 1.0
    assert everything["region_psnr"] > 30 > one["region_psnr"]  # all blocks together are the image; one block is not
    assert results["prompt from cross-attention K (1 server)"]["top1"] == 1.0  # closed world: the audited prompts
    for attack in ("K inverter, ridge", "K+V inverter, ridge", "K+V inverter, CNN"):  # trained, run, scored
        assert results[f"{attack} (1 server)"]["samples"] == 4 and results[f"{attack} (1 server)"]["image_psnr"] > 0
    assert report["meta"]["cnn_inverter"]["seconds"] < 10 and report["meta"]["cnn_inverter"]["epochs"] > 0
