"""Mask-decoder attention as one Triton kernel (``decoder_attention="triton"``).

The two-way transformer's attentions are lopsided: a handful of prompt tokens (7 for one point)
against the 64x64 = 4096 image tokens of *every prompt* (token-to-image), the reverse
(image-to-token), and tokens against tokens. Head dims are small (16 for the cross attentions of
every SAM size, 32 for the token self-attention). ``scaled_dot_product_attention`` pads the short
side to its 64-128 row tiles, needs the heads split into a (B, heads, N, d) copy, and the image
side, shared by all prompts in the first layer, expanded to one copy per prompt.

Here one program takes ``BLOCK_M`` queries of one (prompt, head) and walks the keys in blocks of
``BLOCK_N`` with an online softmax; tiles are sized to the short side (16 rows), the heads are
read and written in place in the projections' (B, N, heads * d) layout, and a batch of 1 on either
side is broadcast by a zero batch stride (read once per head from L2, never copied). A side may
also hold one row per *image* with an index giving each prompt's image (prompts of several
images in one call: the image side of layer 0 is then projected once per image). Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_env import interpreting, use_torch_ptxas

_LOG2E = 1.4426950408889634


@triton.jit
def _decoder_attn_fwd(
    Q, K, V, O, QI, KI,
    s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on,
    NH, M, N, qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_QI: tl.constexpr,
    HAS_KI: tl.constexpr,
):
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    # the q / k-v rows of output batch b: its own, or the row its index names
    if HAS_QI:
        bq = tl.load(QI + b).to(tl.int64)
    else:
        bq = b
    if HAS_KI:
        bk = tl.load(KI + b).to(tl.int64)
    else:
        bk = b
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    d = h * D + tl.arange(0, D)
    q = tl.load(Q + bq * s_qb + offs_m[:, None] * s_qn + d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = tl.load(K + bk * s_kb + offs_n[None, :] * s_kn + d[:, None], mask=n_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + bk * s_vb + offs_n[:, None] * s_vn + d[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + offs_m[:, None] * s_on + d[None, :], out.to(O.dtype.element_ty), mask=m_ok[:, None])


def kernel_config(m: int, n: int, head_dim: int) -> dict:
    """Tiles sized to the short side: BLOCK_M, BLOCK_N, num_warps, num_stages."""
    short = lambda x: max(16, triton.next_power_of_2(x))  # noqa: E731
    if m <= 64:  # few queries (tokens) against many keys (image): walk the keys
        return dict(BLOCK_M=short(m), BLOCK_N=128 if n > 64 else short(n), num_warps=4, num_stages=3)
    # many queries (image) against few keys (tokens): one key block when the keys are few
    return dict(BLOCK_M=128, BLOCK_N=short(n) if n <= 64 else 64, num_warps=4, num_stages=2)



def _batch_stride(x: torch.Tensor, batch: int, index) -> int:
    return 0 if x.shape[0] == 1 and (batch > 1 or index is not None) else x.stride(0)


def _rows(x: torch.Tensor, index) -> int:
    """Batch rows a side contributes: its index's length, else its batch size."""
    return x.shape[0] if index is None else index.shape[0]


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
            q_index=None, kv_index=None) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(d)) v_h for every head h of the projections q (Bq, M, C),
    k and v (Bk, N, C) (C = heads * d); a batch of 1 broadcasts; ``q_index`` / ``kv_index``
    (B,) pick the side's row of each output batch. Returns (B, M, C)."""
    if not (q.is_cuda or interpreting()):
        raise RuntimeError(
            "decoder_attention='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the Triton "
            "interpreter on CPU); use decoder_attention='sdpa' on the CPU."
        )
    check_shapes(q, k, v, num_heads, q_index, kv_index)
    use_torch_ptxas()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_index, kv_index = (None if i is None else i.contiguous() for i in (q_index, kv_index))
    B = max(_rows(q, q_index), _rows(k, kv_index))
    M, C = q.shape[1], q.shape[2]
    N = k.shape[1]
    d = C // num_heads
    cfg = kernel_config(M, N, d)
    o = torch.empty((B, M, C), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), B * num_heads)
    _decoder_attn_fwd[grid](
        q, k, v, o,
        q if q_index is None else q_index, k if kv_index is None else kv_index,
        _batch_stride(q, B, q_index), q.stride(1), _batch_stride(k, B, kv_index), k.stride(1),
        _batch_stride(v, B, kv_index), v.stride(1), o.stride(0), o.stride(1),
        num_heads, M, N, (d ** -0.5) * _LOG2E,
        D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], IEEE=q.dtype == torch.float32,
        HAS_QI=q_index is not None, HAS_KI=kv_index is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                 q_index=None, kv_index=None) -> None:
    """Raise a ValueError unless q (Bq, M, C), k/v (Bk, N, C) and the optional (B,) integer
    row indices suit the kernel."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"decoder attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, M, C), (B, N, C), (B, N, C).")
    for name, idx in (("q_index", q_index), ("kv_index", kv_index)):
        if idx is not None and (idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64)
                                or idx.device != q.device):
            raise ValueError(f"decoder attention: {name} must be a 1-D int32/int64 tensor on "
                             f"{q.device}, got {tuple(idx.shape)} {idx.dtype} on {idx.device}.")
    bq, bk = _rows(q, q_index), _rows(k, kv_index)
    if bq != bk and 1 not in (bq, bk):
        raise ValueError(f"decoder attention: batch sizes {bq} and {bk} differ (one may be 1).")
    d = q.shape[2] // num_heads
    if q.shape[2] % num_heads or d < 16 or d & (d - 1):
        raise ValueError(f"decoder_attention='triton' needs a power-of-two head dim >= 16, got "
                         f"{q.shape[2]} channels / {num_heads} heads; use decoder_attention='sdpa'.")


@torch.library.custom_op("sam_fast::decoder_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
        q_index: Optional[torch.Tensor] = None, kv_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch(q, k, v, num_heads, q_index, kv_index)


@_op.register_fake
def _(q, k, v, num_heads, q_index=None, kv_index=None):
    return q.new_empty((max(_rows(q, q_index), _rows(k, kv_index)), q.shape[1], q.shape[2]))


def decoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                      q_index: Optional[torch.Tensor] = None,
                      kv_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention of projected q (Bq, M, C) over k, v (Bk, N, C), heads not yet split;
    a custom op, so ``torch.compile`` (fullgraph) keeps the kernel whole. ``q_index`` /
    ``kv_index`` (B,): output batch b reads row ``index[b]`` of that side (e.g. one row per
    image, an index per prompt; values must be valid rows). Returns (B, M, C)."""
    return _op(q, k, v, num_heads, q_index, kv_index)
