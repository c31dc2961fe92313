"""`lambdasplit audit diffusion --protocol ppidm`: what each shard server can rebuild from what it saw.

Sessions run against n real shard servers (in-thread, real sockets) with every session's
bytes captured; each server's view is parsed from its capture alone (ops.parse_ops on the
STEP frames, its own RESULT frames). The attacker has the public pipeline (all weights,
the scheduler config, the grid convention) and, generously, knows which grid block it was
given (at most n choices; the zero padding it is asked to add gives it away for n <= 4).

    latent block     conv_in's input at the last step is the server's block (plus halo) of the
                     latent itself, and conv_out's output, which the server computed, is its
                     block of the predicted noise (both CFG halves): x0 = (x_t - sqrt(1 - abar) eps)
                     / sqrt(abar) with the public schedule and the default guidance scale. The
                     block, zero elsewhere, through the public VAE decoder: PSNR of that region
                     of the image, and of the whole image, and the digit classifier's verdict.
    collusion        the same with the blocks of 2 servers, and of all n (= what ONE server
                     sees in single-server Λ-Split client-latent, which sends the whole x_t).
    K/V inverters    every server receives the FULL K and V of every self-attention layer: a
                     linear projection of the whole feature map. Trained on the attacker's own
                     generations (public prompts, other seeds), from the last step's K (and V)
                     of the first self-attention layer to the image: a ridge regression on K,
                     one on K and V, and a small CNN on K and V laid out as the feature map
                     (non-linear; its training is bounded in wall time, CNN_SECONDS).
    prompt           cross-attention's K is the text embeddings through the public to_k:
                     matched against every candidate prompt run through the public text encoder
                     and to_k (top-1 over the candidate set).
    statistics       the servers compute group statistics of their own block and return them;
                     nothing global ever reaches them (exact or paper mode): no attack beyond
                     the block itself, which the latent-block attack already uses.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lambdasplit.diffusion.ppidm import ops as wire_ops
from lambdasplit.diffusion.ppidm.blocks import conv_blocks
from lambdasplit.wire.frames import FrameType


def server_view(capture: list[tuple[str, bytes]]) -> list[list[tuple[wire_ops.Op, torch.Tensor]]]:
    """One server's requests with its own answers, cut into denoising steps (conv_in starts a step)."""
    from lambdasplit.diffusion.protocols import parse_blobs, split_frames

    up = b"".join(data for direction, data in capture if direction == "up")
    down = b"".join(data for direction, data in capture if direction == "down")
    requests = [wire_ops.parse_ops([t for t, _, _ in parse_blobs(body, 4)])
                for kind, body in split_frames(up) if kind == FrameType.STEP]
    answers = [[t for t, _, _ in parse_blobs(body, 8)] for kind, body in split_frames(down) if kind == FrameType.RESULT]
    steps: list[list] = []
    for ops, outs in zip(requests, answers):
        outs = iter(outs)
        for op in ops:
            out = [next(outs) for _ in range(wire_ops.results_per_op(op.kind))]
            if op.kind in wire_ops.CONV_KINDS and op.header[0] == 0:
                steps.append([])
            steps[-1].append((op, out[0]))
    return steps


class Attacker:
    """The public pipeline, its U-Net's layout, and what the attacks need from it."""

    def __init__(self, model: str, guidance: float, steps: int):
        from lambdasplit.diffusion.split import Device

        self.device = Device.load(model, with_unet=True)
        self.guidance, self.steps = guidance, steps
        unet = self.device.unet
        names = wire_ops.conv_names(unet)
        self.conv_in, self.conv_out_index = unet.conv_in, names.index("conv_out")
        self.attention = [(name, m) for name, m in unet.named_modules() if hasattr(m, "set_processor")]
        self.first_self = next(i for i, (name, _) in enumerate(self.attention) if name.endswith("attn1"))
        timesteps = self.device.timesteps(steps)
        self.last_t = timesteps[-1]
        self.alpha = float(self.device.pipe.scheduler.alphas_cumprod[int(self.last_t)])

    def latent_canvas(self, views: list, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 estimate from the given servers' last-step blocks; zero where none of them saw. Also the seen mask."""
        canvas, seen = torch.zeros(shape), torch.zeros(shape[2:], dtype=torch.bool)
        blocks = conv_blocks(shape[2], shape[3], n, self.conv_in.kernel_size, self.conv_in.stride, self.conv_in.padding,
                             self.conv_in.dilation)
        for index, view in views:
            last = view[-1]
            x = next(op.tensors[0] for op, _ in last if op.kind in wire_ops.CONV_KINDS and op.header[0] == 0)
            eps = next(out for op, out in last if op.kind in wire_ops.CONV_KINDS and op.header[0] == self.conv_out_index)
            b = blocks[index]
            # conv_out's output block is the block's own region; conv_in's input adds the halo
            top, left = b.out_rows[0] - b.in_rows[0], b.out_cols[0] - b.in_cols[0]
            h, w = b.out_rows[1] - b.out_rows[0], b.out_cols[1] - b.out_cols[0]
            x = x[-1:, :, top:top + h, left:left + w]
            if eps.shape[0] == 2:
                eps = eps[:1] + self.guidance * (eps[1:] - eps[:1])
            x0 = (x - math.sqrt(1 - self.alpha) * eps) / math.sqrt(self.alpha)
            canvas[:, :, b.out_rows[0]:b.out_rows[1], b.out_cols[0]:b.out_cols[1]] = x0
            seen[b.out_rows[0]:b.out_rows[1], b.out_cols[0]:b.out_cols[1]] = True
        return canvas, seen

    def kv_features(self, view: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The last step's K and V of the first self-attention layer, as the server received them."""
        attention = [op for op, _ in view[-1] if op.kind == wire_ops.ATTENTION and op.header[0] == self.first_self]
        return attention[0].tensors[1], attention[0].tensors[2]

    def text_keys(self, view: list) -> dict[int, torch.Tensor]:
        return {op.header[0]: op.tensors[1] for step in view[:1] for op, _ in step
                if op.kind == wire_ops.ATTENTION and op.header[1] == wire_ops.KV_STORE}

    def candidate_keys(self, prompt: str, slot: int, size) -> torch.Tensor:
        cond = self.device.encode(prompt, None, self.guidance, size)
        attn = self.attention[slot][1]
        with torch.no_grad():
            key = attn.to_k(cond.prompt_embeds)
        return key.view(key.shape[0], -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)

    def training_pairs(self, prompts: list[str], seeds: list[int], size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The attacker's own generations: K and V of the first self-attention at the last step
        ([B, heads, tokens, head dim] each, as a server receives them), and the image."""
        from lambdasplit.diffusion.client import denoise

        name, attn = self.attention[self.first_self]
        seen = {"k": [], "v": []}
        handles = [attn.to_k.register_forward_hook(lambda m, a, out: seen["k"].append(out.detach())),
                   attn.to_v.register_forward_hook(lambda m, a, out: seen["v"].append(out.detach()))]
        keys, values, images = [], [], []
        try:
            for prompt, seed in zip(prompts, seeds):
                seen["k"].clear(), seen["v"].clear()
                image = denoise(self.device, prompt, steps=self.steps, seed=seed, guidance=self.guidance, size=size)
                for out, into in ((seen["k"][-1], keys), (seen["v"][-1], values)):
                    into.append(out.view(out.shape[0], -1, attn.heads, out.shape[-1] // attn.heads).transpose(1, 2)
                                .numpy())
                images.append(image)
        finally:
            for handle in handles:
                handle.remove()
        return np.stack(keys), np.stack(values), np.stack(images)


def audit_ppidm(model: str, *, n: int = 4, sessions: int = 10, steps: int | None = None, seed: int = 42,
                train_images: int = 80, mode: str = "exact", small_maps: str = "local", codec: str = "fp32",
                cnn_seconds: float | None = None, progress: bool = True) -> dict:
    from sklearn.linear_model import RidgeCV

    from lambdasplit.audit.diffusion import _default_prompts, _judge
    from lambdasplit.diffusion.client import default_settings
    from lambdasplit.diffusion.ppidm.run import imagine_ppidm, load_device
    from lambdasplit.diffusion.ppidm.service import UNetShardService
    from lambdasplit.diffusion.quality import psnr, ssim
    from lambdasplit.server import BodyServer

    began = time.perf_counter()
    cnn_seconds = CNN_SECONDS if cnn_seconds is None else cnn_seconds
    default_steps, guidance = default_settings()
    steps = steps or default_steps
    prompts, digits = _default_prompts(model, sessions)
    attacker = Attacker(model, guidance, steps)
    judge = _judge(model)
    size = (attacker.device.info.default_size(),) * 2
    candidates = _candidates(model, prompts)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    # the learned K inverter: public prompts, seeds disjoint from the audited sessions'
    pool = candidates * (train_images // len(candidates) + 1)
    say(f"ppidm audit: {train_images} attacker generations for the K/V inverters")
    train_k, train_v, train_images_ = attacker.training_pairs(pool[:train_images],
                                                              [10_000 + i for i in range(train_images)], size)
    targets = train_images_.reshape(len(train_images_), -1)
    alphas = np.logspace(-2, 4, 13)
    ridge_k = RidgeCV(alphas=alphas).fit(train_k.reshape(len(targets), -1), targets)
    ridge_kv = RidgeCV(alphas=alphas).fit(np.concatenate([train_k, train_v], 1).reshape(len(targets), -1), targets)
    say(f"ppidm audit: training the CNN inverter (at most {cnn_seconds:.0f} s)")
    cnn = CNNInverter.train(train_k, train_v, train_images_, latent_side=size[0] // attacker.device.pipe.vae_scale_factor,
                            seconds=cnn_seconds)
    mean_image = targets.mean(0)
    device = load_device(model, mode=mode, small_maps=small_maps)
    service = UNetShardService(model)
    servers = [BodyServer([service]).start_in_thread() for _ in range(n)]
    rows: dict[str, list[dict]] = {}

    def add(attack: str, **values) -> None:
        rows.setdefault(attack, []).append(values)

    try:
        for i, prompt in enumerate(prompts):
            captures = [[] for _ in range(n)]
            result = imagine_ppidm(device, prompt, servers=[s.address for s in servers], mode=mode,
                                   small_maps=small_maps, steps=steps, seed=seed + i, codec=codec, up_codec=codec,
                                   captures=captures)
            user = result.image
            views = [server_view(c) for c in captures]
            latent_shape = (1, attacker.device.info.unet_config["in_channels"], size[0] // attacker.device.pipe.vae_scale_factor,
                            size[1] // attacker.device.pipe.vae_scale_factor)
            groups = {"1 server": [[k] for k in range(n)], "2 colluding": [[k, (k + 1) % n] for k in range(n)],
                      f"all {n} (= one Λ-Split client-latent server)": [list(range(n))]}
            for attack, members in groups.items():
                for group in members:
                    canvas, seen = attacker.latent_canvas([(k, views[k]) for k in group], n, latent_shape)
                    image = attacker.device.decode(canvas)
                    mask = np.kron(seen.numpy(), np.ones((attacker.device.pipe.vae_scale_factor,) * 2)).astype(bool)
                    add(f"latent block: {attack}", region_psnr=_finite(psnr(user[mask], image[mask])),
                        image_psnr=_finite(psnr(user, np.where(mask[..., None], image, mean_image.reshape(user.shape)))),
                        area=float(mask.mean()), digit=_digit(judge, image, digits[i]))
            baseline = _finite(psnr(user, np.clip(mean_image.reshape(user.shape), 0, 1)))
            for k in range(n):
                key, value = (t.numpy()[None] for t in attacker.kv_features(views[k]))
                guesses = {"K inverter, ridge (1 server)": ridge_k.predict(key.reshape(1, -1))[0],
                           "K+V inverter, ridge (1 server)":
                               ridge_kv.predict(np.concatenate([key, value], 1).reshape(1, -1))[0],
                           "K+V inverter, CNN (1 server)": cnn.predict(key, value)[0]}
                for attack, guess in guesses.items():
                    guess = np.clip(guess.reshape(user.shape), 0, 1)
                    add(attack, image_psnr=_finite(psnr(user, guess)), ssim=ssim(user, guess),
                        digit=_digit(judge, guess, digits[i]), baseline_psnr=baseline)
                keys = attacker.text_keys(views[k])
                if keys:
                    slot, observed = next(iter(keys.items()))
                    distances = [float((attacker.candidate_keys(c, slot, size)[-1] - observed[-1]).norm())
                                 for c in candidates]
                    add("prompt from cross-attention K (1 server)",
                        top1=float(candidates[int(np.argmin(distances))] == prompt), candidates=len(candidates))
            say(f"ppidm audit: session {i + 1}/{len(prompts)}")
    finally:
        for server in servers:
            server.stop()
    results = [{"attack": attack, **_mean(values)} for attack, values in rows.items()]
    # K = to_k(layer-normed hidden states): with a full-column-rank to_k, K determines them exactly
    first = attacker.attention[attacker.first_self]
    weight = first[1].to_k.weight.detach()
    kv_rank = {"layer": first[0], "to_k": list(weight.shape), "rank": int(torch.linalg.matrix_rank(weight))}
    from lambdasplit.audit.llm import _machine

    return {"meta": {"model": model, "servers": n, "mode": mode, "codec": codec, "steps": steps, "guidance": guidance,
                     "sessions": len(prompts), "train_images": train_images, "candidates": len(candidates),
                     "cnn_inverter": cnn.summary,
                     "first_self_attention": kv_rank,
                     "machine": _machine(), "seconds": round(time.perf_counter() - began, 1),
                     "assumptions": "the attacker has the public weights and scheduler, the default guidance scale, "
                                    "and knows its block's place in the grid"},
            "results": results}


CNN_SECONDS = 120.0


class CNNInverter:
    """A small non-linear inverter: K and V of one self-attention layer, laid out as its feature
    map (channels = CFG half x K/V x heads x head dim), to the image. Trained with Adam on the
    attacker's generations for at most `seconds` of wall time (or `max_epochs`)."""

    def __init__(self, net, mean, std, side, shape):
        self.net, self.mean, self.std, self.side, self.shape = net, mean, std, side, shape
        self.summary: dict = {}

    @staticmethod
    def layout(keys: np.ndarray, values: np.ndarray, side: int) -> torch.Tensor:
        """[N, B, heads, tokens, head dim] x 2 -> [N, B*2*heads*head dim, h, w] (tokens are row-major pixels)."""
        x = torch.from_numpy(np.concatenate([keys, values], 2)).float()  # [N, B, 2*heads, tokens, hd]
        n, b, h2, tokens, hd = x.shape
        rows = math.isqrt(tokens) if math.isqrt(tokens) ** 2 == tokens else side  # square maps, else latent rows
        return x.permute(0, 1, 2, 4, 3).reshape(n, b * h2 * hd, rows, tokens // rows)

    @classmethod
    def train(cls, keys, values, images, *, latent_side: int, seconds: float, max_epochs: int = 4000,
              seed: int = 0) -> "CNNInverter":
        from torch import nn

        torch.manual_seed(seed)
        x = cls.layout(keys, values, latent_side)
        y = torch.from_numpy(images).float().permute(0, 3, 1, 2)  # [N, C, H, W]
        mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True) + 1e-6
        x = (x - mean) / std
        width, layers = 64, []
        layers += [nn.Conv2d(x.shape[1], width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        scale = y.shape[2] // x.shape[2]
        while scale > 1:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
            scale //= 2
        layers += [nn.Conv2d(width, y.shape[1], 3, padding=1), nn.Upsample(size=tuple(y.shape[2:])), nn.Sigmoid()]
        net = nn.Sequential(*layers)
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
        began, epochs, batch = time.perf_counter(), 0, min(32, len(x))
        while epochs < max_epochs and time.perf_counter() - began < seconds:
            order = torch.randperm(len(x))
            for start in range(0, len(x), batch):
                pick = order[start:start + batch]
                loss = torch.nn.functional.mse_loss(net(x[pick]), y[pick])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            epochs += 1
        net.eval()
        self = cls(net, mean, std, latent_side, tuple(images.shape[1:]))
        self.summary = {"parameters": sum(p.numel() for p in net.parameters()), "epochs": epochs,
                        "seconds": round(time.perf_counter() - began, 1), "train_mse": float(loss.detach()),
                        "train_images": len(x)}
        return self

    def predict(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = (self.layout(keys, values, self.side) - self.mean) / self.std
            return self.net(x).permute(0, 2, 3, 1).numpy()


def _candidates(model: str, prompts: list[str]) -> list[str]:
    if model == "zoo:digits":
        from lambdasplit.zoo.digits_data import all_prompts

        return all_prompts()[0]
    return list(dict.fromkeys(prompts))


def _finite(x: float) -> float:
    return 100.0 if math.isinf(x) else float(x)


def _digit(judge, image, digit) -> float | None:
    if judge is None or digit is None:
        return None
    return float(judge.predict(np.clip(image, 0, 1)[None])[0] == digit)


def _mean(values: list[dict]) -> dict:
    out = {"samples": len(values)}
    for key in values[0]:
        present = [v[key] for v in values if v.get(key) is not None]
        out[key] = float(np.mean(present)) if present else None
    return out


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# audit diffusion --protocol ppidm: {meta['model']}, n = {meta['servers']} ({meta['mode']} mode)", "",
             f"machine: {meta['machine']}; {meta['sessions']} sessions, {meta['steps']} steps, "
             f"{meta['train_images']} attacker images for the K/V inverters, {meta['seconds']} s", "",
             "CNN inverter: {parameters} parameters, {epochs} epochs in {seconds} s, train MSE {train_mse:.4f}".format(
                 **meta["cnn_inverter"]) if meta.get("cnn_inverter") else "", "",
             f"assumptions: {meta['assumptions']}", "",
             f"K inverter layer: {meta['first_self_attention']['layer']}, to_k {meta['first_self_attention']['to_k']} "
             f"of rank {meta['first_self_attention']['rank']}"
             + (" (full column rank: K determines the layer's normed hidden states exactly)"
                if meta['first_self_attention']['rank'] == meta['first_self_attention']['to_k'][1] else ""), "",
             "| attack | region PSNR dB | image PSNR dB | image area | digit match | prompt top-1 | mean-image PSNR |",
             "|---|---|---|---|---|---|---|"]

    def fmt(value, pct=False):
        return "-" if value is None else (f"{value:.0%}" if pct else f"{value:.2f}")

    for r in report["results"]:
        lines.append(f"| {r['attack']} | {fmt(r.get('region_psnr'))} | {fmt(r.get('image_psnr'))} | "
                     f"{fmt(r.get('area'), True)} | {fmt(r.get('digit'), True)} | {fmt(r.get('top1'), True)} | "
                     f"{fmt(r.get('baseline_psnr'))} |")
    return "\n".join(lines) + "\n"


def command(args) -> int:
    """`audit diffusion --protocol ppidm` (audit/commands.py hands over here)."""
    from lambdasplit.diffusion.commands import quiet_loaders

    quiet_loaders()
    model = args.model
    if model == "tiny:sd":
        import tempfile

        from lambdasplit.diffusion.tiny import build_tiny_pipeline

        model = str(build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="lambdasplit-tiny-sd-"))))
    report = audit_ppidm(model, n=args.servers, sessions=args.prompts, steps=args.steps, codec=args.codec,
                         train_images=args.train_images, mode=args.ppidm_mode,
                         cnn_seconds=args.cnn_seconds, progress=not args.json)
    text = markdown(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ppidm.json").write_text(json.dumps(report, indent=1))
        (args.out / "ppidm.md").write_text(text)
    print(json.dumps(report) if args.json else text)
    return 0
