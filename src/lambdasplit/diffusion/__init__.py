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

from lambdasplit.diffusion.client import ImageResult, imagine  # noqa: F401
