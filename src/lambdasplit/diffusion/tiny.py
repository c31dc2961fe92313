"""Tiny random diffusers pipelines built from configs (tests, smoke runs; no download).

    build_tiny_pipeline(dest, kind="sd"|"sdxl", scheduler="ddim"|"euler"|...)

`sd`   StableDiffusionPipeline: one CLIPTextModel, UNet2DConditionModel, AutoencoderKL.
`sdxl` StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection (pooled
       embeddings), a U-Net with `text_time` added conditioning (pooled + 6 time ids).
Weights are random but seeded; the folders are saved with `save_pretrained`, so they
load with the standard `from_pretrained`, exactly as a Hub model would.
"""

from __future__ import annotations

from pathlib import Path

import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "ddpm": "DDPMScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "dpm": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
MAX_TOKENS = 16


def build_clip_tokenizer(max_length: int = MAX_TOKENS):
    """A valid CLIPTokenizer with a hand-made vocabulary: every byte, alone and word-final.

    No merges, so words split into characters; that is enough to condition a random
    text encoder on the prompt and keeps the tokenizer independent of any download.
    """
    from transformers import CLIPTokenizer
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols CLIP's BPE works on
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_encoder(tokenizer, hidden: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _scheduler(name: str):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    # The settings Stable Diffusion 1.x ships (PNDM: PLMS only, no Runge-Kutta warm-up steps).
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
               steps_offset=1, **({"clip_sample": False} if name in ("ddim", "ddpm") else {}),
               **({"set_alpha_to_one": False} if name in ("ddim", "pndm") else {}),
               **({"skip_prk_steps": True} if name == "pndm" else {}))


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    ).eval()


def build_tiny_pipeline(dest: str | Path, kind: str = "sd", scheduler: str = "ddim", seed: int = 0) -> Path:
    """Save a tiny random `kind` pipeline at `dest` and return the folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    dest = Path(dest)
    tokenizer = build_clip_tokenizer()
    unet_args = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=4,
    )
    if kind == "sd":
        text_encoder = _text_encoder(tokenizer, 32, False, seed)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_args).eval()
        pipe = StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(scheduler), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        text_encoder = _text_encoder(tokenizer, 32, False, seed)
        text_encoder_2 = _text_encoder(tokenizer, 32, True, seed + 3)
        torch.manual_seed(seed + 1)
        # cross attention sees both encoders' penultimate states side by side (32 + 32);
        # the added embedding sees the pooled projection (32) and 6 time ids x 8.
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                    **unet_args).eval()
        pipe = StableDiffusionXLPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=_scheduler(scheduler), add_watermarker=False)
    else:
        raise ValueError(f"kind must be sd or sdxl, not {kind!r}")
    pipe.save_pretrained(dest)
    return dest
