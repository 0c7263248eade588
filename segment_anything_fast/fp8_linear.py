"""Compress mode ``"fp8_triton"``: fp8 linears whose activations are quantized by our own kernel.

The same arithmetic as mode ``"fp8"`` (torchao): float8 e4m3 weights with one scale per output
row, activations quantized at run time with one scale per row (token), ``torch._scaled_mm``
with the bias, bf16 out. What differs is who quantizes the activations. Under torch.compile
torchao's per-row amax + cast fuses with its producer into inductor kernels that run far below
memory speed: on vit_h (batch 8, H200) the one fused with the MLP's GELU took 23 ms of a 102 ms
encoder for 0.5 GB of traffic, the ones fused with the layer norms ~11 ms (README). Here one
Triton kernel (:func:`quantize_rows`) reads each row once (whole rows in registers) and writes
fp8 once, and the MLP's GELU is applied inside the quantization of ``lin2``'s input (in its
tanh form, see :func:`_act`; ``mlp.act`` becomes ``nn.Identity``), so the 4x-wide hidden
activation is written once in bf16 and read back once.

Weights are quantized once by :meth:`Fp8Linear.from_linear` (the state dict then holds the fp8
``weight``, a ``weight_scale`` and the ``bias``: load checkpoints before compressing). Needs CUDA
compute capability >= 8.9 (fp8 matmuls) and a bf16 model; on CPU tensors it runs under
``TRITON_INTERPRET=1`` (tests), with PyTorch's CPU ``_scaled_mm``.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn

from .triton_env import interpreting, use_torch_ptxas

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale (its values stay 0), never 0/0
ACTIVATIONS = ("none", "gelu")


@triton.jit
def _act(x, ACT: tl.constexpr):
    """GELU in its tanh form, 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x +
    0.044715 x^3): a few instructions where erf takes dozens; at most ~5e-4 from nn.GELU's erf
    form, far below one fp8 step (the same approximation as cuBLASLt's GELU epilogue)."""
    if ACT == "gelu":
        u = x * (0.7978845608028654 + 0.035677408136300125 * x * x)
        x = x / (1.0 + tl.math.exp2(u * -2.8853900817779268))  # exp(-2u) = 2^(-2u log2(e))
    return x


@triton.jit
def _round_to_e4m3(x):
    """float32 ``x`` (within +-448) rounded to nearest even on float8 e4m3's grid: 3 mantissa
    bits, and steps of 2^-9 among its subnormals (|x| < 2^-6), so the cast that follows is
    exact. Used under the Triton interpreter, whose cast carries a mantissa overflow into the
    wrong exponent; on the GPU the hardware cast rounds to nearest even itself."""
    b = x.to(tl.uint32, bitcast=True)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 1.5 * 2^23: round to even
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _to_fp8(x, inv, Q, offs, ok, FMAX: tl.constexpr, ROUND_GRID: tl.constexpr):
    """Store ``x * inv`` (per-row ``inv`` (BLOCK_M,)) as float8 e4m3 at ``Q + offs``."""
    q = tl.minimum(tl.maximum(x * inv[:, None], -FMAX), FMAX)
    if ROUND_GRID:
        q = _round_to_e4m3(q)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=ok)


@triton.jit
def _quantize_rows_fwd(X, Q, S, M, K, s_xm, s_xk, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                       KA: tl.constexpr, KB: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr,
                       ROUND_GRID: tl.constexpr):
    """Program i: rows i * BLOCK_M ... of X, each held whole in registers as two power-of-two
    column tiles, [0, KA) and [KA, KA + KB) (KB = 0: one tile; masked past K): S = max(amax(
    |act(x)|), EPS) / FMAX per row and Q = act(x) / S in float8 e4m3, rounded to nearest even
    (by the cast, or first onto the e4m3 grid with ``ROUND_GRID``). One read of X, one write."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * s_xm
    q_rows = rows.to(tl.int64)[:, None] * K
    ca = tl.arange(0, KA)
    ok_a = row_ok[:, None] & (ca < K)[None, :]
    xa = _act(tl.load(x_rows + ca[None, :] * s_xk, mask=ok_a, other=0.0).to(tl.float32), ACT)
    amax = tl.max(tl.abs(xa), axis=1)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        ok_b = row_ok[:, None] & (cb < K)[None, :]
        xb = _act(tl.load(x_rows + cb[None, :] * s_xk, mask=ok_b, other=0.0).to(tl.float32), ACT)
        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=1))
    scale = tl.maximum(amax, EPS) / FMAX
    tl.store(S + rows, scale, mask=row_ok)
    inv = 1.0 / scale
    _to_fp8(xa, inv, Q, q_rows + ca[None, :], ok_a, FMAX, ROUND_GRID)
    if KB > 0:
        _to_fp8(xb, inv, Q, q_rows + cb[None, :], ok_b, FMAX, ROUND_GRID)


_ROW_ELEMENTS = 4096  # elements per program: whole rows, as many as fit (at least one)


def _launch_config(k: int, row_elements: int = _ROW_ELEMENTS) -> dict:
    """The two column tiles of a row (KA = the largest power of two <= k, KB the rest rounded
    up to a power of two: no padding for SAM's widths, e.g. 1280 = 1024 + 256, 5120 = 4096 +
    1024), the rows per program (a power of two, about ``row_elements`` elements) and warps."""
    ka = 1 << (k.bit_length() - 1)
    kb = triton.next_power_of_2(k - ka) if k > ka else 0
    rows = max(1, min(16, row_elements // (ka + kb)))
    block_m = 1 << (rows.bit_length() - 1)
    return dict(KA=ka, KB=kb, BLOCK_M=block_m, num_warps=8 if block_m * (ka + kb) >= 4096 else 4)


def _launch_quantize(x: torch.Tensor, act: str, row_elements: int = _ROW_ELEMENTS) -> Tuple[torch.Tensor, torch.Tensor]:
    if not (x.is_cuda or interpreting()):
        raise RuntimeError("fp8_triton's activation quantization needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "for the Triton interpreter on CPU).")
    use_torch_ptxas()
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=FP8)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    cfg = _launch_config(k, row_elements)
    if m:
        _quantize_rows_fwd[(triton.cdiv(m, cfg["BLOCK_M"]),)](x, q, s, m, k, *x.stride(), ACT=act,
                                                             FMAX=FP8_MAX, EPS=_MIN_AMAX,
                                                             ROUND_GRID=interpreting(), **cfg)
    return q, s


@torch.library.custom_op("sam_fast::fp8_quantize_rows", mutates_args=())
def _quantize_op(x: torch.Tensor, act: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_quantize(x, act)


@_quantize_op.register_fake
def _(x, act):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def quantize_rows(x: torch.Tensor, act: str = "none", row_elements: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (``act(x)`` / scale in float8 e4m3 (M, K), float32 scales (M, 1)),
    one scale per row (amax / FP8_MAX). ``act``: "none" or "gelu" (tanh form). A custom op, so
    ``torch.compile`` keeps the kernel whole. ``row_elements`` (benchmarks only) overrides the
    tile size of :func:`_launch_config` and bypasses the op."""
    if act not in ACTIVATIONS:
        raise ValueError(f"quantize_rows: act must be one of {ACTIVATIONS}, got {act!r}.")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows: expected a 2-D float tensor, got {tuple(x.shape)} {x.dtype}.")
    if row_elements is not None:
        return _launch_quantize(x, act, row_elements)
    return _quantize_op(x, act)


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an fp8 e4m3 weight (one scale per output row) whose input is
    quantized per row at run time (:func:`quantize_rows`), ``input_act`` applied first.

    Buffers: ``weight`` (out, in) float8 e4m3, ``weight_scale`` (1, out) float32 and ``bias``
    (out,) in the model dtype (or None); ``out_dtype`` is the dtype of the original weight.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias, out_dtype: torch.dtype,
                 input_act: str = "none") -> None:
        super().__init__()
        if input_act not in ACTIVATIONS:
            raise ValueError(f"Fp8Linear: input_act must be one of {ACTIVATIONS}, got {input_act!r}.")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype
        self.input_act = input_act

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_act: str = "none") -> "Fp8Linear":
        """Quantize ``linear``'s weight per output row (scale = row amax / 448)."""
        w = linear.weight.detach().float()
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"fp8_triton needs linear sizes that are multiples of 16 (fp8 matmul), got "
                             f"{tuple(w.shape)}.")
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.t().contiguous(), bias, linear.weight.dtype, input_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, s = quantize_rows(x.reshape(-1, x.shape[-1]), self.input_act)
        # fast accumulation, as torchao's fp8 linears use for inference
        y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=self.out_dtype, use_fast_accum=True)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_act={self.input_act}"


def to_fp8_linears_(encoder: nn.Module, filter_fn) -> int:
    """Replace, in place, the ``nn.Linear`` modules of ``encoder`` selected by
    ``filter_fn(module, name)`` with :class:`Fp8Linear`. Where a block's ``mlp.lin2`` is replaced
    and its activation is ``nn.GELU()``, the GELU moves into lin2's input quantization
    (``mlp.act`` becomes ``nn.Identity``). Returns how many linears were replaced."""
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name)
        act = "none"
        if child == "lin2" and type(getattr(parent, "act", None)) is nn.GELU and parent.act.approximate == "none":
            act = "gelu"
            parent.act = nn.Identity()
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child), input_act=act))
    return len(names)
