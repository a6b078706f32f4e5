"""PIL's bilinear and bicubic resize of uint8 images, in torch, bit-exact with Pillow.

Reproduces ``Image.resize(size, resample=BILINEAR or BICUBIC, reducing_gap=None)`` of an RGB
image byte for byte, so that the Gemma3 resize can run on the device (GPU) and still match the
CPU path through PIL. It follows Pillow's src/libImaging/Resample.c: the filter weights of each
output pixel are computed in float64 (with the antialias widening of the filter when
downscaling), normalized to sum 1, and turned into 22-bit fixed point; each pass sums
``pixel * weight`` in int32 from a rounding offset of 1 << 21, shifts right by 22 and clips to
0..255. The horizontal pass runs first and hands a uint8 image to the vertical one (Image.resize
swaps the order for an image over 100 times taller than wide that shrinks in height); a pass
whose size does not change is skipped.

Weights are computed on the host, with the same float64 operations in the same order as the C
code, and cached per (in size, out size, filter); the device only gathers, multiplies and sums
integers, which is exact in any order, one tap at a time (memory of the output's size).
"""

import functools
import math

import numpy as np
import torch

BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling ids
PRECISION_BITS = 32 - 8 - 2


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {BILINEAR: (_bilinear, 1.0), BICUBIC: (_bicubic, 2.0)}


@functools.lru_cache(maxsize=64)
def _host_coeffs(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out_size, k] (int64) and fixed-point weights [out_size, k] (int32)."""
    filt, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = math.ceil(support) * 2 + 1

    center = (np.arange(out_size) + 0.5) * scale
    # astype(int64) truncates toward zero, like C's (int) cast
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin  # tap count
    taps = np.arange(ksize)
    w = filt(((taps + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps < xmax[:, None], w, 0.0)

    ww = np.zeros(out_size)
    for j in range(ksize):  # sequential sum, as in C (np.sum would sum pairwise)
        ww = ww + w[:, j]
    w = w / np.where(ww != 0.0, ww, 1.0)[:, None]

    w = w * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, -0.5 + w, 0.5 + w)).astype(np.int32)
    k = int(xmax.max())  # drop the all-zero tail columns
    idx = np.minimum(xmin[:, None] + taps[:k], in_size - 1)  # padding taps have weight 0
    return idx, fixed[:, :k]


@functools.lru_cache(maxsize=64)
def _coeffs(
    in_size: int, out_size: int, resample: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    idx, fixed = _host_coeffs(in_size, out_size, resample)
    return torch.from_numpy(idx).to(device), torch.from_numpy(fixed).to(device)


def _resample_axis(x: torch.Tensor, dim: int, out_size: int, resample: int) -> torch.Tensor:
    """One pass of Pillow's 8-bit resampling along dim -1 (horizontal) or -2 (vertical)."""
    idx, fixed = _coeffs(x.shape[dim], out_size, resample, x.device)
    # int32 is exact: Pillow sizes PRECISION_BITS so that these sums cannot overflow. One tap at
    # a time, so that memory stays at the output's size however many taps a downscale needs.
    shape = list(x.shape)
    shape[dim] = out_size
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for tap in range(idx.shape[1]):
        if dim == -1:
            taps, weights = x[..., idx[:, tap]], fixed[:, tap]  # [..., h, out], [out]
        else:
            taps, weights = x[..., idx[:, tap], :], fixed[:, tap, None]  # [..., out, w], [out, 1]
        acc += taps.int().mul_(weights)
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_uint8(pixels: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize uint8 ``[..., 3, h, w]`` to ``[..., 3, H, W]`` for ``size=(H, W)``, equal byte for
    byte to PIL's ``Image.resize((W, H), resample, reducing_gap=None)`` of each RGB image."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3 or pixels.shape[-2] < 1 or pixels.shape[-1] < 1:
        raise ValueError(f"pixels must be [..., 3, h, w] with h, w >= 1, got {tuple(pixels.shape)}")
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    if resample not in _FILTERS:
        raise ValueError(f"resample must be BILINEAR (2) or BICUBIC (3), got {resample}")

    h, w = pixels.shape[-2:]
    passes = [(-1, out_w), (-2, out_h)]
    if h > w * 100 and out_h < h:  # Image.resize resizes such tall images vertically first
        passes.reverse()
    x = pixels
    for dim, n in passes:
        if x.shape[dim] != n:
            x = _resample_axis(x, dim, n, resample)
    return x.clone() if x is pixels else x
