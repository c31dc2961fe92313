"""The default diffusion model `zoo:digits`: standard loading, prompts, quality, assembly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lambdasplit.errors import LambdaSplitError
from lambdasplit.zoo import digits
from lambdasplit.zoo import digits_data as data


@pytest.fixture(scope="module")
def pipe(digits_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(digits_path)


def test_folder_is_a_standard_pipeline(digits_path):
    index = json.loads((Path(digits_path) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"] == ["transformers", "BertTokenizerFast"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["requires_safety_checker"] is False


def test_components_load_with_standard_loaders(digits_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, BertModel

    unet = UNet2DConditionModel.from_pretrained(digits_path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(digits_path, subfolder="vae")
    DDIMScheduler.from_pretrained(digits_path, subfolder="scheduler")
    encoder = BertModel.from_pretrained(Path(digits_path) / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(Path(digits_path) / "tokenizer")
    assert unet.config.cross_attention_dim == encoder.config.hidden_size == 384
    assert tokenizer.model_max_length == data.MAX_PROMPT_TOKENS
    with torch.no_grad():
        latent = vae.encode(data.upscale(np.zeros((1, 8, 8)))).latent_dist.mean
    assert tuple(latent.shape) == (1, 4, 8, 8)


def test_pipeline_generates_deterministically(pipe):
    def run():
        return pipe("a handwritten digit seven", num_inference_steps=10, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3), output_type="np").images

    first, second = run(), run()
    assert first.shape == (1, 32, 32, 1)
    assert np.array_equal(first, second)  # DDIM with eta = 0: fixed noise, fixed image
    image = pipe("the number 3", num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_encode_prompt_matches_training_embeddings(pipe):
    """The U-Net was trained on data.encode(); the pipeline must feed it the same tensors."""
    prompts = [data.prompt(7, 0), ""]
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True, None)
    tokenizer, encoder = data.load_text_encoder()
    expected = data.encode(tokenizer, encoder, prompts)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(negative[0], expected[1])  # CFG's unconditional branch = empty prompt


def test_classifier_is_accurate_on_real_digits():
    from lambdasplit.zoo.digit_classifier import classifier

    judge = classifier()
    assert judge.held_out_accuracy() >= 0.97
    assert judge.held_out_accuracy_32() >= 0.97  # the 32x32 -> 8x8 path used on generations


def test_quality_slice_is_not_worse_than_stored(digits_path):
    stored = digits.stored_quality()["slice"]
    fresh = digits.evaluate(digits_path, **digits.SLICE_EVAL)
    assert fresh["generations"] == stored["generations"] >= 30
    # Fails if the recomputed prompt-match rate is more than 5% (relative) below the stored one.
    assert fresh["prompt_match"] >= 0.95 * stored["prompt_match"], (fresh, stored)


def test_shipped_parts_are_small_and_exclude_the_encoder():
    files = [p for p in digits.PARTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30e6
    assert not (digits.PARTS_DIR / "text_encoder").exists()
    quality = digits.stored_quality()
    assert quality["full"]["generations"] >= 200


def test_describe():
    info = digits.describe()
    assert info["kind"] == "diffusion" and info["latent_shape"] == "4x8x8"
    assert info["unet_parameters"] > 0 and 0 < info["prompt_match"] <= 1
    assert "3 down" in info["unet_layers"] and info["text_encoder_layers"] == 6


def test_training_script_runs_and_saves_a_loadable_pipeline(tmp_path):
    """`lambdasplit zoo train digits` in miniature: a few steps, then the standard loaders."""
    from diffusers import StableDiffusionPipeline

    from lambdasplit.zoo import digits_train

    quality = digits_train.train(tmp_path / "parts", vae_steps=3, unet_steps=3, evaluate=False)
    assert quality["unet_steps"] == 3 and quality["vae_reconstruction_mse"] > 0
    folder = digits.assemble(tmp_path / "parts", tmp_path / "digits")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    image = pipe("a handwritten digit two", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 1)  # grey digits


def test_missing_weights_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "PARTS_DIR", tmp_path / "empty")
    with pytest.raises(LambdaSplitError, match="lambdasplit zoo train digits"):
        digits.ensure_folder(tmp_path / "cache")


def test_concurrent_assembly(tmp_path):
    """Two processes assembling the same cache at once both get one complete folder."""
    code = ("import sys; from pathlib import Path; from lambdasplit.zoo.digits import ensure_folder; "
            "print(ensure_folder(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == str(tmp_path / "digits")
    assert (tmp_path / "digits" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".digits.lock")) == ["digits"]
