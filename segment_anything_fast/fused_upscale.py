"""Mask-decoder upscaling ``"triton"``: one fused kernel from decoder tokens to mask logits.

The original decoder runs ``ConvTranspose2d(C, C/4, 2, stride 2) -> LayerNorm2d -> GELU ->
ConvTranspose2d(C/4, C/8, 2, stride 2) -> GELU`` on every prompt's (C, h, w) image tokens and
then multiplies the (C/8, 4h, 4w) result with the prompt's hypernetwork vectors. With
1024 prompts (automatic mask generation) the intermediate tensors are gigabytes, so the
chain is memory bound. A stride-2 kernel-2 transposed convolution is a GEMM whose four
output columns groups are the four sub-pixels, so one program here takes ``BLOCK`` tokens of
one prompt and, for each of the 4 x 4 sub-pixels, runs GEMM -> LayerNorm -> GELU -> GEMM ->
GELU -> hypernetwork dot in registers, writing only the (T, 4h, 4w) mask logits.

Each step rounds to the model dtype where the module chain would, so bf16 results match the
module path to bf16 rounding. Needs power-of-two channel counts with C/8 >= 16 (all SAM
configs); :func:`check_supported` says so otherwise. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (tests).
"""
import os

import torch
import triton
import triton.language as tl

from .triton_env import use_torch_ptxas

@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _upscale_masks_fwd(
    X, HYP, W1, B1, LNW, LNB, W2, B2, O,
    s_xb, s_xn, s_xc,
    s_hb, s_ht, s_hc,
    s_ob, s_ot, s_oh, s_ow,
    N, GW, T, eps,
    C: tl.constexpr, C4: tl.constexpr, C8: tl.constexpr, TP: tl.constexpr,
    BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    dt = X.dtype.element_ty
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gi = offs // GW
    gj = offs % GW
    c = tl.arange(0, C)
    c4 = tl.arange(0, C4)
    c8 = tl.arange(0, C8)
    tp = tl.arange(0, TP)

    x = tl.load(X + b * s_xb + offs[:, None] * s_xn + c[None, :] * s_xc, mask=ok[:, None], other=0.0)
    # hypernetwork vectors as (C8, TP) columns, padded with zeros beyond T
    hyp = tl.load(HYP + b * s_hb + tp[None, :] * s_ht + c8[:, None] * s_hc, mask=tp[None, :] < T, other=0.0)
    b1 = tl.load(B1 + c4).to(tl.float32)
    lnw = tl.load(LNW + c4).to(tl.float32)
    lnb = tl.load(LNB + c4).to(tl.float32)
    b2 = tl.load(B2 + c8).to(tl.float32)
    o_base = O + b * s_ob + tp[None, :] * s_ot
    o_mask = ok[:, None] & (tp[None, :] < T)

    for s1 in tl.static_range(4):
        w1 = tl.load(W1 + c[:, None] * (4 * C4) + s1 * C4 + c4[None, :])
        y = tl.dot(x, w1, input_precision=PREC) + b1[None, :]
        y = y.to(dt).to(tl.float32)
        mean = tl.sum(y, axis=1) / C4
        yc = y - mean[:, None]
        var = tl.sum(yc * yc, axis=1) / C4
        y = yc / tl.sqrt(var + eps)[:, None] * lnw[None, :] + lnb[None, :]
        y = _gelu(y.to(dt).to(tl.float32)).to(dt)
        for s2 in tl.static_range(4):
            w2 = tl.load(W2 + c4[:, None] * (4 * C8) + s2 * C8 + c8[None, :])
            z = tl.dot(y, w2, input_precision=PREC) + b2[None, :]
            z = _gelu(z.to(dt).to(tl.float32)).to(dt)
            m = tl.dot(z, hyp, input_precision=PREC)
            row = 4 * gi + 2 * (s1 // 2) + (s2 // 2)
            col = 4 * gj + 2 * (s1 % 2) + (s2 % 2)
            ptr = o_base + row[:, None] * s_oh + col[:, None] * s_ow
            tl.store(ptr, m.to(dt), mask=o_mask)


def check_supported(channels: int, num_mask_tokens: int) -> None:
    """Raise a ValueError if a decoder of ``channels`` (transformer_dim) cannot use the kernel."""
    pow2 = channels >= 128 and channels & (channels - 1) == 0
    if not pow2 or num_mask_tokens > 64:
        raise ValueError(
            f"upscaling='triton' needs a power-of-two transformer_dim >= 128 and at most 64 mask "
            f"tokens (got {channels}, {num_mask_tokens}); use upscaling='conv'."
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT_CONFIG = dict(BLOCK=64, num_warps=4, num_stages=2)


def _launch(src, hyper, w1, b1, ln_w, ln_b, ln_eps: float, w2, b2, grid_w: int, config=None):
    """(B, T, 4h, 4w) mask logits from tokens ``src`` (B, h*w, C) and ``hyper`` (B, T, C/8).

    w1 (C, C/4, 2, 2) / w2 (C/4, C/8, 2, 2) are the two ConvTranspose2d weights, b1/b2 their
    biases, ln_w/ln_b/ln_eps the LayerNorm2d between them; ``grid_w`` is w. ``config``
    (benchmarks) overrides :data:`DEFAULT_CONFIG`.
    """
    if not (src.is_cuda or _interpreting()):
        raise RuntimeError(
            "upscaling='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); use "
            "upscaling='conv' on the CPU."
        )
    use_torch_ptxas()
    B, N, C = src.shape
    T, C8 = hyper.shape[1], hyper.shape[2]
    C4 = w1.shape[1]
    if N % grid_w or hyper.shape[0] != B or C8 * 2 != C4 or C4 * 4 != C:
        raise ValueError(
            f"upscale: tokens {tuple(src.shape)}, hypernetwork {tuple(hyper.shape)} and grid width "
            f"{grid_w} do not fit a C -> C/4 -> C/8 upscaling."
        )
    dt = src.dtype
    # (C_in, C_out, a, b) -> (C_in, [a, b, C_out]): sub-pixel (a, b) owns C_out adjacent columns
    w1p = w1.to(dt).permute(0, 2, 3, 1).reshape(C, 4 * C4).contiguous()
    w2p = w2.to(dt).permute(0, 2, 3, 1).reshape(C4, 4 * C8).contiguous()
    hyper = hyper.to(dt)
    gh = N // grid_w
    out = torch.empty(B, T, 4 * gh, 4 * grid_w, device=src.device, dtype=dt)
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    grid = (triton.cdiv(N, cfg["BLOCK"]), B)
    _upscale_masks_fwd[grid](
        src, hyper, w1p, b1, ln_w, ln_b, w2p, b2, out,
        *src.stride(), *hyper.stride(), *out.stride(),
        N, grid_w, T, ln_eps,
        C=C, C4=C4, C8=C8, TP=max(16, triton.next_power_of_2(T)),
        BLOCK=cfg["BLOCK"], IEEE=dt == torch.float32, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


@torch.library.custom_op("sam_fast::upscale_masks", mutates_args=())
def _upscale_op(
    src: torch.Tensor, hyper: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    ln_w: torch.Tensor, ln_b: torch.Tensor, ln_eps: float, w2: torch.Tensor, b2: torch.Tensor,
    grid_w: int,
) -> torch.Tensor:
    return _launch(src, hyper, w1, b1, ln_w, ln_b, ln_eps, w2, b2, grid_w)


@_upscale_op.register_fake
def _(src, hyper, w1, b1, ln_w, ln_b, ln_eps, w2, b2, grid_w):
    B, N, _ = src.shape
    return src.new_empty(B, hyper.shape[1], 4 * (N // grid_w), 4 * grid_w)


def fused_upscale_masks(upscaling: torch.nn.Sequential, src: torch.Tensor, hyper: torch.Tensor,
                        grid_w: int, config=None):
    """``hyper @ upscaling(src as (B, C, h, w))`` in one kernel; ``upscaling`` is the decoder's
    ``output_upscaling`` (its weights are used as they are). A custom op, so ``torch.compile``
    keeps it whole; ``config`` (benchmarks only) bypasses the op."""
    conv1, ln, _, conv2, _ = upscaling
    args = (src, hyper, conv1.weight, conv1.bias, ln.weight, ln.bias, float(ln.eps), conv2.weight,
            conv2.bias, grid_w)
    return _launch(*args, config=config) if config is not None else _upscale_op(*args)
