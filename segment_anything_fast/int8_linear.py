"""Compress mode ``"int8_triton"``: int8 dynamic quantization with our own kernels.

The arithmetic of torchao's ``int8_dynamic``: int8 weights with one scale per output row,
activations quantized at run time to int8 with one scale per row (token), an int8 x int8 ->
int32 matmul, then ``acc * row_scale * column_scale + bias``. On Hopper torchao's path runs
slower than bf16 (README: 0.72-0.83x on vit_h): ``torch._int_mm`` writes the int32 product
(4 bytes per element) and a second pass scales it, and the activation quantization fuses into
slow inductor kernels. Here the activations go through the same row kernel as ``fp8_triton``
(``fp8_linear.quantize_rows``: layer norm / GELU fused, one read, one int8 write) and the
matmul is one Triton kernel (:func:`int8_matmul`) whose epilogue applies both scales, the
bias and the block's residual add to the int32 accumulator in registers and writes bf16 once.

Tile configurations are chosen by shape (:func:`_matmul_config`), not autotuned; on Hopper
the operand tiles are read through TMA descriptors. Needs CUDA (int8 tensor cores: compute
capability >= 8.0) or ``TRITON_INTERPRET=1`` on CPU tensors.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8_linear import RowQuantLinear
from .triton_env import interpreting, use_torch_ptxas


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), ordered in groups of GROUP_M row tiles so a
    group's weight tiles stay in L2."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def _epilogue(acc, pid_m, pid_n, SA, SW, BIAS, R, C, M, N, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """C tile = acc * SA (rows) * SW (columns) + BIAS + R, rounded once to C's dtype."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    sa = tl.load(SA + rm, mask=m_ok, other=0.0)
    sw = tl.load(SW + rn, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        out += tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(C + offs, out.to(C.dtype.element_ty), mask=ok)


@triton.jit
def _int8_matmul_fwd(A, W, SA, SW, BIAS, R, C, M, N, K, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr):
    """C (M, N) = (A (M, K) int8 @ W (N, K) int8 ^T) * SA (M,) * SW (N,) + BIAS (N,) + R (M, N):
    an int32 accumulator per (BLOCK_M, BLOCK_N) tile, operands loaded through pointers. A, W,
    R and C contiguous."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    a_ptr = A + rm.to(tl.int64)[:, None] * K + rk[None, :]
    w_ptr = W + rn.to(tl.int64)[None, :] * K + rk[:, None]  # a (BLOCK_K, BLOCK_N) tile of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptr, mask=m_ok[:, None], other=0)
            w = tl.load(w_ptr, mask=n_ok[None, :], other=0)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptr, mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    _epilogue(acc, pid_m, pid_n, SA, SW, BIAS, R, C, M, N, HAS_BIAS, HAS_RES, BLOCK_M, BLOCK_N)


@triton.jit
def _int8_matmul_tma_fwd(A_desc, W_desc, SA, SW, BIAS, R, C, M, N, K, HAS_BIAS: tl.constexpr,
                         HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The same product with A and W tiles read through TMA tensor descriptors (Hopper's copy
    engine; out-of-range rows and columns read as 0)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = A_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = W_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    _epilogue(acc, pid_m, pid_n, SA, SW, BIAS, R, C, M, N, HAS_BIAS, HAS_RES, BLOCK_M, BLOCK_N)


def _matmul_config(m: int, n: int, k: int, tma: bool) -> dict:
    """Tiles by shape, from an H200 sweep at SAM's linear shapes (README): 128 x 128 x 64 with
    4 warps and 5 stages is fastest or within 3% everywhere except the long reductions (the
    MLP's lin2, K >= 3072), where 128 x 256 x 128 tiles with 8 warps win by up to 14%. ``tma``:
    read the operand tiles through TMA descriptors (Hopper) instead of pointers."""
    if k >= 3072 and n % 256 == 0:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, TMA=tma)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5, TMA=tma)


def _tma_possible(a: torch.Tensor, k: int) -> bool:
    """TMA needs Hopper or newer (or the interpreter) and 16-byte aligned rows (int8: K % 16)."""
    hopper = interpreting() or (a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0))
    return hopper and k % 16 == 0


def _launch_matmul(a, s_a, w, s_w, bias, residual, out_dtype, config: Optional[dict] = None) -> torch.Tensor:
    if not (a.is_cuda or interpreting()):
        raise RuntimeError("int8_triton's matmul needs CUDA tensors (or TRITON_INTERPRET=1 for the Triton "
                           "interpreter on CPU).")
    use_torch_ptxas()
    m, k = a.shape
    n = w.shape[0]
    c = torch.empty((m, n), device=a.device, dtype=out_dtype)
    cfg = dict(_matmul_config(m, n, k, _tma_possible(a, k)), **(config or {}))
    tma = cfg.pop("TMA")
    if interpreting():
        cfg.pop("num_stages")
    if m:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        rest = (s_a, s_w, a if bias is None else bias, c if residual is None else residual, c, m, n, k)
        flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, **cfg)
        if tma:
            _int8_matmul_tma_fwd[grid](TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                                       TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]]),
                                       *rest, **flags)
        else:
            _int8_matmul_fwd[grid](a, w, *rest, EVEN_K=k % cfg["BLOCK_K"] == 0, **flags)
    return c


@torch.library.custom_op("sam_fast::int8_matmul", mutates_args=())
def _matmul_op(a: torch.Tensor, s_a: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, bias: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return _launch_matmul(a, s_a, w, s_w, bias, residual, out_dtype)


@_matmul_op.register_fake
def _(a, s_a, w, s_w, bias, residual, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def int8_matmul(a: torch.Tensor, s_a: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                residual: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``(a @ w.T) * s_a * s_w + bias + residual`` in ``out_dtype``, rounded once: ``a`` (M, K)
    and ``w`` (N, K) int8, ``s_a`` (M, 1) and ``s_w`` (1, N) float32 scales, ``bias`` (N,) and
    ``residual`` (M, N) or None. A custom op, so ``torch.compile`` keeps the kernel whole;
    ``config`` (benchmarks only: tile sizes, warps, stages) overrides :func:`_matmul_config`
    and bypasses the op."""
    if a.dtype != torch.int8 or w.dtype != torch.int8 or a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"int8_matmul: expected int8 (M, K) and (N, K) matrices, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(w.shape)} {w.dtype}.")
    if s_a.shape != (a.shape[0], 1) or s_w.shape != (1, w.shape[0]):
        raise ValueError(f"int8_matmul: scales must be ({a.shape[0]}, 1) and (1, {w.shape[0]}), got "
                         f"{tuple(s_a.shape)} and {tuple(s_w.shape)}.")
    if residual is not None and residual.shape != (a.shape[0], w.shape[0]):
        raise ValueError(f"int8_matmul: residual must be ({a.shape[0]}, {w.shape[0]}), got {tuple(residual.shape)}.")
    a, w = a.contiguous(), w.contiguous()
    residual = None if residual is None else residual.contiguous()
    if config is not None:
        return _launch_matmul(a, s_a, w, s_w, bias, residual, out_dtype, config)
    return _matmul_op(a, s_a, w, s_w, bias, residual, out_dtype)


class Int8Linear(RowQuantLinear):
    """:class:`~segment_anything_fast.fp8_linear.RowQuantLinear` in int8, multiplied by
    :func:`int8_matmul` (scales, bias and residual applied in the matmul's epilogue)."""

    QDTYPE = torch.int8
    MODE = "int8_triton"
    residual_in_epilogue = True

    def matmul(self, q: torch.Tensor, s: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        return int8_matmul(q, s, self.weight, self.weight_scale, self.bias, self.out_dtype, residual)
