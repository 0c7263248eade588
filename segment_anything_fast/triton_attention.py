"""Attention backend ``"triton"``: our own fused Triton kernel for SAM's rel-pos attention.

One program computes a ``BLOCK_M`` slice of the queries of one (image, window, head) with an
online softmax (FlashAttention-2 style). The key grid of the window (``WH x WW`` tokens; the
whole 64x64 grid in the global layers) is walked in blocks of ``ROWS`` grid rows, each row padded
to ``WP = next_pow2(WW)`` columns (padding columns are masked, no data is copied), so inside a
key block the column index is ``n % WP`` and the row index ``n // WP``:

* the ``rel_w`` tile (``BLOCK_M x BLOCK_N``, columns repeating every ``WP``) is loaded once per
  program and is the initial value of every key block's ``q.k`` accumulator (scores stay in
  ``q.k`` units; the softmax scale is applied inside ``exp2``), so adding the bias costs no
  arithmetic per score;
* the ``rel_h`` values of the block's ``ROWS`` grid rows are loaded per key block (with one row
  per block: one value per query, folded into the row max).

The ``(N, N)`` bias is never built. The encoder calls :func:`triton_grid_attention` on its
``(B, H, W, 3C)`` qkv tensor: windows are read in place (tokens padded onto the edge windows get
the qkv bias as k / v, as SAM's padding before ``qkv`` gives) and the output is written straight
into ``(B, H, W, C)``, so no window partition, unpartition or head transpose is copied.
:func:`triton_rel_pos_attention` is the same kernel on ``(B, heads, N, d)`` tensors. Head dims
that are not a power of two (vit_h: 80) are split into a power-of-two part and a tail (64 + 16),
so no FLOPs are wasted on zero padding.

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
    Q, K, V, RH, RW, PK, PV, O,
    s_qb, s_qh, s_qy, s_qx, s_qd,
    s_kb, s_kh, s_ky, s_kx, s_kd,
    s_vb, s_vh, s_vy, s_vx, s_vd,
    s_ob, s_oh, s_oy, s_ox, s_od,
    s_hb, s_hh, s_hy, s_hx, s_hk,
    s_wb, s_wh, s_wy, s_wx, s_wk,
    NH, NWX, NWIN, H, W, NTOK, qk_scale, inv_scale,
    HAS_BIAS: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_PAD: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    WH: tl.constexpr,
    WW: tl.constexpr,
    WP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    MASK_COLS: tl.constexpr,
    TABLE: tl.constexpr,
    IEEE: tl.constexpr,
):
    BLOCK_N: tl.constexpr = ROWS * WP
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % NH
    bw = pid // NH
    win = bw % NWIN
    b = bw // NWIN
    y0 = (win // NWX) * WH  # the window's first grid row and column
    x0 = (win % NWX) * WW
    edge = (y0 + WH > H) | (x0 + WW > W)  # a window reaching into the padding

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qy = y0 + offs_m // WW
    qx = x0 + offs_m % WW
    m_ok = (offs_m < WH * WW) & (qy < H) & (qx < W) & (qy * W + qx < NTOK)
    offs_n = tl.arange(0, BLOCK_N)
    n_row = offs_n // WP
    n_col = offs_n % WP
    col_ok = n_col < WW
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + (qy * s_qy + qx * s_qx)[:, None]
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    if EVEN_M:
        q0 = tl.load(q_base + d0[None, :] * s_qd)
    else:
        q0 = tl.load(q_base + d0[None, :] * s_qd, mask=m_ok[:, None], other=0.0)
    if D1 > 0:
        q1 = tl.load(q_base + d1[None, :] * s_qd, mask=m_ok[:, None], other=0.0)
    if HAS_PAD:
        # Tokens padded onto the window all have the same k and v (qkv's bias): the k / v
        # tiles are loaded with zeros there (plain loads, which the pipeline copies straight
        # to shared memory) and, in windows that reach into the padding, each query's score
        # q.pk and its weight on pv are added separately.
        pk0 = tl.load(PK + h * (D0 + D1) + d0).to(tl.float32)
        pv0 = tl.load(PV + h * (D0 + D1) + d0).to(tl.float32)
        q_pk = tl.sum(q0.to(tl.float32) * pk0[None, :], 1)
        if D1 > 0:
            pk1 = tl.load(PK + h * (D0 + D1) + d1).to(tl.float32)
            pv1 = tl.load(PV + h * (D0 + D1) + d1).to(tl.float32)
            q_pk += tl.sum(q1.to(tl.float32) * pk1[None, :], 1)

    # Scores stay in units of q.k (the softmax scale and log2(e) are applied inside exp2), so
    # the rel-pos bias, divided by the scale once, is the initial value of the q.k accumulator:
    # no per-score bias arithmetic. With one key-grid row per block (ROWS == 1), rel_h is one
    # value per query row, taken out of the row max and the exponent instead of the tile.
    if HAS_BIAS:
        rh_ptr = RH + b.to(tl.int64) * s_hb + h.to(tl.int64) * s_hh + qy * s_hy + qx * s_hx
        rw_ptr = RW + b.to(tl.int64) * s_wb + h.to(tl.int64) * s_wh + (qy * s_wy + qx * s_wx)[:, None]
        if TABLE:  # q.table per relative offset: key row k at entry (query row - k + WH - 1)
            h_first, h_step = (qy - y0) + (WH - 1), -1
            w_idx = (qx - x0 + (WW - 1))[:, None] - n_col[None, :]
        else:  # one value per key row / column
            h_first, h_step = 0, 1
            w_idx = n_col[None, :]
        # rel_w for every key column of a block: loaded once, reused for all key blocks
        bias_w = tl.load(rw_ptr + w_idx * s_wk, mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        bias_w = bias_w.to(tl.float32) * inv_scale
        if not (MASK_COLS or EVEN_N):  # only the padding columns to mask: -inf from the start
            bias_w = tl.where(col_ok[None, :], bias_w, float("-inf"))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

    for j in range(0, tl.cdiv(WH, ROWS)):
        kr = j * ROWS + n_row
        ky = y0 + kr
        kx = x0 + n_col
        in_win = col_ok & (kr < WH)
        in_img = in_win & (ky < H) & (kx < W) & (ky * W + kx < NTOK)
        # padded window tokens are keys too (SAM pads before attention); others are masked out
        kv_ok = in_win if PADDED else in_img
        kv_off = ky * s_ky + kx * s_kx
        k_ptr = k_base + kv_off[None, :]
        if EVEN_N:
            k0 = tl.load(k_ptr + d0[:, None] * s_kd)
        else:
            k0 = tl.load(k_ptr + d0[:, None] * s_kd, mask=in_img[None, :], other=0.0)
        if HAS_BIAS:
            s = tl.dot(q0, k0, bias_w, input_precision=PREC)
        else:
            s = tl.dot(q0, k0, input_precision=PREC)
        if D1 > 0:
            k1 = tl.load(k_ptr + d1[:, None] * s_kd, mask=in_img[None, :], other=0.0)
            s = tl.dot(q1, k1, s, input_precision=PREC)
        row_h = tl.zeros([BLOCK_M], tl.float32)  # rel_h of the block's key row (ROWS == 1)
        if HAS_BIAS:
            # rel_h: one value per query for each of the block's ROWS key-grid rows
            for r in tl.static_range(ROWS):
                kr_r = j * ROWS + r
                col = tl.load(rh_ptr + (h_first + h_step * kr_r) * s_hk, mask=m_ok & (kr_r < WH), other=0.0)
                col = col.to(tl.float32) * inv_scale
                if ROWS == 1:
                    row_h = col
                else:
                    s = s + tl.where(n_row[None, :] == r, col[:, None], 0.0)
        if HAS_PAD:
            if edge:
                s = tl.where(in_img[None, :], s, s + q_pk[:, None])
        if MASK_COLS:
            s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) + row_h)
        p = tl.math.exp2(s * qk_scale - (m_new - row_h)[:, None] * qk_scale)
        alpha = tl.math.exp2((m_i - m_new) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_PAD:
            p_pad = tl.zeros([BLOCK_M], tl.float32)
            if edge:
                p_pad = tl.sum(tl.where(in_img[None, :], 0.0, p), 1)
        p = p.to(V.dtype.element_ty)
        v_ptr = v_base + (ky * s_vy + kx * s_vx)[:, None]
        if EVEN_N:
            v0 = tl.load(v_ptr + d0[None, :] * s_vd)
        else:
            v0 = tl.load(v_ptr + d0[None, :] * s_vd, mask=in_img[:, None], other=0.0)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            v1 = tl.load(v_ptr + d1[None, :] * s_vd, mask=in_img[:, None], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
        if HAS_PAD:
            if edge:
                acc0 += p_pad[:, None] * pv0[None, :]
                if D1 > 0:
                    acc1 += p_pad[:, None] * pv1[None, :]
        m_i = m_new

    o_base = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + (qy * s_oy + qx * s_ox)[:, None]
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

    Hopper rows come from experiments/bench_attention.py (batch 8, bf16): first on an H100
    (experiments/results/attention_h100_b8.json), then for the encoder's grid form on an H200
    (attention_h200_b8_grid_session21.json: vit_h's head dim 80 runs best with 64-row blocks
    in global layers, 2.41 vs 2.72 ms, and 128-row blocks in windows, 0.53 vs 0.72 ms). The
    Ampere rows are the same tile shapes with shallower pipelines (less shared memory), not
    measured here; experiments/sass_attention.py shows how each config compiles.
    """
    wp = triton.next_power_of_2(grid_w)
    split = head_dim & (head_dim - 1) != 0  # e.g. 80 = 64 + 16: more registers per row
    if capability[0] >= 9:  # Hopper
        if n_tokens >= 1024:  # global layers: one 64-wide key-grid row per block
            return dict(BLOCK_M=64, ROWS=max(1, 64 // wp), num_warps=4, num_stages=3)
        return dict(BLOCK_M=128 if split else 64, ROWS=max(1, 32 // wp), num_warps=4, num_stages=3)
    if n_tokens >= 1024:  # Ampere and older
        return dict(BLOCK_M=64, ROWS=max(1, 64 // wp), num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, ROWS=max(1, 32 // wp), num_warps=4, num_stages=2)



def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(
            "The 'triton' attention backend needs CUDA tensors (or TRITON_INTERPRET=1 for the "
            "Triton interpreter on CPU); use attention='flex' or 'sdpa' on the CPU."
        )
    use_torch_ptxas()


def launch_constants(grid_hw, window_hw, d, cfg, has_rel, has_pad, ntok, table, ieee) -> dict:
    """The kernel's constexpr arguments for a ``grid_hw`` token grid attended in ``window_hw``
    windows (the whole grid for global attention) with launch config ``cfg``; also used by
    experiments/sass_attention.py to compile exactly what a launch compiles."""
    (H, W), (wh, ww) = grid_hw, window_hw
    d0, d1 = _split_head_dim(d)
    padded = triton.cdiv(H, wh) * wh != H or triton.cdiv(W, ww) * ww != W
    wp = triton.next_power_of_2(ww)
    even_n = wp == ww and wh % cfg["ROWS"] == 0 and not padded and ntok == H * W
    # the only keys to mask are the columns past WW (blocks of whole window rows; in a window
    # every real or padded key counts): rel_w's tile masks them once, not every key block
    cols_only = has_rel and wh % cfg["ROWS"] == 0 and ntok == H * W and (padded or (H, W) == (wh, ww))
    return dict(
        HAS_BIAS=has_rel, PADDED=padded, HAS_PAD=has_pad and padded,
        D0=d0, D1=d1, WH=wh, WW=ww, WP=wp, ROWS=cfg["ROWS"], BLOCK_M=cfg["BLOCK_M"],
        EVEN_M=(wh * ww) % cfg["BLOCK_M"] == 0 and not padded and ntok == H * W,
        EVEN_N=even_n, MASK_COLS=not even_n and not cols_only, TABLE=table, IEEE=ieee,
    )


def _run(q, k, v, o, strides, rel, pad, nh, d, grid_hw, window_hw, ntok, config, table=False):
    """Launch the kernel over ``B x windows x heads``. ``strides``: (b, head, y, x, last) of q, k,
    v, o, rel_h, rel_w; ``rel`` (rel_h, rel_w) or None, one value per key row / column, or with
    ``table`` one per relative offset (see :func:`_launch_grid`); ``pad`` (k, v) per-channel vectors of the
    tokens padded onto the windows, or None (zeros); ``grid_hw`` the token grid, ``window_hw``
    the attention window (the whole grid for global attention); ``ntok`` the real tokens."""
    (H, W), (wh, ww) = grid_hw, window_hw
    nwy, nwx = triton.cdiv(H, wh), triton.cdiv(W, ww)
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (9, 0)
    cfg = dict(config) if config is not None else kernel_config(wh * ww, ww, d, cap)
    rh, rw = rel if rel is not None else (q, q)  # unused without bias
    pk, pv = pad if pad is not None else (q, q)
    grid = (triton.cdiv(wh * ww, cfg["BLOCK_M"]), q.shape[0] * nwy * nwx * nh)
    _rel_pos_attn_fwd[grid](
        q, k, v, rh, rw, pk, pv, o, *[s for t in strides for s in t],
        nh, nwx, nwy * nwx, H, W, ntok, (d ** -0.5) * _LOG2E, d ** 0.5,
        **launch_constants(grid_hw, window_hw, d, cfg, rel is not None, pad is not None, ntok,
                           table, q.dtype == torch.float32),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o


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
    _check_device(q)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"triton attention: q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}.")
    B, nh, N, d = q.shape
    _split_head_dim(d)
    rel = None
    if rel_h is not None:
        if rel_w is None:
            raise ValueError("triton attention: rel_h and rel_w must be given together.")
        gh, gw = rel_h.shape[-1], rel_w.shape[-1]
        if gh * gw != N or rel_h.shape[:3] != (B, nh, N) or rel_w.shape[:3] != (B, nh, N):
            raise ValueError(
                f"triton attention: rel_h {tuple(rel_h.shape)} / rel_w {tuple(rel_w.shape)} do not "
                f"describe the {N} keys of q {tuple(q.shape)}."
            )
        rel = (rel_h, rel_w)
    else:
        gw = 64  # no bias: walk the keys as rows of 64 (the last one cut at N)
        gh = triton.cdiv(N, gw)
    o = torch.empty(B, nh, N, d, dtype=q.dtype, device=q.device)
    tensors = (q, k, v, o) + (rel if rel is not None else ())
    strides = [(t.stride(0), t.stride(1), gw * t.stride(2), t.stride(2), t.stride(3)) for t in tensors]
    strides += [strides[0]] * (6 - len(strides))
    return _run(q, k, v, o, strides, rel, None, nh, d, (gh, gw), (gh, gw), N, config)


def _launch_grid(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel: Optional[torch.Tensor] = None,
    pad: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Attention straight on the encoder's (B, H, W, 3C) ``qkv`` tensor -> (B, H, W, C).

    ``window_size`` 0: global attention over the H x W grid; otherwise within ws x ws windows,
    the grid padded up to whole windows with tokens whose q, k, v are ``pad`` (3C,) (zeros when
    None): what SAM's window partition of the block input followed by ``qkv`` gives, without
    copying any window. ``rel`` (B, heads, H, W, >= 2h - 1 + 2w - 1) for h x w windows: each
    query's q . table for every relative offset (``Attention._rel_logits``); the bias towards a
    key at window row k and column l is ``rel[..., r - k + h - 1] + rel[..., 2h - 1 + c - l + w - 1]``
    for a query at (r, c).
    """
    _check_device(qkv)
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    if C3 % 3 or C % num_heads:
        raise ValueError(f"triton attention: qkv width {C3} is not 3 x a multiple of {num_heads} heads.")
    d = C // num_heads
    wh, ww = (window_size, window_size) if window_size > 0 else (H, W)
    rels = None
    if rel is not None:
        if rel.shape[:4] != (B, num_heads, H, W) or rel.shape[4] < 2 * (wh + ww) - 2:
            raise ValueError(
                f"triton attention: rel {tuple(rel.shape)} does not match {(B, num_heads, H, W)} "
                f"tokens with {2 * (wh + ww) - 2} relative offsets of {wh}x{ww} windows."
            )
        rels = (rel, rel[..., 2 * wh - 1:])
    q, k, v = qkv[..., :C], qkv[..., C: 2 * C], qkv[..., 2 * C:]
    o = qkv.new_empty(B, H, W, C)
    s = qkv.stride()
    tok = (s[0], d * s[3], s[1], s[2], s[3])
    strides = [tok, tok, tok, (o.stride(0), d, o.stride(1), o.stride(2), 1)]
    strides += [rel.stride()] * 2 if rel is not None else [tok, tok]
    pads = None if pad is None else (pad[C: 2 * C].to(qkv.dtype), pad[2 * C:].to(qkv.dtype))
    return _run(q, k, v, o, strides, rels, pads, num_heads, d, (H, W), (wh, ww), H * W, config, table=True)


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
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("sam_fast::triton_grid_attention", mutates_args=())
def _triton_grid_op(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel: Optional[torch.Tensor],
    pad: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch_grid(qkv, num_heads, window_size, rel, pad)


@_triton_grid_op.register_fake
def _(qkv, num_heads, window_size, rel, pad):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3)


def triton_rel_pos_attention(q, k, v, rel_h=None, rel_w=None, config=None):
    """Fused rel-pos attention (see :func:`_launch`); a custom op, so ``torch.compile`` keeps it
    whole (fullgraph) and calls the kernel. ``config`` (benchmarks only) bypasses the op."""
    if config is not None:
        return _launch(q, k, v, rel_h, rel_w, config)
    return _triton_op(q, k, v, rel_h, rel_w)


def triton_grid_attention(qkv, num_heads, window_size, rel=None, pad=None, config=None):
    """Fused rel-pos attention on the encoder's token grid (see :func:`_launch_grid`), as a
    custom op; ``config`` (benchmarks only) bypasses the op."""
    if config is not None:
        return _launch_grid(qkv, num_heads, window_size, rel, pad, config)
    return _triton_grid_op(qkv, num_heads, window_size, rel, pad)


register_backend("triton", triton_rel_pos_attention, grid_fn=triton_grid_attention)
