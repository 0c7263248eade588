"""Image pre-processing ``preprocess="triton"``: a batch of images, at their own sizes, to the
encoder's normalised, zero-padded input in one kernel.

The host side of SAM's pre-processing resizes every image so that its long side is the model's
input size (PIL bilinear), then the model normalises and zero-pads it. On the host, PIL's resize
of a 480x640 image costs ~14 ms (2-core CPU here): in an evaluation it is most of a data worker's
time. Here the host only packs the images as they were decoded, back to back in one flat uint8
buffer (:func:`pack_images`, a few hundred KB per image instead of 3 MB), and one Triton kernel
(:func:`preprocess_packed`) computes every pixel of the (B, 3, S, S) input: PIL's two-pass
bilinear resampling in 22-bit fixed point (horizontal pass rounded to uint8, then vertical, with
the filter coefficients of :mod:`gpu_resize`, so the resized pixels equal PIL's bit for bit),
then ``(pixel - mean) / std``, zero outside the image. Images that shrink are resized by PIL on
the host first (Pillow picks the order of its passes for those by rules not reproduced here) and
pass through the kernel with identity coefficients. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (tests).
"""
from typing import List, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .gpu_resize import _PRECISION_BITS, _coefficients
from .triton_env import interpreting, use_torch_ptxas
from .utils.transforms import ResizeLongestSide



@triton.jit
def _round(acc, SHIFT: tl.constexpr):
    """PIL's rounding of a fixed-point sum to uint8 (as int32)."""
    return tl.minimum(tl.maximum((acc + (1 << (SHIFT - 1))) >> SHIFT, 0), 255)


@triton.jit
def _row(P, base, r, in_w, x0, w0, w1, w2, c, m, SHIFT: tl.constexpr):
    """The horizontal pass at source rows ``r`` (ROWS, 1) for output columns with first source
    column ``x0`` and weights ``w0..w2`` (1, COLS): uint8-rounded, as int32."""
    row = P + base + (r * in_w).to(tl.int64) * 3 + c
    acc = (w0 * tl.load(row + tl.minimum(x0, in_w - 1) * 3, mask=m, other=0).to(tl.int32)
           + w1 * tl.load(row + tl.minimum(x0 + 1, in_w - 1) * 3, mask=m, other=0).to(tl.int32)
           + w2 * tl.load(row + tl.minimum(x0 + 2, in_w - 1) * 3, mask=m, other=0).to(tl.int32))
    return _round(acc, SHIFT)


@triton.jit
def _preprocess_fwd(P, O, G, XC, YC, MEAN, STD, S, ROWS: tl.constexpr, COLS: tl.constexpr,
                    SHIFT: tl.constexpr):
    """Program (i, b, j): output rows i * ROWS ..., columns j * COLS ..., all 3 channels of
    image b. G[b] = (flat start, input h, w, resized h, w); XC[b, x] / YC[b, y] = (first source
    index, 3 fixed-point weights) of output column x / row y."""
    b = tl.program_id(1).to(tl.int64)
    y = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    x = tl.program_id(2) * COLS + tl.arange(0, COLS)[None, :]
    base = tl.load(G + 5 * b)
    in_h = tl.load(G + 5 * b + 1).to(tl.int32)
    in_w = tl.load(G + 5 * b + 2).to(tl.int32)
    out_h = tl.load(G + 5 * b + 3).to(tl.int32)
    out_w = tl.load(G + 5 * b + 4).to(tl.int32)
    inside_x = x < out_w
    inside_y = y < out_h
    m = inside_x & inside_y
    xc = XC + (b * S + x) * 4
    x0 = tl.load(xc, mask=inside_x, other=0)
    u0 = tl.load(xc + 1, mask=inside_x, other=0)
    u1 = tl.load(xc + 2, mask=inside_x, other=0)
    u2 = tl.load(xc + 3, mask=inside_x, other=0)
    yc = YC + (b * S + y) * 4
    y0 = tl.load(yc, mask=inside_y, other=0)
    v0 = tl.load(yc + 1, mask=inside_y, other=0)
    v1 = tl.load(yc + 2, mask=inside_y, other=0)
    v2 = tl.load(yc + 3, mask=inside_y, other=0)
    ra = tl.minimum(y0, in_h - 1)
    rb = tl.minimum(y0 + 1, in_h - 1)
    rc = tl.minimum(y0 + 2, in_h - 1)
    out = O + b * 3 * S * S + y * S + x
    keep = (y < S) & (x < S)
    for c in tl.static_range(3):
        acc = (v0 * _row(P, base, ra, in_w, x0, u0, u1, u2, c, m, SHIFT)
               + v1 * _row(P, base, rb, in_w, x0, u0, u1, u2, c, m, SHIFT)
               + v2 * _row(P, base, rc, in_w, x0, u0, u1, u2, c, m, SHIFT))
        pixel = _round(acc, SHIFT).to(tl.float32)
        value = (pixel - tl.load(MEAN + c)) / tl.load(STD + c)
        tl.store(out + c * S * S, tl.where(m, value, 0.0).to(O.dtype.element_ty), mask=keep)


def _tile() -> tuple:
    """(rows, columns) of output per program: small tiles on the GPU, whole 128 px test images
    per program under the interpreter (whose cost is per program)."""
    return (64, 128) if interpreting() else (8, 128)


def _axis_table(in_size: int, out_size: int, model_size: int) -> np.ndarray:
    """(model_size, 4) int32 rows (first source index, 3 weights) of one axis (identity rows when
    the size does not change), zeros past ``out_size``."""
    table = np.zeros((model_size, 4), dtype=np.int32)
    first, weights = _coefficients(in_size, out_size)
    table[:out_size, 0] = first
    table[:out_size, 1:] = weights  # 3 taps for every enlargement
    return table


def pack_images(images: Sequence[np.ndarray], model_size: int, batch: int = 0) -> dict:
    """The host side of :func:`preprocess_packed` for (H, W, 3) uint8 RGB ``images``: ``pixels``
    (flat uint8, the images back to back; those that shrink already resized by PIL),
    ``geometry`` (B, 5) int64 (flat start, input h, w, resized h, w), ``x_coef`` / ``y_coef``
    (B, S, 4) int32, and ``sizes`` (B, 2) int64 resized (h, w). ``batch`` pads the batch with
    empty images (all zero in the output) up to that many."""
    transform = ResizeLongestSide(model_size)
    n = max(len(images), batch)
    geometry = np.zeros((n, 5), dtype=np.int64)
    x_coef = np.zeros((n, model_size, 4), dtype=np.int32)
    y_coef = np.zeros((n, model_size, 4), dtype=np.int32)
    parts: List[np.ndarray] = []
    start = 0
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"pack_images: image {i} must be a non-empty (H, W, 3) uint8 array, got "
                             f"{image.dtype} {image.shape}.")
        h, w = image.shape[:2]
        new_h, new_w = transform.get_preprocess_shape(h, w, model_size)
        if new_h < h or new_w < w:  # shrinks: PIL on the host, then identity coefficients
            image = transform.apply_image(image)
            h, w = image.shape[:2]
        geometry[i] = (start, h, w, new_h, new_w)
        x_coef[i] = _axis_table(w, new_w, model_size)
        y_coef[i] = _axis_table(h, new_h, model_size)
        parts.append(np.ascontiguousarray(image).reshape(-1))
        start += image.size
    pixels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return {"pixels": torch.from_numpy(pixels), "geometry": torch.from_numpy(geometry),
            "x_coef": torch.from_numpy(x_coef), "y_coef": torch.from_numpy(y_coef),
            "sizes": torch.from_numpy(np.ascontiguousarray(geometry[:, 3:5]))}


def preprocess_packed(sam, pixels: torch.Tensor, geometry: torch.Tensor, x_coef: torch.Tensor,
                      y_coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 3, S, S) encoder input in ``dtype`` of a :func:`pack_images` batch (its tensors
    on the model's device): resized as PIL does, normalised with ``sam.pixel_mean`` /
    ``pixel_std``, zero-padded; one kernel launch."""
    size = sam.image_encoder.img_size
    n = geometry.shape[0] if geometry.dim() == 2 else -1
    if (n < 0 or geometry.shape[1] != 5 or tuple(x_coef.shape) != (n, size, 4)
            or tuple(y_coef.shape) != (n, size, 4) or pixels.dim() != 1 or pixels.dtype != torch.uint8):
        raise ValueError(
            f"preprocess_packed: expected flat uint8 pixels, a (B, 5) geometry and (B, {size}, 4) "
            f"coefficient tables (pack_images), got {tuple(pixels.shape)} {pixels.dtype}, "
            f"{tuple(geometry.shape)}, {tuple(x_coef.shape)}, {tuple(y_coef.shape)}.")
    device = sam.pixel_mean.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"preprocess='triton' needs CUDA tensors; the model is on {device}. "
                           "Use the host pre-processing (sam.preprocess) on the CPU.")
    tensors = [t.to(device) for t in (pixels, geometry, x_coef, y_coef)]
    out = torch.empty((n, 3, size, size), device=device, dtype=dtype)
    if n:
        use_torch_ptxas()
        mean = sam.pixel_mean.reshape(3).float().contiguous()
        std = sam.pixel_std.reshape(3).float().contiguous()
        rows, cols = _tile()
        _preprocess_fwd[(triton.cdiv(size, rows), n, triton.cdiv(size, cols))](
            tensors[0].contiguous(), out, tensors[1].long().contiguous(), tensors[2].int().contiguous(),
            tensors[3].int().contiguous(), mean, std, size,
            ROWS=rows, COLS=cols, SHIFT=_PRECISION_BITS, num_warps=4)
    return out
