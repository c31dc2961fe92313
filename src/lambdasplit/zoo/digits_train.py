"""`lambdasplit zoo train digits` (CLI hooks in digits.py): rebuild the weights of `zoo:digits` from scratch.

Two stages, both with fixed seeds and a fixed step budget (the wall time is printed):
1. a small AutoencoderKL (32x32x1 grey images <-> 4x8x8 latents), so the model keeps the
   latent structure of Stable Diffusion that the split and the privacy analysis rely on;
2. a small UNet2DConditionModel that denoises the scaled latents, cross-attending to the
   frozen MiniLM-L6 token embeddings of the prompts (computed once, before training).
   10% of the examples get the empty prompt so classifier-free guidance works.
Then the model is evaluated and quality.json is written next to the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lambdasplit.zoo import digits_data as data

VAE_STEPS, UNET_STEPS = data.VAE_STEPS, data.UNET_STEPS
VAE_BATCH = 32
UNET_BATCH = 64
UNET_LR = 1e-3
EMPTY_PROMPT_RATE = 0.1
EMA_DECAY = 0.995  # a short horizon (~200 steps): training is short, early weights are poor


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,  # two downsamplings: 32x32 -> 8x8
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # narrow at 32x32, where most of the compute is
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=data.IMAGE_SIZE,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384,  # MiniLM-L6's hidden size
        attention_head_dim=8,
    )


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


def _cosine_lr(optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(images: torch.Tensor, steps: int, generator: torch.Generator, progress):
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    task = progress.add_task("vae", total=steps, loss=float("nan"))
    for step in range(steps):
        batch = images[torch.randint(len(images), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        # A light KL term keeps the latents compact (diffusers' default weight is tiny too).
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-5 * posterior.kl().mean()
        _cosine_lr(optimizer, 1e-3, step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(task, advance=1, loss=loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mse = torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, images).item()
    # Like Stable Diffusion's 0.18215: scale latents to unit variance for the U-Net.
    vae.register_to_config(scaling_factor=round(1.0 / posterior.mean.std().item(), 5))
    return vae, posterior, mse


def train_unet(posterior, labels: torch.Tensor, embeddings: torch.Tensor, empty: torch.Tensor,
               steps: int, scaling: float, generator: torch.Generator, progress):
    from diffusers import DDIMScheduler

    noise_schedule = DDIMScheduler(**data.scheduler_config())  # only its add_noise is used
    unet = make_unet()
    ema = make_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.01)
    mean, std = posterior.mean, posterior.std
    n_templates = len(data.TEMPLATES)
    task = progress.add_task("unet", total=steps, loss=float("nan"))
    for step in range(steps):
        idx = torch.randint(len(mean), (UNET_BATCH,), generator=generator)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling
        # Each example gets a random phrasing of its digit, or (10%) the empty prompt.
        template = torch.randint(n_templates, (UNET_BATCH,), generator=generator)
        cond = embeddings[labels[idx] * n_templates + template]
        drop = torch.rand(UNET_BATCH, generator=generator) < EMPTY_PROMPT_RATE
        cond = torch.where(drop[:, None, None], empty, cond)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(noise_schedule.config.num_train_timesteps, (UNET_BATCH,), generator=generator)
        pred = unet(noise_schedule.add_noise(latents, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        _cosine_lr(optimizer, UNET_LR, step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        # EMA of the weights (with a warm-up so early steps are not frozen in).
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        progress.update(task, advance=1, loss=loss.item())
    return ema.eval()


def train(out: Path, *, seed: int = 0, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS,
          evaluate: bool = True) -> dict:
    """Train both models, save the shipped parts to `out`, evaluate, write out/quality.json."""
    from diffusers import DDIMScheduler

    from lambdasplit.zoo import digits

    started = time.perf_counter()
    # One thread: on a shared 2-core machine two OpenMP threads that wait for each other
    # were slower (about 1.6x per VAE step) than one whenever another job was running.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, _, _ = data.load_split()
    images, labels = data.upscale(train_x), torch.from_numpy(train_y)

    tokenizer, encoder = data.load_text_encoder()
    prompts, _ = data.all_prompts()
    embeddings = data.encode(tokenizer, encoder, prompts)  # (60, 16, 384), row = digit * templates + t
    empty = data.encode(tokenizer, encoder, [""])[0]
    del encoder

    with _progress() as progress:
        vae, posterior, vae_mse = train_vae(images, vae_steps, generator, progress)
        vae_seconds = time.perf_counter() - started
        unet = train_unet(posterior, labels, embeddings, empty, unet_steps,
                          vae.config.scaling_factor, generator, progress)
    train_seconds = time.perf_counter() - started

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    DDIMScheduler(**data.scheduler_config()).save_pretrained(out / "scheduler")

    quality = {
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "batch": UNET_BATCH,
        "vae_reconstruction_mse": round(vae_mse, 5),
        "vae_seconds": round(vae_seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }
    if evaluate:
        with tempfile.TemporaryDirectory() as tmp:
            folder = digits.assemble(out, Path(tmp) / "digits")
            quality["full"] = digits.evaluate(folder, **digits.FULL_EVAL)
            quality["slice"] = digits.evaluate(folder, **digits.SLICE_EVAL)
    quality["total_seconds"] = round(time.perf_counter() - started, 1)
    torch.set_num_threads(threads)
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    return quality
