"""`lambdasplit bench ppidm`: PPIDM's quality, traffic per layer type, time and offloaded compute.

    quality      exact and paper mode (and wire codecs) against the unsplit pipeline, for each
                 n: PSNR / SSIM of the 8-bit images, max |difference|, and for zoo:digits the
                 bundled classifier's prompt match. Shards in-process (LocalShard: the same
                 frames and handler as a server, no socket), so it stays fast.
    traffic      one image per n over real sockets (n `serve --component unet-shard`
                 processes, or in-thread servers with --in-thread), every exchange through ONE
                 emulated link (`--link`, default 5g: the device has one uplink): bytes per
                 server and wall time per layer type per denoising step (the shape of the
                 paper's Tables VIII-X), round trips per step, the device's own compute per
                 step against the whole U-Net run locally.
    compute      FLOPs of one U-Net call (torch's FlopCounterMode: convolutions, matmuls,
                 attention) and the part the servers do (their convolutions and attention),
                 against the paper's 67%; round trips and upload per call with one layer per
                 round trip and with batching (driver.py), in-process.
    paper scale  the same traffic and FLOPs for Stable Diffusion 1.5's U-Net at 512 x 512
                 (a 64 x 64 latent, CFG batch 2, 77 text tokens), on the meta device: shapes
                 only, no weights, no download; 5G time computed from bytes as the paper does
                 (81 Mbit/s up, 340 down).
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=32)
# The paper's Tables VIII-X (SD at 512 px), MB per server per denoising step:
# n -> type -> (up min, up max, up total, down min, down max, down total).
PAPER = {2: {"conv": (0.23, 7.96, 85.23, 0.031, 5, 55.18), "attention": (0.90, 2.68, 29.36, 0.15, 2.5, 22.03),
             "group_norm": (0.15, 7.5, 171.87, 0.0002, 0.0002, 0.059)},
         4: {"conv": (0.15, 4.21, 47.03, 0.016, 2.5, 27.59), "attention": (0.83, 1.43, 18.34, 0.07, 1.25, 11.01),
             "group_norm": (0.07, 3.75, 85.93, 0.0002, 0.0002, 0.059)},
         8: {"conv": (0.11, 2.34, 27.92, 0.008, 1.25, 13.79), "attention": (0.68, 0.81, 12.83, 0.03, 0.625, 5.50),
             "group_norm": (0.03, 1.87, 42.96, 0.0002, 0.0002, 0.059)}}
PAPER_N4 = {kind: (v[2], v[5]) for kind, v in PAPER[4].items()}
MB = 1e6


def add_arguments(p) -> None:
    p.add_argument("--model", default="zoo:digits", help="pipeline folder or zoo:NAME (default %(default)s)")
    p.add_argument("--servers", default="2,4,8", help="numbers of shard servers n (default %(default)s)")
    p.add_argument("--modes", default="exact,paper")
    p.add_argument("--codecs", default="fp32,fp16,int8", help="wire codecs for the quality study (both directions)")
    p.add_argument("--prompts", type=int, default=4, help="images per quality row (zoo:digits: one per digit)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--link", default="5g", help="emulated device link for the traffic run (default %(default)s)")
    p.add_argument("--small-maps", choices=["local", "refuse"], default="local",
                   help="layers too small to cut among n servers: run on the device (default) or refuse")
    p.add_argument("--in-thread", action="store_true", help="traffic run: in-thread servers instead of processes")
    p.add_argument("--batching", default="off,on", type=lambda text: [v.strip() == "on" for v in text.split(",")],
                   help="traffic run: one layer per round trip (off) and/or several where the data flow allows (on) "
                        "(default %(default)s)")
    p.add_argument("--no-paper-scale", action="store_true", help="skip the SD 1.5 512 px shape study")
    p.add_argument("--parts", default="quality,traffic,compute,paper", help="which studies (default %(default)s)")
    p.add_argument("--out", type=Path, help="write DIR/report.md and DIR/report.json")
    p.add_argument("--json", action="store_true")


def _prompts(model: str, count: int) -> list[tuple[str, int | None]]:
    if model == "zoo:digits":
        from lambdasplit.zoo.digits_data import prompt

        return [(prompt(d % 10), d % 10) for d in range(count)]
    return [(p, None) for p in ["a red cat", "a blue house", "a green tree", "a yellow car"][:count]] or [("a cat", None)]


def quality(args, ns: list[int]) -> list[dict]:
    from lambdasplit.diffusion.client import denoise
    from lambdasplit.diffusion.ppidm.run import imagine_ppidm, load_device
    from lambdasplit.diffusion.ppidm.service import UNetShardService
    from lambdasplit.diffusion.quality import psnr, ssim
    from lambdasplit.diffusion.split import Device

    judge = None
    if args.model == "zoo:digits":
        from lambdasplit.zoo.digit_classifier import classifier

        judge = classifier()
    prompts = _prompts(args.model, args.prompts)
    local = Device.load(args.model, with_unet=True)
    if args.size and tuple(args.size) != (local.info.default_size(),) * 2:
        judge = None  # the classifier reads the model's own image size only
    steps = args.steps
    refs = [denoise(local, p, steps=steps or _default_steps(), seed=args.seed + i, guidance=_default_guidance(),
                    size=args.size) for i, (p, _) in enumerate(prompts)]
    rows = [{"n": 1, "mode": "unsplit", "codec": "-", **_scores(refs, refs, prompts, judge)}]
    service = UNetShardService(args.model)
    device = load_device(args.model, mode="exact", small_maps=args.small_maps)
    for n in ns:
        for mode in args.modes.split(","):
            for codec in args.codecs.split(","):
                images, local_layers = [], {}
                for i, (p, _) in enumerate(prompts):
                    result = imagine_ppidm(device, p, local_services=[service] * n, mode=mode,
                                           small_maps=args.small_maps, steps=steps, seed=args.seed + i, size=args.size,
                                           codec=codec, up_codec=codec)
                    images.append(result.image)
                    local_layers = result.record["device_local_layers"]
                rows.append({"n": n, "mode": mode, "codec": codec, **_scores(refs, images, prompts, judge),
                             "device_local_layers": sorted(local_layers)})
    return rows


def _default_steps() -> int:
    from lambdasplit.diffusion.client import default_settings

    return default_settings()[0]


def _default_guidance() -> float:
    from lambdasplit.diffusion.client import default_settings

    return default_settings()[1]


def _scores(refs, images, prompts, judge) -> dict:
    from lambdasplit.diffusion.quality import psnr, ssim

    psnrs = [psnr(r, x) for r, x in zip(refs, images)]
    out = {"psnr": float(np.mean([min(v, 100.0) for v in psnrs])), "identical": sum(math.isinf(v) for v in psnrs),
           "ssim": float(np.mean([ssim(r, x) for r, x in zip(refs, images)])),
           "max_abs": float(max(np.abs(r - x).max() for r, x in zip(refs, images))), "images": len(images)}
    if judge is not None:
        out["digit_match"] = float(np.mean([judge.predict(x[None])[0] == d for x, (_, d) in zip(images, prompts)]))
    return out


def traffic(args, ns: list[int]) -> list[dict]:
    import torch  # noqa: PLC0415 (lazy: `bench ppidm --help` and usage errors must not load torch)

    from lambdasplit.diffusion.client import default_settings
    from lambdasplit.diffusion.ppidm.run import imagine_ppidm, load_device
    from lambdasplit.diffusion.ppidm.service import UNetShardService
    from lambdasplit.diffusion.split import Device, predict_noise

    prompt = _prompts(args.model, 1)[0][0]
    steps, guidance = args.steps or default_settings()[0], default_settings()[1]
    # the whole U-Net on the device, per call: what ppidm's device time is compared with
    local = Device.load(args.model, with_unet=True)
    size = tuple(args.size) if args.size else (local.info.default_size(),) * 2
    cond = local.encode(prompt, None, guidance, size)
    latents = local.initial_latents(torch.Generator().manual_seed(args.seed), size)
    t = local.timesteps(steps)[0]
    predict_noise(local.unet, latents, t, cond, guidance)  # warm-up
    began = time.perf_counter()
    for _ in range(3):
        predict_noise(local.unet, latents, t, cond, guidance)
    local_unet_seconds = (time.perf_counter() - began) / 3
    device = load_device(args.model, mode="exact", small_maps=args.small_maps)
    rows = []
    for n in ns:
        servers, addresses = _start_servers(args, n, UNetShardService)
        try:
            results = [(batching, imagine_ppidm(device, prompt, servers=addresses, small_maps=args.small_maps,
                                                steps=steps, seed=args.seed, size=args.size, link=args.link,
                                                batching=batching))
                       for batching in args.batching]
        finally:
            for server in servers:
                server.stop()
        for batching, result in results:
            rows.append(_traffic_row(args, n, batching, result.record, local_unet_seconds))
    return rows


def _traffic_row(args, n: int, batching: bool, record: dict, local_unet_seconds: float) -> dict:
    calls = record["cloud_steps"]
    return {"n": n, "link": args.link, "batching": batching, "round_trips_per_step": record["round_trips_per_step"],
            "seconds_per_step": record["seconds"] / calls,
            "device_seconds_per_step": record["local_seconds"] / calls,
            "local_unet_seconds_per_call": local_unet_seconds,
            "bytes_up_per_server": record["bytes_up_per_server"],
            "bytes_down_per_server": record["bytes_down_per_server"],
            "per_layer_type": record["per_layer_type"], "device_local_layers": sorted(record["device_local_layers"])}


def _start_servers(args, n: int, service_class):
    if args.in_thread:
        from lambdasplit.server import BodyServer

        service = service_class(args.model)
        servers = [BodyServer([service]).start_in_thread() for _ in range(n)]
        return servers, [s.address for s in servers]
    from concurrent.futures import ThreadPoolExecutor

    from lambdasplit.server.process import ServerProcess

    processes = [ServerProcess(["--component", "unet-shard", "--model", args.model], env={"OMP_NUM_THREADS": "1"})
                 for _ in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda p: p.start(), processes))
    return processes, [p.address for p in processes]


def compute(args, ns: list[int]) -> list[dict]:
    """FLOPs of one U-Net call, and the servers' share, on the model itself."""
    import torch  # noqa: PLC0415 (lazy: `bench ppidm --help` and usage errors must not load torch)

    from torch.utils.flop_counter import FlopCounterMode

    from lambdasplit.diffusion.client import default_settings
    from lambdasplit.diffusion.ppidm.driver import ShardPool, Traffic
    from lambdasplit.diffusion.ppidm.run import load_device
    from lambdasplit.diffusion.ppidm.service import UNetShardService
    from lambdasplit.diffusion.ppidm.shards import LocalShard
    from lambdasplit.diffusion.split import Device, predict_noise

    prompt = _prompts(args.model, 1)[0][0]
    guidance = default_settings()[1]
    local = Device.load(args.model, with_unet=True)
    size = tuple(args.size) if args.size else (local.info.default_size(),) * 2
    cond = local.encode(prompt, None, guidance, size)
    latents = local.initial_latents(torch.Generator().manual_seed(args.seed), size)
    t = local.timesteps(args.steps or default_settings()[0])[0]
    with FlopCounterMode(display=False) as counter:
        predict_noise(local.unet, latents, t, cond, guidance)
    total = counter.get_total_flops()
    device = load_device(args.model, mode="exact", small_maps=args.small_maps)
    service = UNetShardService(args.model)
    rows = []
    for n in ns:
        trips, up = {}, {}
        for batching in (False, True):
            pool = ShardPool([LocalShard(service) for _ in range(n)], Traffic(n))
            device.sharded.batching = batching
            device.sharded.attach(pool)
            predict_noise(device.unet, latents, t, cond, guidance)
            trips[batching] = pool.traffic.round_trips
            up[batching] = sum(sum(k.up) for k in pool.traffic.kinds.values()) / n
        server = sum(k.server_flops for name, k in pool.traffic.kinds.items() if name != "group_norm")
        rows.append({"n": n, "unet_flops": total, "server_flops": server, "offloaded": server / total,
                     "by_type": {name: k.server_flops for name, k in pool.traffic.kinds.items()},
                     "round_trips_unbatched": trips[False], "round_trips_batched": trips[True],
                     "up_bytes_per_server_unbatched": up[False], "up_bytes_per_server_batched": up[True],
                     "device_local_layers": sorted(pool.traffic.local_layers)})
    device.sharded.batching = True
    return rows


def paper_scale(ns: list[int], codecs=("fp32", "fp16")) -> dict:
    """SD 1.5's U-Net at 512 px on the meta device: bytes per layer type per server per step, FLOPs."""
    import torch  # noqa: PLC0415 (lazy: `bench ppidm --help` and usage errors must not load torch)

    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lambdasplit.diffusion.ppidm import ops as wire_ops
    from lambdasplit.diffusion.ppidm.driver import ShardedUNet, ShardPool, Traffic
    from lambdasplit.diffusion.ppidm.shards import ShapeShard

    with torch.device("meta"):
        full = UNet2DConditionModel(**SD15)
    x = torch.empty(2, 4, 64, 64, device="meta")
    text = torch.empty(2, 77, 768, device="meta")
    t = torch.tensor(500)
    with FlopCounterMode(display=False) as counter:
        full(x, t, encoder_hidden_states=text)
    total = counter.get_total_flops()
    convs = [full.get_submodule(name) for name in wire_ops.conv_names(full)]
    rows, batched = [], []
    for codec in codecs:
        for n in ns:
            pools = {}
            for batching in (True, False):
                sharded = ShardedUNet.skeleton(dict(full.config))
                sharded.batching = batching
                pools[batching] = pool = ShardPool([ShapeShard(convs, codec=codec, up_codec=codec) for _ in range(n)],
                                                   Traffic(n))
                sharded.attach(pool)
                sharded.unet(x, t, encoder_hidden_states=text)
            totals = {b: (sum(k.up[0] for k in p.traffic.kinds.values()), sum(k.down[0] for k in p.traffic.kinds.values()))
                      for b, p in pools.items()}
            batched.append({"codec": codec, "n": n, "round_trips_unbatched": pools[False].traffic.round_trips,
                            "round_trips_batched": pools[True].traffic.round_trips,
                            "up_mb_unbatched": totals[False][0] / MB, "up_mb_batched": totals[True][0] / MB,
                            "down_mb_unbatched": totals[False][1] / MB, "down_mb_batched": totals[True][1] / MB,
                            "seconds_5g_unbatched": max(totals[False][0] * n * 8 / 81e6, totals[False][1] * n * 8 / 340e6),
                            "seconds_5g_batched": max(totals[True][0] * n * 8 / 81e6, totals[True][1] * n * 8 / 340e6)})
            pool = pools[False]  # per layer type as the paper's tables: one layer per round trip
            summary = pool.traffic.summary(1)
            server = sum(v["server_flops_per_step"] for k, v in summary.items() if k != "group_norm")
            for kind, v in summary.items():
                up_all, down_all = sum(v["up_bytes_per_server_per_step"]), sum(v["down_bytes_per_server_per_step"])
                rows.append({"codec": codec, "n": n, "type": kind, "exchanges": v["exchanges_per_step"],
                             "up_min_mb": v["up_min_layer_bytes"] / MB, "up_max_mb": v["up_max_layer_bytes"] / MB,
                             "up_total_mb": v["up_bytes_per_server_per_step"][0] / MB,
                             "down_min_mb": v["down_min_layer_bytes"] / MB, "down_max_mb": v["down_max_layer_bytes"] / MB,
                             "down_total_mb": v["down_bytes_per_server_per_step"][0] / MB,
                             "seconds_5g": max(up_all * 8 / 81e6, down_all * 8 / 340e6), "offloaded": server / total})
    for row in rows:
        paper = PAPER.get(row["n"], {}).get(row["type"])
        row["paper_mb"] = list(paper) if paper else None  # up min / max / total, down min / max / total
    return {"unet_flops": total, "rows": rows, "batched": batched, "paper_n4": PAPER_N4}


def machine() -> str:
    import torch  # noqa: PLC0415 (lazy: `bench ppidm --help` and usage errors must not load torch)

    import os

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def run(args) -> int:
    from lambdasplit.diffusion.commands import quiet_loaders

    quiet_loaders()
    ns = [int(v) for v in args.servers.split(",") if v.strip()]
    parts = set(args.parts.split(","))
    if args.no_paper_scale:
        parts.discard("paper")
    report = {"command": "lambdasplit bench ppidm " + shlex.join(sys.argv[3:] if sys.argv[1:3] == ["bench", "ppidm"]
                                                                  else sys.argv[1:]),
              "machine": machine(), "model": args.model, "servers": ns}
    studies = {"quality": quality, "traffic": traffic, "compute": compute}
    for name, study in studies.items():
        if name in parts:
            began = time.perf_counter()
            report[name] = study(args, ns)
            print(f"[{name}: {time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)
    if "paper" in parts:
        report["paper_scale"] = paper_scale(ns)
    text = markdown(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
        (args.out / "report.md").write_text(text)
    print(json.dumps(report) if args.json else text)
    return 0


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _onoff(row: dict) -> str:
    return "on" if row.get("batching", True) else "off"


def markdown(report: dict) -> str:
    out = [f"# bench ppidm: {report['model']}", "", f"`{report['command']}`", "", f"machine: {report['machine']}", ""]
    if "quality" in report:
        out += ["## Quality against the unsplit pipeline (8-bit images)", "",
                _table(["n", "mode", "codec", "PSNR dB", "identical", "SSIM", "max abs", "digit match", "on device"],
                       [[r["n"], r["mode"], r["codec"], f"{r['psnr']:.2f}", f"{r['identical']}/{r['images']}",
                         f"{r['ssim']:.4f}", f"{r['max_abs']:.2e}",
                         f"{r['digit_match']:.0%}" if "digit_match" in r else "-",
                         len(r.get("device_local_layers", []))] for r in report["quality"]]),
                "", "(PSNR averaged with identical images counted as 100 dB; 'on device': layers too small to cut)", ""]
    if "traffic" in report:
        rows = []
        for r in report["traffic"]:
            for kind, v in r["per_layer_type"].items():
                rows.append([r["n"], _onoff(r), kind, f"{v['exchanges_per_step']:g}",
                             f"{v['up_bytes_per_server_per_step'][0] / 1e3:.1f}",
                             f"{v['down_bytes_per_server_per_step'][0] / 1e3:.1f}",
                             f"{v['up_min_layer_bytes'] / 1e3:.2f} / {v['up_max_layer_bytes'] / 1e3:.2f}",
                             f"{v['seconds_per_step'] * 1e3:.0f}"])
        out += [f"## Traffic and time per layer type per denoising step (link {report['traffic'][0]['link']})", "",
                _table(["n", "batching", "layer type", "exchanges", "up kB / server", "down kB / server",
                        "up kB per exchange min / max", "ms (wall, all servers)"], rows), "",
                _table(["n", "batching", "round trips / step", "s / step", "device compute s / step",
                        "whole U-Net locally s / call"],
                       [[r["n"], _onoff(r), f"{r['round_trips_per_step']:g}", f"{r['seconds_per_step']:.3f}",
                         f"{r['device_seconds_per_step']:.4f}", f"{r['local_unet_seconds_per_call']:.4f}"]
                        for r in report["traffic"]]), ""]
    if "compute" in report:
        out += ["## Compute offloaded (FLOPs of one U-Net call, torch FlopCounterMode)", "",
                _table(["n", "U-Net GFLOP", "on servers GFLOP", "offloaded", "paper",
                        "round trips / call: one layer each -> batched", "up kB / server / call: -> batched"],
                       [[r["n"], f"{r['unet_flops'] / 1e9:.3f}", f"{r['server_flops'] / 1e9:.3f}",
                         f"{r['offloaded']:.1%}", "67%", f"{r['round_trips_unbatched']} -> {r['round_trips_batched']}",
                         f"{r['up_bytes_per_server_unbatched'] / 1e3:.1f} -> {r['up_bytes_per_server_batched'] / 1e3:.1f}"]
                        for r in report["compute"]]), ""]
    if "paper_scale" in report:
        ps = report["paper_scale"]
        out += ["## Paper scale: SD 1.5 U-Net at 512 x 512, CFG batch 2, shapes only (meta device)", "",
                f"U-Net: {ps['unet_flops'] / 1e12:.2f} TFLOP per call", "",
                _table(["codec", "n", "type", "exchanges", "up MB min / max / total per server",
                        "paper up", "down MB min / max / total per server", "paper down", "5G s (all servers)",
                        "offloaded FLOPs"],
                       [[r["codec"], r["n"], r["type"], f"{r['exchanges']:g}",
                         f"{r['up_min_mb']:.3f} / {r['up_max_mb']:.2f} / {r['up_total_mb']:.2f}",
                         " / ".join(f"{v:g}" for v in r["paper_mb"][:3]) if r.get("paper_mb") else "-",
                         f"{r['down_min_mb']:.4f} / {r['down_max_mb']:.3f} / {r['down_total_mb']:.3f}",
                         " / ".join(f"{v:g}" for v in r["paper_mb"][3:]) if r.get("paper_mb") else "-",
                         f"{r['seconds_5g']:.2f}", f"{r['offloaded']:.1%}"] for r in ps["rows"]]), "",
                "Paper (n = 4, MB per server per step, up / down): " + ", ".join(
                    f"{k} {u} / {d}" for k, (u, d) in ps["paper_n4"].items()), "",
                "(the rows above: one layer per round trip, as the paper; batched, per step and server:)", "",
                _table(["codec", "n", "round trips: one layer each -> batched", "up MB -> batched",
                        "down MB -> batched", "5G s (all servers) -> batched"],
                       [[r["codec"], r["n"], f"{r['round_trips_unbatched']} -> {r['round_trips_batched']}",
                         f"{r['up_mb_unbatched']:.1f} -> {r['up_mb_batched']:.1f}",
                         f"{r['down_mb_unbatched']:.1f} -> {r['down_mb_batched']:.1f}",
                         f"{r['seconds_5g_unbatched']:.1f} -> {r['seconds_5g_batched']:.1f}"]
                        for r in ps.get("batched", [])]), ""]
    return "\n".join(out)
