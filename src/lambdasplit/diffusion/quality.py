"""Image similarity against the FP32 image: PSNR and SSIM from scikit-image.

Both are computed on the 8-bit pixels a user actually gets (the PNG), with
data_range=255, as `skimage.metrics.peak_signal_noise_ratio` and
`skimage.metrics.structural_similarity` (Wang et al. 2004, 7x7 uniform window, the
library defaults; colour images average SSIM over channels). Identical images have
PSNR = inf; tables print that as "identical".
"""

from __future__ import annotations

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W, C) -> uint8, rounded exactly as diffusers' numpy_to_pil does."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (image * 255).round().astype(np.uint8)


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    a, b = to_uint8(reference), to_uint8(image)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    a, b = to_uint8(reference), to_uint8(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a, b = a[..., 0], b[..., 0]
    channel_axis = -1 if a.ndim == 3 else None
    return float(structural_similarity(a, b, data_range=255, channel_axis=channel_axis))
