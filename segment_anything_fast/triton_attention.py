"""Attention backend ``"triton"``: our own fused Triton kernel for SAM's rel-pos attention.

One program computes a ``BLOCK_M`` slice of queries of one (batch, head) with an online softmax
(FlashAttention-2 style). The key grid ``GH x GW`` is walked in blocks of ``ROWS`` grid rows, each
row padded to ``WP = next_pow2(GW)`` columns (padding columns are masked, no data is copied), so
inside a key block the column index is ``n % WP`` and the row index ``n // WP``:

* the ``rel_w`` tile (``BLOCK_M x BLOCK_N``, columns repeating every ``WP``) is loaded once per
  program and reused for every key block;
* the ``rel_h`` values of the block's ``ROWS`` grid rows are loaded per key block.

The ``(N, N)`` bias is never built. This serves both the global layers (64x64 grid: ``WP = 64``)
and the 14x14 windows (``WP = 16``, 2 of 16 columns masked). Head dims that are not a power of
two (vit_h: 80) are split into a power-of-two part and a tail (64 + 16), so no FLOPs are wasted
on zero padding.

Launch parameters are picked by :func:`kernel_config` from the GPU generation and the shape
(a table written from measurements, nothing pickled, no autotuning at run time). Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .attention import register_backend
from .triton_env import interpreting, use_torch_ptxas

_LOG2E = 1.4426950408889634


@triton.jit
def _rel_pos_attn_fwd(
    Q, K, V, RH, RW, O,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_hb, s_hh, s_hn, s_hk,
    s_wb, s_wh, s_wn, s_wk,
    NH, N, GH, GW, qk_scale,
    HAS_BIAS: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    WP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    BLOCK_N: tl.constexpr = ROWS * WP
    LOG2E: tl.constexpr = 1.4426950408889634
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    offs_n = tl.arange(0, BLOCK_N)
    n_row = offs_n // WP
    n_col = offs_n % WP
    col_ok = n_col < GW
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qn
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    if EVEN_M:
        q0 = tl.load(q_base + d0[None, :] * s_qd)
    else:
        q0 = tl.load(q_base + d0[None, :] * s_qd, mask=m_ok[:, None], other=0.0)
    if D1 > 0:
        q1 = tl.load(q_base + d1[None, :] * s_qd, mask=m_ok[:, None], other=0.0)

    if HAS_BIAS:
        rh_ptr = RH + b.to(tl.int64) * s_hb + h.to(tl.int64) * s_hh + offs_m * s_hn
        rw_ptr = RW + b.to(tl.int64) * s_wb + h.to(tl.int64) * s_wh + offs_m[:, None] * s_wn
        # rel_w for every key column of a block: loaded once, reused for all key blocks
        bias_w = tl.load(rw_ptr + n_col[None, :] * s_wk, mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        bias_w = bias_w.to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

    for j in range(0, tl.cdiv(GH, ROWS)):
        kv_row = j * ROWS + n_row
        kv_idx = kv_row * GW + n_col
        kv_ok = col_ok & (kv_row < GH) & (kv_idx < N)
        k_ptr = k_base + kv_idx[None, :] * s_kn
        if EVEN_N:
            k0 = tl.load(k_ptr + d0[:, None] * s_kd)
        else:
            k0 = tl.load(k_ptr + d0[:, None] * s_kd, mask=kv_ok[None, :], other=0.0)
        s = tl.dot(q0, k0, input_precision=PREC)
        if D1 > 0:
            k1 = tl.load(k_ptr + d1[:, None] * s_kd, mask=kv_ok[None, :], other=0.0)
            s = tl.dot(q1, k1, s, input_precision=PREC)
        if HAS_BIAS:
            s = s * qk_scale + bias_w
            # rel_h: one value per query for each of the block's ROWS key-grid rows
            for r in tl.static_range(ROWS):
                col = tl.load(rh_ptr + (j * ROWS + r) * s_hk, mask=m_ok & (j * ROWS + r < GH), other=0.0)
                col = col.to(tl.float32) * LOG2E
                if ROWS == 1:
                    s = s + col[:, None]
                else:
                    s = s + tl.where(n_row[None, :] == r, col[:, None], 0.0)
        else:
            s = s * qk_scale
        if not EVEN_N:
            s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)
        v_ptr = v_base + kv_idx[:, None] * s_vn
        if EVEN_N:
            v0 = tl.load(v_ptr + d0[None, :] * s_vd)
        else:
            v0 = tl.load(v_ptr + d0[None, :] * s_vd, mask=kv_ok[:, None], other=0.0)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            v1 = tl.load(v_ptr + d1[None, :] * s_vd, mask=kv_ok[:, None], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new

    o_base = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_on
    inv_l = 1.0 / l_i
    if EVEN_M:
        tl.store(o_base + d0[None, :] * s_od, (acc0 * inv_l[:, None]).to(O.dtype.element_ty))
    else:
        tl.store(o_base + d0[None, :] * s_od, (acc0 * inv_l[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None])
    if D1 > 0:
        tl.store(o_base + d1[None, :] * s_od, (acc1 * inv_l[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None])


def _split_head_dim(d: int) -> Tuple[int, int]:
    """d = D0 + D1 with D0 a power of two >= 16 and D1 zero or a power of two >= 16."""
    if d < 16 or d % 16:
        raise ValueError(f"triton attention needs a head dim that is a multiple of 16, got {d}.")
    d0 = 1 << (d.bit_length() - 1)
    d1 = d - d0
    if d1 and (d1 & (d1 - 1)):
        raise ValueError(f"triton attention cannot split head dim {d} into two powers of two.")
    return d0, d1


def kernel_config(n_tokens: int, grid_w: int, head_dim: int, capability: Tuple[int, int]) -> dict:
    """Launch parameters by GPU generation and shape; returns BLOCK_M, ROWS (key-grid rows per
    key block), num_warps, num_stages.

    Hopper rows come from experiments/bench_attention.py on an H100 (batch 8, bf16;
    experiments/results/attention_h100_b8.json): global 64x64 layers reach ~310 TFLOP/s,
    14x14 windows ~90. The Ampere rows are the same tile shapes with shallower pipelines
    (less shared memory), not measured here.
    """
    wp = triton.next_power_of_2(grid_w)
    split = head_dim & (head_dim - 1) != 0  # e.g. 80 = 64 + 16: more registers per row
    if capability[0] >= 9:  # Hopper
        if n_tokens >= 1024:  # global layers: one 64-wide key-grid row per block
            return dict(BLOCK_M=128 if split else 64, ROWS=max(1, 64 // wp), num_warps=4, num_stages=3)
        return dict(BLOCK_M=64, ROWS=max(1, 32 // wp), num_warps=4, num_stages=4 if split else 3)
    if n_tokens >= 1024:  # Ampere and older
        return dict(BLOCK_M=64, ROWS=max(1, 64 // wp), num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, ROWS=max(1, 32 // wp), num_warps=4, num_stages=2)



def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Fused softmax(q k^T / sqrt(d) + rel_h[..., kv // W] + rel_w[..., kv % W]) v.

    q, k, v: (B, heads, N, d) with N = H * W; rel_h (B, heads, N, H), rel_w (B, heads, N, W).
    ``config`` overrides :func:`kernel_config` (used by the tuning benchmark).
    """
    if not (q.is_cuda or interpreting()):
        raise RuntimeError(
            "The 'triton' attention backend needs CUDA tensors (or TRITON_INTERPRET=1 for the "
            "Triton interpreter on CPU); use attention='flex' or 'sdpa' on the CPU."
        )
    use_torch_ptxas()
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"triton attention: q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}.")
    B, nh, N, d = q.shape
    d0, d1 = _split_head_dim(d)
    has_bias = rel_h is not None
    if has_bias:
        if rel_w is None:
            raise ValueError("triton attention: rel_h and rel_w must be given together.")
        gh, gw = rel_h.shape[-1], rel_w.shape[-1]
        if gh * gw != N or rel_h.shape[:3] != (B, nh, N) or rel_w.shape[:3] != (B, nh, N):
            raise ValueError(
                f"triton attention: rel_h {tuple(rel_h.shape)} / rel_w {tuple(rel_w.shape)} do not "
                f"describe the {N} keys of q {tuple(q.shape)}."
            )
        rh, rw = rel_h, rel_w
    else:
        gw = 64  # no bias: walk the keys as rows of 64
        gh = triton.cdiv(N, gw)
        rh = rw = q  # unused
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (9, 0)
    cfg = dict(config) if config is not None else kernel_config(N, gw, d, cap)
    wp = triton.next_power_of_2(gw)
    o = torch.empty_like(q)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * nh)
    _rel_pos_attn_fwd[grid](
        q, k, v, rh, rw, o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *rh.stride(), *rw.stride(),
        nh, N, gh, gw, (d ** -0.5) * _LOG2E,
        HAS_BIAS=has_bias, D0=d0, D1=d1, WP=wp, ROWS=cfg["ROWS"], BLOCK_M=cfg["BLOCK_M"],
        EVEN_M=N % cfg["BLOCK_M"] == 0, EVEN_N=(wp == gw and gh % cfg["ROWS"] == 0 and gh * gw == N),
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o


@torch.library.custom_op("sam_fast::triton_rel_pos_attention", mutates_args=())
def _triton_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch(q, k, v, rel_h, rel_w)


@_triton_op.register_fake
def _(q, k, v, rel_h, rel_w):
    return torch.empty_like(q)


def triton_rel_pos_attention(q, k, v, rel_h=None, rel_w=None, config=None):
    """Fused rel-pos attention (see :func:`_launch`); a custom op, so ``torch.compile`` keeps it
    whole (fullgraph) and calls the kernel. ``config`` (benchmarks only) bypasses the op."""
    if config is not None:
        return _launch(q, k, v, rel_h, rel_w, config)
    return _triton_op(q, k, v, rel_h, rel_w)


register_backend("triton", triton_rel_pos_attention)
