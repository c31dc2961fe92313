"""Λ-Split for text-to-image latent diffusion (diffusers pipelines).

    split.py      what runs where (head / body / tail) and why it is exact
    protocols.py  the cloud-latent and client-latent sessions, device side
    server.py     the cloud side: UNetService (role "unet"), PipelineService (cloud-only baseline)
    client.py     one denoising loop for local, split and cloud modes, with measurements
    commands.py   `lambdasplit imagine`
    quality.py    PSNR / SSIM (scikit-image)
    bench.py      `lambdasplit bench diffusion`: the quantization study
    tiny.py       tiny random SD / SDXL pipelines built from configs (tests)
    ppidm/        PPIDM: the U-Net's heavy layers cut across n shard servers (--protocol ppidm)
"""

import importlib

# Imported on first use, so that `lambdasplit --help` and usage errors need neither torch nor transformers.
_EXPORTS = {
    "ImageResult": "lambdasplit.diffusion.client",
    "imagine": "lambdasplit.diffusion.client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
