"""Fixed-point arithmetic in the ring Z mod 2^64, and an exact matmul in it.

A real value v is the integer round(v * 2^f) modulo 2^64 (two's complement: negative
values wrap). Activations use FRAC_X fractional bits and weights FRAC_W, so a product
sum W x has FRAC_X + FRAC_W of them; it is decoded exactly when its true value lies in
[-2^63, 2^63), which layers.py checks per layer (bounds at load, inputs at run time).

Additive shares: x = s0 + s1 (mod 2^64) with s1 = r uniformly random, so s0 = x - r is
uniform too, whatever x is; W s0 + W s1 = W x (mod 2^64) because the ring is commutative.

Exact matmul mod 2^64 with float64 GEMMs (BLAS): a share is cut into K limbs of b bits,
s = sum_k s_k 2^(b k), and each limb GEMM s_k W^T is exact when every partial sum stays
below 2^53 in magnitude, i.e. 2^b * max|W_int| * in_features < 2^53 (b is chosen per layer
from that bound). The limb products are then put together with wrapping uint64 shifts and
adds. scripts/ring_matmul_timing.py measures this against torch's int64 matmul.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

FRAC_X = 20  # fractional bits of activations (inputs of linear layers)
FRAC_W = 20  # fractional bits of weights
FRAC_Y = FRAC_X + FRAC_W  # of a product sum (biases are encoded with these)
MAX_LIMB_BITS = 16
MIN_LIMB_BITS = 8  # below this a layer is refused: too many GEMMs for too large weights
SEED_BYTES = 32  # a ChaCha20 key; the nonce is fixed (every key is fresh, one stream per session)
_NONCE = bytes(16)


def encode(values: torch.Tensor | np.ndarray, frac: int) -> np.ndarray:
    """Real values -> ring elements (uint64), round(v * 2^frac) modulo 2^64."""
    array = values.detach().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    scaled = array.astype(np.float64) * float(2 ** frac)
    return np.rint(scaled, out=scaled).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray, frac: int) -> np.ndarray:
    """Ring elements -> float64 (the signed representative in [-2^63, 2^63), divided by 2^frac)."""
    return ring.view(np.int64).astype(np.float64) * (1.0 / float(2 ** frac))


def decode_float32(ring: np.ndarray, frac: int) -> np.ndarray:
    """decode(), straight to float32: one rounding (int64 -> float32), then an exact power-of-two scale."""
    values = ring.view(np.int64).astype(np.float32)
    values *= np.float32(2.0 ** -frac)
    return values


def fresh_seed() -> bytes:
    return os.urandom(SEED_BYTES)


class MaskStream:
    """Uniformly random ring elements from one ChaCha20 keystream, consumed in order.

    The device and server 1 hold the same stream (the device drew its key from os.urandom
    and gave it to server 1 once per session); every request takes the next elements, so
    every mask is fresh and none is ever reused, and server 1 needs no per-request uplink.
    """

    POOL_WORDS = 1 << 15  # expanded ahead in blocks of 256 kB: one cipher call per ~100 requests, not per request

    def __init__(self, seed: bytes):
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
        self._cipher = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
        self.drawn = 0
        self._pool = np.empty(0, dtype="<u8")
        self._at = 0

    def next(self, count: int) -> np.ndarray:
        """The next `count` words of the keystream (the same words whatever the pool's block size)."""
        self.drawn += count
        if self._at + count > len(self._pool):
            left = self._pool[self._at:]
            fresh = max(self.POOL_WORDS, count - len(left))
            self._pool = np.concatenate([left, np.frombuffer(self._cipher.update(bytes(8 * fresh)), dtype="<u8")])
            self._at = 0
        out = self._pool[self._at:self._at + count]
        self._at += count
        return out


def share(x_ring: np.ndarray, masks: MaskStream) -> np.ndarray:
    """x - r with r the next masks of the stream: server 0's share (server 1's is r itself)."""
    return x_ring - masks.next(x_ring.size).reshape(x_ring.shape)  # uint64 arithmetic wraps: modulo 2^64


def limb_bits_for(max_abs_weight: int, in_features: int) -> int:
    """The widest limb (<= 16 bits) whose GEMM partial sums stay below 2^53; 0 if none >= 8 bits."""
    room = 53 - math.log2(max(1, max_abs_weight)) - math.log2(max(1, in_features))
    bits = min(MAX_LIMB_BITS, math.floor(room - 1e-9))
    return bits if bits >= MIN_LIMB_BITS else 0


class RingMatmul:
    """y = W s (+ b) modulo 2^64 for uint64 shares s [n, in], W an int64 matrix [out, in]: exact."""

    def __init__(self, weight_int: np.ndarray, bias_int: np.ndarray | None, limb_bits: int):
        self.out_features, self.in_features = weight_int.shape
        self.limb_bits = limb_bits
        self.limbs = math.ceil(64 / limb_bits)
        self.weight_t = torch.from_numpy(weight_int.astype(np.float64).T.copy())  # [in, out], exact (< 2^53)
        self.bias = bias_int.view(np.uint64) if bias_int is not None else None
        self.mask = np.uint64((1 << limb_bits) - 1)

    def __call__(self, shares: np.ndarray, add_bias: bool) -> np.ndarray:
        n = shares.shape[0]
        shifts = np.arange(self.limbs, dtype=np.uint64) * np.uint64(self.limb_bits)
        limbs = (shares[None, :, :] >> shifts[:, None, None]) & self.mask  # [K, n, in], each < 2^b
        products = torch.from_numpy(limbs.reshape(self.limbs * n, self.in_features).astype(np.float64)) @ self.weight_t
        parts = products.numpy().astype(np.int64).view(np.uint64).reshape(self.limbs, n, self.out_features)
        out = parts[0].copy()
        for k in range(1, self.limbs):
            out += parts[k] << shifts[k]  # wrapping: modulo 2^64
        if add_bias and self.bias is not None:
            out += self.bias
        return out


class RingConv(RingMatmul):
    """A 2-d convolution modulo 2^64, the same limb decomposition over float64 F.conv2d.

    Zero padding is exact on shares: the padded zeros of both shares add up to the zeros of x.
    """

    def __init__(self, weight_int: np.ndarray, bias_int: np.ndarray | None, limb_bits: int, conv):
        out_channels = weight_int.shape[0]
        super().__init__(weight_int.reshape(out_channels, -1), bias_int, limb_bits)
        self.kernel = torch.from_numpy(weight_int.astype(np.float64))  # [out, in / groups, kh, kw]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.out_channels = out_channels

    def __call__(self, shares: np.ndarray, add_bias: bool) -> np.ndarray:  # shares [B, C, H, W]
        batch = shares.shape[0]
        shifts = np.arange(self.limbs, dtype=np.uint64) * np.uint64(self.limb_bits)
        limbs = (shares[None] >> shifts[:, None, None, None, None]) & self.mask  # [K, B, C, H, W]
        x = torch.from_numpy(limbs.reshape(self.limbs * batch, *shares.shape[1:]).astype(np.float64))
        products = torch.nn.functional.conv2d(x, self.kernel, None, self.stride, self.padding, self.dilation, self.groups)
        parts = products.numpy().astype(np.int64).view(np.uint64).reshape(self.limbs, batch, *products.shape[1:])
        out = parts[0].copy()
        for k in range(1, self.limbs):
            out += parts[k] << shifts[k]
        if add_bias and self.bias is not None:
            out += self.bias[None, :, None, None]
        return out
