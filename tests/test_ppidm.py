"""PPIDM (diffusion/ppidm/): the U-Net's heavy layers cut across n shard servers.

Exact mode equals the unsplit pipeline (1e-5 fp32) for SD- and SDXL-style tiny U-Nets,
in-process for n = 2, 4, 8 and through real `serve --component unet-shard` processes over
the CLI for n = 2 and 4; what each server's transport received never holds a whole
feature map of a convolution or group-norm input; batching (several layers per round
trip) keeps the image and cuts round trips; maps that cannot be cut are refused by name; a
bad request fails only its own session.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lambdasplit.cli import main
from lambdasplit.diffusion.client import denoise
from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.ppidm.blocks import PartitionError, conv_blocks, grid
from lambdasplit.diffusion.ppidm.run import imagine_ppidm, load_device
from lambdasplit.diffusion.ppidm.service import UNetShardService
from lambdasplit.diffusion.ppidm.shards import RemoteShard
from lambdasplit.diffusion.protocols import parse_blobs, split_frames
from lambdasplit.diffusion.split import Device
from lambdasplit.diffusion.tiny import build_tiny_pipeline
from lambdasplit.errors import RemoteError
from lambdasplit.server import BodyServer
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.frames import FrameType

STEPS, SEED, GUIDANCE, PROMPT = 3, 7, 3.0, "a red cat"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppidm")
    return {kind: build_tiny_pipeline(root / kind, kind) for kind in ("sd", "sdxl")}


@pytest.fixture(scope="module")
def references(folders):
    """The unsplit pipeline's images (local mode equals diffusers: tests/test_diffusion.py)."""
    return {kind: denoise(Device.load(folder, with_unet=True), PROMPT, steps=STEPS, seed=SEED, guidance=GUIDANCE)
            for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def services(folders):
    return {kind: [UNetShardService(str(folder)) for _ in range(8)] for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def shard_servers(folders, services):
    """SD: four real `serve --component unet-shard` processes, started in parallel (each takes
    ~20 s to import on a loaded 2-core machine, so SDXL gets four in-thread servers instead:
    real sockets, the same service and handler, one process)."""
    processes = [ServerProcess(["--component", "unet-shard", "--model", str(folders["sd"])], env=ONE_THREAD)
                 for _ in range(4)]
    threads = [BodyServer([service]) for service in services["sdxl"][:4]]
    with ThreadPoolExecutor(len(processes)) as pool:
        list(pool.map(lambda process: process.start(), processes))
    for server in threads:
        server.start_in_thread()
    yield {"sd": [p.address for p in processes], "sdxl": [s.address for s in threads]}
    for process in processes:
        process.stop()
    for server in threads:
        server.stop()


def test_grid_and_halo_blocks():
    assert [grid(n) for n in (2, 3, 4, 8)] == [(2, 1), (3, 1), (2, 2), (4, 2)]
    blocks = conv_blocks(8, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1))
    assert blocks[0].in_rows == (0, 5) and blocks[0].pads == (1, 0, 1, 0)  # halo below, zero padding above
    assert blocks[3].in_rows == (3, 8) and blocks[3].pads == (0, 1, 0, 1)
    down = conv_blocks(8, 8, 2, (3, 3), (2, 2), (1, 1), (1, 1))  # stride-2 downsampler: 4x4 out
    assert [b.in_rows for b in down] == [(0, 4), (3, 8)] and down[1].pads == (0, 0, 1, 0)
    with pytest.raises(PartitionError, match="does not divide into 3 blocks"):
        conv_blocks(8, 8, 3, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(PartitionError, match="needs the whole map"):
        conv_blocks(2, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_exact_mode_equals_unsplit_in_process(kind, folders, references, services):
    device = load_device(folders[kind], mode="exact", small_maps="refuse")
    records = {}
    for n in (2, 4, 8):
        result = imagine_ppidm(device, PROMPT, local_services=services[kind][:n], mode="exact", steps=STEPS, seed=SEED,
                               guidance=GUIDANCE)
        assert np.abs(result.image - references[kind]).max() < 1e-5, n
        record = result.record
        assert record["servers"] == n and record["device_local_layers"] == {}
        assert set(record["per_layer_type"]) == {"conv", "group_norm", "attention"}
        records[n] = record
    paper = imagine_ppidm(device, PROMPT, local_services=services[kind][:4], mode="paper", steps=STEPS, seed=SEED,
                          guidance=GUIDANCE)
    assert np.abs(paper.image - references[kind]).max() > 1e-3  # local statistics are not the pipeline's
    # batching off: one layer per round trip; on (above): skip convs ride with conv1, the norms
    # fed by a conv get their statistics from it; fewer round trips, the same image
    single = imagine_ppidm(device, PROMPT, local_services=services[kind][:2], steps=STEPS, seed=SEED, guidance=GUIDANCE,
                           batching=False)
    assert np.abs(single.image - references[kind]).max() < 1e-5
    assert single.record["round_trips_per_step"] > records[2]["round_trips_per_step"] + 10
    assert sum(single.record["bytes_up_per_server"]) > sum(records[2]["bytes_up_per_server"])  # the fused norms' uploads
    unbatched = imagine_ppidm(device, PROMPT, local_services=services[kind][:4], mode="paper", steps=STEPS, seed=SEED,
                              guidance=GUIDANCE, batching=False)
    assert np.abs(unbatched.image - paper.image).max() < 1e-5  # the fused statistics are the blocks' own, per block


def test_device_never_holds_convolution_weights(folders):
    device = load_device(folders["sd"], mode="exact", small_maps="refuse")
    names = set(device.pipe.unet.state_dict())
    convs = wire_ops.conv_names(Device.load(folders["sd"], with_unet=True).unet)
    assert convs and not any(f"{name}.weight" in names for name in convs)
    assert "unet" not in device.loaded


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_exact_over_shard_servers_and_cli(kind, folders, references, shard_servers, tmp_path, capsys):
    addresses = shard_servers[kind]
    for n in (2, 4):
        result = imagine_ppidm(folders[kind], PROMPT, servers=addresses[:n], steps=STEPS, seed=SEED, guidance=GUIDANCE)
        assert np.abs(result.image - references[kind]).max() < 1e-5
        record = result.record
        assert record["bytes_up"] == sum(record["bytes_up_per_server"]) > 0
        assert record["round_trips_per_step"] == record["round_trips"] / STEPS
    common = ["imagine", "--model", str(folders[kind]), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", str(SEED),
              "--guidance", str(GUIDANCE), "--json"]
    assert main([*common, "--mode", "local", "--out", str(tmp_path / "local.png")]) == 0
    for n in (2, 4):
        capsys.readouterr()
        out = tmp_path / f"ppidm-{n}.png"
        assert main([*common, "--protocol", "ppidm", "--servers", ",".join(addresses[:n]), "--out", str(out)]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["protocol"] == "ppidm" and record["servers"] == n and record["ppidm_mode"] == "exact"
        assert out.read_bytes() == (tmp_path / "local.png").read_bytes()


def _input_sizes(folder) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Full input map size of every Conv2d (by index) and every GroupNorm input area, from the unsplit U-Net."""
    device = Device.load(folder, with_unet=True)
    conv_sizes, norm_areas, hooks = {}, set(), []
    for index, name in enumerate(wire_ops.conv_names(device.unet)):
        module = device.unet.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, index=index: conv_sizes.update({index: tuple(args[0].shape[2:])})))
    for module in device.unet.modules():
        if isinstance(module, torch.nn.GroupNorm):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args: norm_areas.add(args[0].shape[2] * args[0].shape[3]) and None))
    denoise(device, PROMPT, steps=1, seed=SEED, guidance=GUIDANCE)
    for hook in hooks:
        hook.remove()
    return conv_sizes, norm_areas


def test_no_server_receives_a_whole_feature_map(folders, shard_servers):
    n = 4
    conv_sizes, norm_areas = _input_sizes(folders["sd"])
    captures = [[] for _ in range(n)]
    imagine_ppidm(folders["sd"], PROMPT, servers=shard_servers["sd"][:n], steps=STEPS, seed=SEED, guidance=GUIDANCE,
                  captures=captures)
    for capture in captures:
        up = b"".join(data for direction, data in capture if direction == "up")
        seen = {"conv": set(), "group_norm": 0, "batched frames": 0, "conv with statistics": 0}
        for frame_type, body in split_frames(up):
            if frame_type != FrameType.STEP:
                continue
            ops = wire_ops.parse_ops([t for t, _, _ in parse_blobs(body, 4)])
            seen["batched frames"] += len(ops) > 1
            seen["conv with statistics"] += sum(op.kind == wire_ops.CONV_STATS for op in ops)
            for op in ops:
                if op.kind in wire_ops.CONV_KINDS:
                    height, width = conv_sizes[op.header[0]]
                    h, w = op.tensors[0].shape[2:]
                    assert h * w < height * width and (h < height or w < width)
                    seen["conv"].add(op.header[0])
                elif op.kind == wire_ops.GROUP_NORM:
                    area = op.tensors[0].shape[2] * op.tensors[0].shape[3]
                    assert area * n in norm_areas  # exactly one block of n
                    seen["group_norm"] += 1
        assert seen["conv"] == set(conv_sizes) and seen["group_norm"] > 0  # every layer was offloaded, in part
        assert seen["batched frames"] > 0 and seen["conv with statistics"] > 0  # the batched frames were checked too


def test_maps_that_do_not_divide_are_refused_by_name(folders, services, references):
    with pytest.raises(PartitionError, match=r"conv_in output height: 8 does not divide into 3 blocks"):
        imagine_ppidm(folders["sd"], PROMPT, local_services=services["sd"][:3], steps=1, seed=SEED, guidance=GUIDANCE)
    # an 8x8 image: 4x4 latent, 2x2 at the second level, where a 3x3 block plus halo is the whole map
    with pytest.raises(PartitionError, match="needs the whole map"):
        imagine_ppidm(folders["sd"], PROMPT, local_services=services["sd"][:2], steps=1, seed=SEED, guidance=GUIDANCE,
                      size=(8, 8))
    # --ppidm-small-maps local: those layers run on the device, listed in the record, still exact
    result = imagine_ppidm(folders["sd"], PROMPT, local_services=services["sd"][:3], small_maps="local", steps=STEPS,
                           seed=SEED, guidance=GUIDANCE)
    assert np.abs(result.image - references["sd"]).max() < 1e-5
    assert "conv_in" in result.record["device_local_layers"]


def test_cli_refusals_are_one_line(folders, capsys):
    base = ["imagine", "--model", str(folders["sd"]), "--prompt", PROMPT, "--protocol", "ppidm", "--steps", "1"]
    assert main([*base, "--servers", "127.0.0.1:1"]) != 0
    assert "at least two" in capsys.readouterr().err
    assert main([*base, "--servers", "127.0.0.1:1,127.0.0.1:1"]) != 0
    assert "listed twice" in capsys.readouterr().err


def test_bad_request_fails_its_session_only(folders):
    service = UNetShardService(str(folders["sd"]))
    fingerprint = service.fingerprint
    with BodyServer([service]) as server:
        bad = RemoteShard(server.address, fingerprint=fingerprint, codec="fp32", up_codec="fp32")
        bad.send([wire_ops.Op(wire_ops.CONV, [0, 1, 0, 1, 0], [torch.zeros(1, 5, 4, 4)])])  # conv_in takes 4 channels
        with pytest.raises(RemoteError, match="takes 4 channels"):
            bad.receive()
        good = RemoteShard(server.address, fingerprint=fingerprint, codec="fp32", up_codec="fp32")
        good.send([wire_ops.Op(wire_ops.GROUP_NORM, [0, 2, 0, 0, 0], [torch.arange(32.0).view(1, 2, 4, 4)])])
        (stats,), _, _ = good.receive()
        assert torch.allclose(stats[0, :, 0], torch.tensor([7.5, 23.5]))
        good.close()
