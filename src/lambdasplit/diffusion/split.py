"""What runs where when a diffusers text-to-image pipeline is split, and why it stays exact.

    head (device)   tokenizer(s), text encoder(s), Gaussian noise sampler     -> `Device.encode`, `Device.initial_latents`
    body (cloud)    UNet2DConditionModel + classifier-free guidance           -> `predict_noise`
    tail (device)   scheduler step, VAE decoder, image post-processing        -> `Device.decode`

Exactness rests on two rules. (1) Every piece of arithmetic is the diffusers pipeline's
own: prompts are encoded by the pipeline's `encode_prompt`, the noise is drawn by its
`prepare_latents`, images are made by its VAE and image processor, and `predict_noise`
repeats its U-Net call and guidance formula operation by operation. (2) Both sides use
the same functions: the server calls `predict_noise` on its U-Net, the device (local mode
or `--local-steps`) calls it on its own copy.

Supported: StableDiffusionPipeline (SD 1.x/2.x: one text encoder) and
StableDiffusionXLPipeline (two text encoders, pooled embeddings, added time ids), any
UNet2DConditionModel with an AutoencoderKL. Anything else is refused by name.
Selective loading: the device never reads the U-Net weights (only unet/config.json) unless
it runs denoising steps itself, and it reads only the decoder half of the VAE.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lambdasplit.errors import LambdaSplitError, UnsupportedModelError

KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}

# Schedulers whose step is a deterministic function of (noise, t, latents, own state):
# cloud-latent runs one copy on each side and they must agree bit for bit.
DETERMINISTIC_SCHEDULERS = {
    "DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
}
STOCHASTIC_ALGORITHMS = {"sde-dpmsolver", "sde-dpmsolver++"}
# Schedulers known to draw fresh noise in every step (for a precise refusal message).
STOCHASTIC_SCHEDULERS = {
    "DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
    "LCMScheduler", "TCDScheduler",
}


def resolve_folder(model: str) -> Path:
    from lambdasplit.zoo.registry import ZOO, resolve

    entry = ZOO.get(model[len("zoo:"):]) if model.startswith("zoo:") else None
    if entry is not None and entry.kind != "diffusion":  # refuse before building an LLM we would not use
        raise LambdaSplitError(f"{model} is not a diffusion model (kind {entry.kind}); diffusion needs a diffusers pipeline "
                               f"(e.g. {', '.join('zoo:' + n for n, e in ZOO.items() if e.kind == 'diffusion')})")
    folder = Path(resolve(model))
    if not (folder / "model_index.json").is_file():
        raise LambdaSplitError(f"{model}: not a local diffusers pipeline folder (no model_index.json)")
    return folder


@dataclass
class PipelineInfo:
    """What both sides know from a pipeline folder without loading any weights."""

    folder: Path
    kind: str  # "sd" or "sdxl"
    class_name: str
    unet_config: dict
    fingerprint: str

    @classmethod
    def read(cls, model: str | Path) -> "PipelineInfo":
        folder = resolve_folder(str(model))
        index = json.loads((folder / "model_index.json").read_text())
        class_name = index.get("_class_name", "?")
        if class_name not in KINDS:
            raise UnsupportedModelError(
                f"{class_name} is not supported: lambdasplit splits StableDiffusionPipeline and "
                "StableDiffusionXLPipeline (UNet2DConditionModel + AutoencoderKL)")
        for part, wanted in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
            if (index.get(part) or [None, None])[1] != wanted:
                raise UnsupportedModelError(f"{folder}: the {part} must be a {wanted}, found {index.get(part)}")
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        if unet_config.get("time_cond_proj_dim") is not None:
            raise UnsupportedModelError("U-Nets with a guidance embedding (time_cond_proj_dim, LCM) are not supported")
        return cls(folder, KINDS[class_name], class_name, unet_config, unet_fingerprint(folder))

    def default_size(self) -> int:
        """The pipeline's default image side: U-Net sample size x VAE scale factor."""
        vae = json.loads((self.folder / "vae" / "config.json").read_text())
        return self.unet_config["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def unet_fingerprint(folder: Path) -> str:
    """sha256 of unet/config.json (without version noise) and the safetensors headers.

    Cheap on both sides: the device has the U-Net's files but never reads its weights.
    """
    digest = hashlib.sha256()
    config = json.loads((folder / "unet" / "config.json").read_text())
    for volatile in ("_diffusers_version", "_name_or_path", "_use_default_values"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted((folder / "unet").glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(size))  # the header: tensor names, dtypes, shapes, offsets
    return digest.hexdigest()[:16]


def load_unet(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()


def load_vae_decoder(folder: Path):
    """AutoencoderKL with only the decoder half filled: the encoder's weights are never read."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    vae_dir = folder / "vae"
    files = sorted(vae_dir.glob("*.safetensors"))
    config = AutoencoderKL.load_config(vae_dir)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    vae.encoder, vae.quant_conv = None, None  # encoding images is not part of text-to-image
    wanted = {name for name, _ in vae.state_dict().items()}
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if name in wanted:
                    state[name] = f.get_tensor(name).float()
    missing = wanted - state.keys()
    if missing or not files:
        # e.g. legacy attention names or .bin weights: the standard loader, then drop the encoder.
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        vae.encoder, vae.quant_conv = None, None
        return vae
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def check_scheduler(scheduler, eta: float = 0.0) -> str | None:
    """None if both sides can run this scheduler in lock-step; else why not."""
    return scheduler_refusal(type(scheduler).__name__, getattr(scheduler.config, "algorithm_type", None), eta)


def scheduler_refusal(name: str, algorithm: str | None = None, eta: float = 0.0) -> str | None:
    """Why cloud-latent cannot run scheduler `name` (None if it can), worded for the real reason."""
    advice = (f"cloud-latent runs one scheduler on each side, so it takes only {', '.join(sorted(DETERMINISTIC_SCHEDULERS))}; "
              "any scheduler works with --protocol client-latent")
    if name in STOCHASTIC_SCHEDULERS or algorithm in STOCHASTIC_ALGORITHMS or eta:
        what = f"{name}{' ' + algorithm if algorithm in STOCHASTIC_ALGORITHMS else ''}{f' with eta={eta}' if eta else ''}"
        return f"{what} draws fresh noise in its step, so the cloud's copy of the latent would drift from the device's; {advice}"
    if name not in DETERMINISTIC_SCHEDULERS:
        return (f"{name} has not been checked to step bit-identically on the device and in the cloud "
                f"(it may well be deterministic); {advice}")
    return None


def make_scheduler(class_name: str, config: dict):
    """A scheduler from its class name and config (sent in the cloud-latent HELLO)."""
    import diffusers

    reason = scheduler_refusal(class_name)
    if reason:
        raise LambdaSplitError(reason)
    return getattr(diffusers, class_name).from_config(config)


@dataclass
class Conditioning:
    """What the U-Net is conditioned on, already concatenated [negative, positive] under CFG."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled embeddings
    time_ids: torch.Tensor | None = None  # SDXL added time ids

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.prompt_embeds, self.text_embeds, self.time_ids) if t is not None]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "Conditioning":
        if len(tensors) not in (1, 3):
            raise ValueError(f"conditioning is 1 (SD) or 3 (SDXL) tensors, got {len(tensors)}")
        return cls(*tensors)

    def added_cond_kwargs(self) -> dict | None:
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}


def predict_noise(unet, model_input: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
    """One U-Net call plus classifier-free guidance, operation for operation as diffusers does it.

    `model_input` is the scheduler-scaled latent of ONE image; it is duplicated here for
    the unconditional and conditional halves (scaling is elementwise, so scaling one copy
    and duplicating equals the pipeline's duplicating then scaling).
    """
    cfg = guidance > 1.0
    x = torch.cat([model_input] * 2) if cfg else model_input
    with torch.no_grad():
        noise = unet(x, t, encoder_hidden_states=cond.prompt_embeds, timestep_cond=None, cross_attention_kwargs=None,
                     added_cond_kwargs=cond.added_cond_kwargs(), return_dict=False)[0]
    if cfg:
        uncond, text = noise.chunk(2)
        noise = uncond + guidance * (text - uncond)
    return noise


@dataclass
class Device:
    """The device's half of a pipeline: text encoders, scheduler, VAE decoder (and the U-Net only if asked)."""

    info: PipelineInfo
    pipe: object  # the diffusers pipeline object, built with unet=None unless with_unet
    loaded: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, model: str | PipelineInfo, *, with_unet: bool = False, scheduler: str | None = None) -> "Device":
        import diffusers

        info = model if isinstance(model, PipelineInfo) else PipelineInfo.read(model)
        pipeline_class = getattr(diffusers, info.class_name)
        unet = load_unet(info.folder) if with_unet else None
        extra = {"safety_checker": None, "feature_extractor": None} if info.kind == "sd" else {}
        pipe = pipeline_class.from_pretrained(info.folder, unet=unet, vae=load_vae_decoder(info.folder), **extra)
        if scheduler:
            scheduler_class = getattr(diffusers, scheduler, None)
            if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
                raise LambdaSplitError(f"unknown scheduler {scheduler!r}: name a diffusers scheduler class, "
                                       "e.g. DDIMScheduler or EulerDiscreteScheduler")
            pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        loaded = ["tokenizer", "text_encoder"] + (["tokenizer_2", "text_encoder_2"] if info.kind == "sdxl" else [])
        loaded += ["scheduler", "vae decoder"] + (["unet"] if with_unet else [])
        return cls(info, pipe, loaded)

    @property
    def unet(self):
        return self.pipe.unet

    def encode(self, prompt: str, negative_prompt: str | None, guidance: float, size: tuple[int, int]) -> Conditioning:
        """The head: prompt -> conditioning, via the pipeline's own encode_prompt."""
        cfg = guidance > 1.0
        with torch.no_grad():
            if self.info.kind == "sd":
                embeds, negative = self.pipe.encode_prompt(prompt, "cpu", 1, cfg, negative_prompt)
                return Conditioning(torch.cat([negative, embeds]) if cfg else embeds)
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt)
        # SDXL added time ids: original size, crop top-left (0, 0), target size, as the pipeline builds them.
        time_ids = torch.tensor([list(size + (0, 0) + size)], dtype=embeds.dtype)
        if cfg:
            return Conditioning(torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled]),
                                torch.cat([time_ids, time_ids]))
        return Conditioning(embeds, pooled, time_ids)

    def timesteps(self, steps: int) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, steps, "cpu")
        if self.info.kind == "sdxl" and hasattr(self.pipe.scheduler, "set_begin_index"):
            self.pipe.scheduler.set_begin_index(0)
        return timesteps

    def initial_latents(self, generator: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
        """The Gaussian noise sampler, via the pipeline's own prepare_latents."""
        channels = self.info.unet_config["in_channels"]
        return self.pipe.prepare_latents(1, channels, size[0], size[1], torch.float32, torch.device("cpu"), generator)

    def step_kwargs(self, generator: torch.Generator) -> dict:
        return self.pipe.prepare_extra_step_kwargs(generator, 0.0)

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        """The tail's last part: latents -> image as float array (H, W, C) in [0, 1], as output_type='np'."""
        vae = self.pipe.vae
        with torch.no_grad():
            if self.info.kind == "sd":
                image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
                image = self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
            else:
                mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
                if mean is not None and std is not None:
                    mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.dtype)
                    std = torch.tensor(std).view(1, 4, 1, 1).to(latents.dtype)
                    latents = latents * std / vae.config.scaling_factor + mean
                else:
                    latents = latents / vae.config.scaling_factor
                image = vae.decode(latents, return_dict=False)[0]
                image = self.pipe.image_processor.postprocess(image, output_type="np")
        return image[0]


def to_pil(image: np.ndarray):
    """(H, W, C) float image in [0, 1] -> PIL, as diffusers' numpy_to_pil does (grey for one channel)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(image[None])[0]
