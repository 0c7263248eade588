"""Mask post-processing ``postprocess="triton"``: low-res logits to full-resolution masks in one kernel.

``Sam.postprocess_masks`` upscales (N, h, w) logits bilinearly to the model's input size, crops
the padding and, when the image was resized, resizes bilinearly again to the original size;
the predictor then thresholds. torch.compile fuses this only partly: on the H200 it runs two
kernels, 0.66 ms for 64 prompts x 3 masks of a 768x1024 image, at the speed of writing the first
upscale out as float32 (600 MB) and reading it back. Here every output pixel is computed from
the low-res logits directly (the 2 x 2 low-res neighbours of each of its 2 x 2 intermediate
neighbours, in float32, with PyTorch's source-index and weight formulas), and only the bool
masks (or the float32 logits) are written: :func:`masks_from_logits`. :func:`mask_scores`
reduces the same pixels to the automatic mask generator's stability scores and boxes without
writing masks. :func:`packed_masks_from_logits` does the batch of an evaluation in one launch:
the masks of several images of different sizes, written back to back into one flat buffer
whose layout :func:`packed_layout` computes on the host. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .triton_env import interpreting, use_torch_ptxas


@triton.jit
def _source(d, scale, n_in):
    """PyTorch's bilinear source of output index ``d`` (align_corners=False): the two input
    neighbours and their weights."""
    src = tl.maximum(scale * (d.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _upscaled(X, r, c, sh, sw, H, W, s_h, s_w):
    """The first upscale at rows ``r``, columns ``c`` of the (padded) input frame, float32.
    The source indices are clamped into the (H, W) grid, so the loads need no mask, also for
    the out-of-range pixels of a partial tile (whose values are not stored)."""
    r0, r1, a0, a1 = _source(r, sh, H)
    c0, c1, b0, b1 = _source(c, sw, W)
    v00 = tl.load(X + r0 * s_h + c0 * s_w).to(tl.float32)
    v01 = tl.load(X + r0 * s_h + c1 * s_w).to(tl.float32)
    v10 = tl.load(X + r1 * s_h + c0 * s_w).to(tl.float32)
    v11 = tl.load(X + r1 * s_h + c1 * s_w).to(tl.float32)
    return a0 * (b0 * v00 + b1 * v01) + a1 * (b0 * v10 + b1 * v11)


@triton.jit
def _full_res(X, y, x, s_xh, s_xw, H, W, IH, IW, sh1, sw1, sh2, sw2, RESIZE: tl.constexpr):
    """Logits of one mask (``X`` at its logits) at output rows ``y`` and columns ``x``, float32.
    ``y`` and ``x`` broadcast against each other: as a column and a row of a 2-D tile, each
    source index and weight is computed once per row or column, not per pixel."""
    if RESIZE:  # second bilinear resize, from the (IH, IW) crop to the output size
        y0, y1, a0, a1 = _source(y, sh2, IH)
        x0, x1, b0, b1 = _source(x, sw2, IW)
        v = (a0 * (b0 * _upscaled(X, y0, x0, sh1, sw1, H, W, s_xh, s_xw)
                   + b1 * _upscaled(X, y0, x1, sh1, sw1, H, W, s_xh, s_xw))
             + a1 * (b0 * _upscaled(X, y1, x0, sh1, sw1, H, W, s_xh, s_xw)
                     + b1 * _upscaled(X, y1, x1, sh1, sw1, H, W, s_xh, s_xw)))
    else:
        v = _upscaled(X, y, x, sh1, sw1, H, W, s_xh, s_xw)
    return v


@triton.jit
def _tile(OW, OH, BY: tl.constexpr, BX: tl.constexpr):
    """Rows (BY, 1), columns (1, BX) and in-range mask (BY, BX) of output tile program_id(0),
    tiles numbered row-major over the (OH, OW) image."""
    tiles_x = tl.cdiv(OW, BX)
    t = tl.program_id(0)
    y = (t // tiles_x) * BY + tl.arange(0, BY)[:, None]
    x = (t % tiles_x) * BX + tl.arange(0, BX)[None, :]
    return y, x, (y < OH) & (x < OW)


@triton.jit
def _postprocess_fwd(X, O, s_xn, s_xh, s_xw, H, W, IH, IW, OH, OW, sh1, sw1, sh2, sw2, thr,
                     RESIZE: tl.constexpr, LOGITS: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Program (i, n): output tile i (BY rows x BX columns) of mask n (row-major (OH, OW))."""
    y, x, m = _tile(OW, OH, BY, BX)
    n = tl.program_id(1).to(tl.int64)
    v = _full_res(X + n * s_xn, y, x, s_xh, s_xw, H, W, IH, IW, sh1, sw1, sh2, sw2, RESIZE)
    out = v if LOGITS else v > thr
    tl.store(O + n * OH * OW + y * OW + x, out, mask=m)


@triton.jit
def _packed_fwd(X, O, T, S, s_xn, s_xh, s_xw, H, W, sh1, sw1, thr, BLOCK: tl.constexpr):
    """Program (i, n): output pixels i * BLOCK ... of mask n, which starts at flat offset
    T[n, 0] of ``O`` and has input size T[n, 1:3], original size T[n, 3:5] and second-stage
    scales S[n]; programs past the end of a smaller mask do nothing."""
    n = tl.program_id(1).to(tl.int64)
    start = tl.load(T + 5 * n)
    ih = tl.load(T + 5 * n + 1).to(tl.int32)
    iw = tl.load(T + 5 * n + 2).to(tl.int32)
    oh = tl.load(T + 5 * n + 3).to(tl.int32)
    ow = tl.load(T + 5 * n + 4).to(tl.int32)
    if tl.program_id(0) * BLOCK < oh * ow:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        sh2 = tl.load(S + 2 * n)
        sw2 = tl.load(S + 2 * n + 1)
        x = X + n * s_xn
        m = offs < oh * ow
        row = offs // ow
        col = offs % ow
        if (ih == oh) & (iw == ow):
            v = _full_res(x, row, col, s_xh, s_xw, H, W, ih, iw, sh1, sw1, sh2, sw2, False)
        else:
            v = _full_res(x, row, col, s_xh, s_xw, H, W, ih, iw, sh1, sw1, sh2, sw2, True)
        tl.store(O + start + offs, v > thr, mask=m)


@triton.jit
def _scores_fwd(X, COUNTS, BOX, s_xn, s_xh, s_xw, H, W, IH, IW, OH, OW, sh1, sw1, sh2, sw2,
                thr, hi, lo, RESIZE: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Program (i, n): pixel counts above ``hi`` and ``lo`` (COUNTS[n, 0:2]) and the extent
    of the pixels above ``thr`` (BOX[n] = min x, min y, max x, max y) over output tile i
    (see :func:`_postprocess_fwd`) of mask n, merged with atomics."""
    y, x, m = _tile(OW, OH, BY, BX)
    n = tl.program_id(1).to(tl.int64)
    v = _full_res(X + n * s_xn, y, x, s_xh, s_xw, H, W, IH, IW, sh1, sw1, sh2, sw2, RESIZE)
    tl.atomic_add(COUNTS + 2 * n, tl.sum(tl.sum((m & (v > hi)).to(tl.int32), axis=1), axis=0))
    tl.atomic_add(COUNTS + 2 * n + 1, tl.sum(tl.sum((m & (v > lo)).to(tl.int32), axis=1), axis=0))
    on = m & (v > thr)
    tl.atomic_min(BOX + 4 * n, tl.min(tl.min(tl.where(on, x, OW), axis=1), axis=0))
    tl.atomic_min(BOX + 4 * n + 1, tl.min(tl.min(tl.where(on, y, OH), axis=1), axis=0))
    tl.atomic_max(BOX + 4 * n + 2, tl.max(tl.max(tl.where(on, x, -1), axis=1), axis=0))
    tl.atomic_max(BOX + 4 * n + 3, tl.max(tl.max(tl.where(on, y, -1), axis=1), axis=0))


def _scale(n_in: int, n_out: int) -> float:
    """PyTorch's float32 source/destination scale for an output *size* (``float(in) / out``)."""
    return float(np.float32(n_in) / np.float32(n_out))


def _checked_sizes(input_size, original_size, size: int) -> Tuple[int, int, int, int]:
    """(ih, iw, oh, ow) as ints; a ValueError unless the input size lies within the model's
    ``size`` x ``size`` input and the original size is positive."""
    ih, iw = int(input_size[0]), int(input_size[1])
    oh, ow = int(original_size[0]), int(original_size[1])
    if not (0 < ih <= size and 0 < iw <= size and oh > 0 and ow > 0):
        raise ValueError(f"fused post-processing: input_size {tuple(input_size)} must lie within the "
                         f"model's {size}x{size} input and original_size {tuple(original_size)} be positive.")
    return ih, iw, oh, ow


def _geometry(sam, low_res: torch.Tensor, input_size, original_size):
    """Checked sizes and PyTorch's float32 scales of the two bilinear stages."""
    if low_res.dim() < 2 or not low_res.dtype.is_floating_point:
        raise ValueError(f"fused post-processing: expected (..., h, w) float logits, got "
                         f"{tuple(low_res.shape)} {low_res.dtype}.")
    size = sam.image_encoder.img_size
    h, w = low_res.shape[-2], low_res.shape[-1]
    ih, iw, oh, ow = _checked_sizes(input_size, original_size, size)
    if not (low_res.is_cuda or interpreting()):
        raise RuntimeError(
            "postprocess='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); use "
            "postprocess='torch' on the CPU."
        )
    use_torch_ptxas()
    if size % h == 0 and size % w == 0 and size // h == size // w:
        # an integer scale: postprocess_masks passes scale_factor, PyTorch then uses 1 / s
        sh1 = sw1 = float(np.float32(1.0 / (size // h)))
    else:
        sh1, sw1 = _scale(h, size), _scale(w, size)
    return h, w, ih, iw, oh, ow, (sh1, sw1, _scale(ih, oh), _scale(iw, ow))


_BLOCK = 1024  # pixels per program of the flat (packed) kernel
_TILE = (4, 256)  # rows x columns per program of the 2-D kernels (H200 sweep: README)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (masks): larger counts go in chunks


def _tiles(oh: int, ow: int) -> int:
    """Programs per mask of the 2-D kernels (see :func:`_tile`)."""
    return triton.cdiv(oh, _TILE[0]) * triton.cdiv(ow, _TILE[1])


def _mask_chunks(n: int):
    return ((i, min(n, i + _MAX_GRID_Y)) for i in range(0, n, _MAX_GRID_Y))


def masks_from_logits(sam, low_res: torch.Tensor, input_size: Tuple[int, ...],
                      original_size: Tuple[int, ...], return_logits: bool = False) -> torch.Tensor:
    """``sam.postprocess_masks(low_res, input_size, original_size)``, thresholded at
    ``sam.mask_threshold`` unless ``return_logits`` (float32 logits then), in one kernel.
    ``low_res``: (..., h, w) logits of any float dtype; returns (..., H, W) of ``original_size``."""
    h, w, ih, iw, oh, ow, scales = _geometry(sam, low_res, input_size, original_size)
    lead = low_res.shape[:-2]
    x = low_res.reshape(-1, h, w)
    out = torch.empty((x.shape[0], oh, ow), device=low_res.device,
                      dtype=torch.float32 if return_logits else torch.bool)
    for a, b in _mask_chunks(x.shape[0]):
        _postprocess_fwd[(_tiles(oh, ow), b - a)](
            x[a:b], out[a:b], *x.stride(), h, w, ih, iw, oh, ow, *scales, float(sam.mask_threshold),
            RESIZE=(oh, ow) != (ih, iw), LOGITS=bool(return_logits), BY=_TILE[0], BX=_TILE[1],
            num_warps=4,
        )
    return out.reshape(*lead, oh, ow)


def packed_layout(input_sizes, original_sizes, counts, model_size: int):
    """Host-side layout of :func:`packed_masks_from_logits` for ``counts[i]`` masks of image i
    (``input_sizes[i]``: its size resized for the model, ``original_sizes[i]``: its size).

    Returns ``(table, scales, offsets, total, max_pixels)``: the (P, 5) int64 rows (flat start,
    input h, w, original h, w) and (P, 2) float32 second-stage scales of the P masks, each
    image's start in the flat output, its length and the largest mask's pixel count."""
    if not len(input_sizes) == len(original_sizes) == len(counts):
        raise ValueError("packed_layout: input_sizes, original_sizes and counts differ in length.")
    rows, scales, offsets = [], [], []
    total = max_pixels = 0
    for input_size, original_size, k in zip(input_sizes, original_sizes, counts):
        ih, iw, oh, ow = _checked_sizes(input_size, original_size, model_size)
        k = int(k)
        if k < 0:
            raise ValueError(f"packed_layout: mask counts must be >= 0, got {k}.")
        offsets.append(total)
        for j in range(k):
            rows.append((total + j * oh * ow, ih, iw, oh, ow))
            scales.append((_scale(ih, oh), _scale(iw, ow)))
        total += k * oh * ow
        if k:
            max_pixels = max(max_pixels, oh * ow)
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return table, np.asarray(scales, dtype=np.float32).reshape(-1, 2), offsets, total, max_pixels


def packed_masks_from_logits(sam, low_res: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                             total: int, max_pixels: int) -> torch.Tensor:
    """Bool masks of the (P, h, w) (or (P, 1, h, w)) ``low_res`` logits, mask n at the input and
    original size of row n of ``table`` (:func:`packed_layout`, on ``low_res``' device), written
    flat and back to back: a (total,) tensor, one kernel launch for all P masks."""
    x = low_res.reshape(-1, *low_res.shape[-2:]) if low_res.dim() >= 2 else low_res
    n = x.shape[0] if x.dim() == 3 else -1
    if n < 0 or tuple(table.shape) != (n, 5) or tuple(scales.shape) != (n, 2):
        raise ValueError(f"packed post-processing: expected (P, h, w) logits with a (P, 5) table and "
                         f"(P, 2) scales, got {tuple(low_res.shape)}, {tuple(table.shape)}, "
                         f"{tuple(scales.shape)}.")
    size = sam.image_encoder.img_size
    h, w, _, _, _, _, (sh1, sw1, _, _) = _geometry(sam, x, (size, size), (size, size))
    out = torch.empty(int(total), device=x.device, dtype=torch.bool)
    table = table.to(device=x.device, dtype=torch.int64)
    scales = scales.to(device=x.device, dtype=torch.float32)
    if n and total:
        for a, b in _mask_chunks(n):
            _packed_fwd[(triton.cdiv(int(max_pixels), _BLOCK), b - a)](
                x[a:b], out, table[a:b], scales[a:b], *x.stride(), h, w, sh1, sw1,
                float(sam.mask_threshold), BLOCK=_BLOCK, num_warps=4)
    return out


def mask_scores(sam, low_res: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...],
                offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stability scores (float32) and XYXY boxes (int64, zeros when empty) of the masks
    ``masks_from_logits`` would give for (N, h, w) ``low_res``, without writing them: the
    automatic mask generator's candidate scoring (``calculate_stability_score`` at
    ``sam.mask_threshold`` +/- ``offset``, ``batched_mask_to_box``)."""
    h, w, ih, iw, oh, ow, scales = _geometry(sam, low_res, input_size, original_size)
    x = low_res.reshape(-1, h, w)
    n = x.shape[0]
    counts = torch.zeros((n, 2), device=x.device, dtype=torch.int32)
    box = torch.full((n, 4), -1, device=x.device, dtype=torch.int32)  # fills: no host copy
    box[:, 0], box[:, 1] = ow, oh
    thr = float(sam.mask_threshold)
    for a, b in _mask_chunks(n):
        _scores_fwd[(_tiles(oh, ow), b - a)](
            x[a:b], counts[a:b], box[a:b], *x.stride(), h, w, ih, iw, oh, ow, *scales, thr,
            thr + offset, thr - offset, RESIZE=(oh, ow) != (ih, iw), BY=_TILE[0], BX=_TILE[1],
            num_warps=4,
        )
    stability = counts[:, 0] / counts[:, 1]
    box = box.long()
    return stability, torch.where(box[:, 2:3] >= 0, box, torch.zeros_like(box))
