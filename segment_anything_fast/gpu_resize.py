"""PIL's bilinear ``Image.resize`` of uint8 images that grow, bit for bit, on any torch device.

The predictor resizes every image so that its long side is the model's input size. With PIL
that is 15-19 ms of host time per 480x640 image on the GPU machine, during which the GPU has
nothing queued. Here the same arithmetic runs on the device: PIL's two-pass separable
resampling (horizontal pass first, rounded to uint8, then vertical), with its filter
coefficients computed on the host exactly as PIL computes them (float64, normalised per output
pixel, then 22-bit fixed point), so the result equals ``np.array(pil.resize(...))``. Only
enlargements are offered: when an image shrinks, Pillow 13 sometimes runs the vertical pass
first (e.g. 2000x990 -> 1024x507 but not 2000x1000 -> 1024x512), by a rule not reproduced here.
"""
import functools
from typing import Tuple

import numpy as np
import torch

from .utils.amg import to_device

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(first input index, fixed-point weights (out_size, taps)) of PIL's bilinear filter for
    one axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c), in
    float64 with PIL's order of operations, for all output pixels at once."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear filter support 1, widened when shrinking
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's int(): toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    k = np.arange(taps)
    w = np.maximum(0.0, 1.0 - np.abs((k[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)))
    w = np.where(k[None, :] < count[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # summed tap by tap, in PIL's order
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, -0.5 + w * (1 << _PRECISION_BITS), 0.5 + w * (1 << _PRECISION_BITS))
    return first, np.trunc(fixed).astype(np.int64)


def _resample(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One PIL pass along ``dim`` of an (H, W, C) uint8 tensor."""
    in_size = x.shape[dim]
    first, weights = _coefficients(in_size, out_size)
    taps = weights.shape[1]
    # uploaded without blocking: a pageable copy would wait for all GPU work queued before it
    idx = to_device(np.minimum(first[:, None] + np.arange(taps)[None, :], in_size - 1), x.device)
    w = to_device(weights.astype(np.int32), x.device)
    g = x.index_select(dim, idx.flatten()).to(torch.int32)  # taps gathered next to each other
    shape = list(x.shape)
    shape[dim : dim + 1] = [out_size, taps]
    g = g.reshape(shape)
    w = w.reshape([out_size, taps] + [1] * (x.dim() - dim - 1))
    acc = (g * w).sum(dim + 1, dtype=torch.int32) + (1 << (_PRECISION_BITS - 1))
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """An (H, W, C) uint8 tensor enlarged to ``size`` = (new_h, new_w) >= (H, W) as PIL's
    ``Image.resize((new_w, new_h), Image.BILINEAR)`` would (a copy when the size is unchanged)."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize_uint8 takes an (H, W, C) uint8 tensor, got {image.dtype} {tuple(image.shape)}.")
    new_h, new_w = int(size[0]), int(size[1])
    if new_h < image.shape[0] or new_w < image.shape[1]:
        raise ValueError(f"resize_uint8 only enlarges: {tuple(image.shape[:2])} -> {(new_h, new_w)}; "
                         "resize shrinking images with PIL.")
    out = image
    if new_w != image.shape[1]:
        out = _resample(out, 1, new_w)
    if new_h != image.shape[0]:
        out = _resample(out, 0, new_h)
    return out.clone() if out is image else out
