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
activation is written once in bf16 and read back once. Likewise the layer norm in front of
each image-encoder block's ``attn.qkv`` and ``mlp.lin1`` is applied inside their quantization
(``norm1`` / ``norm2`` become ``nn.Identity``): the normalised rows are never written in bf16,
and the block's residual adds move into the same kernels (``Block.defer_residual``: the kernel
reads the two addends, writes their bf16 sum once and quantizes its layer norm). The kernel and
:class:`RowQuantLinear` also serve ``int8_triton`` (``int8_linear.py``).

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
def _store_q(x, inv, Q, offs, ok, QMAX: tl.constexpr, INT8: tl.constexpr, ROUND_GRID: tl.constexpr):
    """Store ``x * inv`` (per-row ``inv`` (BLOCK_M,)) at ``Q + offs``: float8 e4m3 or, with
    ``INT8``, int8, both rounded to nearest even (int8: adding and subtracting 1.5 * 2^23 leaves
    |q| <= 127 rounded to an integer, two adds; the cast then truncates nothing)."""
    q = tl.minimum(tl.maximum(x * inv[:, None], -QMAX), QMAX)
    if INT8:
        q = (q + 12582912.0) - 12582912.0
    elif ROUND_GRID:
        q = _round_to_e4m3(q)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=ok)


@triton.jit
def _layer_norm_tile(x, mean, rstd, cols, k, NW, NB):
    """``(x - mean) * rstd * weight + bias`` on a (BLOCK_M, tile) float32 tile at columns
    ``cols``; 0 past column ``k``, so the tile's amax sees real columns only."""
    w = tl.load(NW + cols, mask=cols < k, other=0.0).to(tl.float32)
    b = tl.load(NB + cols, mask=cols < k, other=0.0).to(tl.float32)
    return (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _load_sum(x_ptrs, R, Y, offs, ok, RES: tl.constexpr, ROUND_GRID: tl.constexpr):
    """A float32 tile of X (0 where masked); with ``RES`` of X + R, rounded to and stored in Y
    (with ``ROUND_GRID``, under the interpreter, whose bf16 cast truncates, a bf16 sum is first
    rounded to nearest even on float32 bits)."""
    x = tl.load(x_ptrs, mask=ok, other=0.0)
    if RES:
        total = x.to(tl.float32) + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        if ROUND_GRID and Y.dtype.element_ty == tl.bfloat16:
            b = total.to(tl.uint32, bitcast=True)
            total = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = total.to(Y.dtype.element_ty)
        tl.store(Y + offs, x, mask=ok)
    return x.to(tl.float32)


@triton.jit
def _quantize_rows_fwd(X, R, Y, Q, S, NW, NB, M, K, s_xm, s_xk, norm_eps, ACT: tl.constexpr, NORM: tl.constexpr,
                       RES: tl.constexpr, BLOCK_M: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                       QMAX: tl.constexpr, INT8: tl.constexpr, EPS: tl.constexpr, ROUND_GRID: tl.constexpr):
    """Program i: rows i * BLOCK_M ... of X, each held whole in registers as two power-of-two
    column tiles, [0, KA) and [KA, KA + KB) (KB = 0: one tile; masked past K). With ``RES``
    the rows are X + R (R contiguous), rounded to Y's dtype and stored in Y (contiguous). With
    ``NORM`` the rows are then layer-normalised (float32 statistics, weight NW, bias NB), then
    ``act`` applies; S = max(amax(|y|), EPS) / QMAX per row and Q = y / S in float8 e4m3,
    rounded to nearest even (by the cast, or first onto the e4m3 grid with ``ROUND_GRID``), or
    with ``INT8`` in int8. One read of X (and R), one write (and Y)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * s_xm
    q_rows = rows.to(tl.int64)[:, None] * K
    ca = tl.arange(0, KA)
    ok_a = row_ok[:, None] & (ca < K)[None, :]
    xa = _load_sum(x_rows + ca[None, :] * s_xk, R, Y, q_rows + ca[None, :], ok_a, RES, ROUND_GRID)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        ok_b = row_ok[:, None] & (cb < K)[None, :]
        xb = _load_sum(x_rows + cb[None, :] * s_xk, R, Y, q_rows + cb[None, :], ok_b, RES, ROUND_GRID)
    if NORM:  # masked columns load as 0: sums over real columns only
        total = tl.sum(xa, axis=1)
        if KB > 0:
            total += tl.sum(xb, axis=1)
        mean = total / K
        da = tl.where(ok_a, xa - mean[:, None], 0.0)
        ss = tl.sum(da * da, axis=1)
        if KB > 0:
            db = tl.where(ok_b, xb - mean[:, None], 0.0)
            ss += tl.sum(db * db, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + norm_eps)
        xa = _layer_norm_tile(xa, mean, rstd, ca, K, NW, NB)
        if KB > 0:
            xb = _layer_norm_tile(xb, mean, rstd, cb, K, NW, NB)
    xa = _act(xa, ACT)
    amax = tl.max(tl.where(ok_a, tl.abs(xa), 0.0), axis=1)
    if KB > 0:
        xb = _act(xb, ACT)
        amax = tl.maximum(amax, tl.max(tl.where(ok_b, tl.abs(xb), 0.0), axis=1))
    scale = tl.maximum(amax, EPS) / QMAX
    tl.store(S + rows, scale, mask=row_ok)
    inv = 1.0 / scale
    _store_q(xa, inv, Q, q_rows + ca[None, :], ok_a, QMAX, INT8, ROUND_GRID)
    if KB > 0:
        _store_q(xb, inv, Q, q_rows + cb[None, :], ok_b, QMAX, INT8, ROUND_GRID)


def _launch_config(k: int, row_elements: Optional[int] = None, num_warps: Optional[int] = None) -> dict:
    """The two column tiles of a row (KA = the largest power of two <= k, KB the rest rounded
    up to a power of two: no padding for SAM's widths, e.g. 1280 = 1024 + 256, 5120 = 4096 +
    1024), the rows per program and the warps. Few threads per row are fastest (H200 sweep,
    README): one row per program from 1024 columns on (narrower rows: up to 8192 elements),
    one warp per ~1536 elements (1280 wide: 1 warp, 5120: 2, 8 rows of 768: 4).
    ``row_elements`` (elements per program) and ``num_warps`` override, for benchmarks."""
    ka = _pow2_floor(k)
    kb = triton.next_power_of_2(k - ka) if k > ka else 0
    width = ka + kb
    if row_elements is None:
        row_elements = width if width >= 1024 else 8192
    block_m = _pow2_floor(max(1, min(16, row_elements // width)))
    if num_warps is None:
        num_warps = _pow2_floor(max(1, min(8, block_m * width // 1536)))
    return dict(KA=ka, KB=kb, BLOCK_M=block_m, num_warps=num_warps)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


QMAX = {FP8: FP8_MAX, torch.int8: 127.0}  # the quantized dtypes and their largest value


def _launch_quantize(x: torch.Tensor, act: str, norm_weight: Optional[torch.Tensor] = None,
                     norm_bias: Optional[torch.Tensor] = None, norm_eps: float = 0.0, dtype: torch.dtype = FP8,
                     residual: Optional[torch.Tensor] = None,
                     config: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (x.is_cuda or interpreting()):
        raise RuntimeError("the row quantization of fp8_triton / int8_triton needs CUDA tensors (or "
                           "TRITON_INTERPRET=1 for the Triton interpreter on CPU).")
    use_torch_ptxas()
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    y = torch.empty((m, k) if residual is not None else (0,), device=x.device, dtype=x.dtype)
    cfg = _launch_config(k, **(config or {}))
    norm = norm_weight is not None
    if m:
        _quantize_rows_fwd[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x, x if residual is None else residual, y, q, s, norm_weight if norm else x,
            norm_bias if norm else x, m, k, *x.stride(), float(norm_eps), ACT=act, NORM=norm,
            RES=residual is not None, QMAX=QMAX[dtype], INT8=dtype == torch.int8, EPS=_MIN_AMAX,
            ROUND_GRID=interpreting(), **cfg)
    return q, s, y


@torch.library.custom_op("sam_fast::quantize_rows", mutates_args=())
def _quantize_op(x: torch.Tensor, act: str, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                 norm_eps: float, dtype: torch.dtype,
                 residual: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_quantize(x, act, norm_weight, norm_bias, norm_eps, dtype, residual)


@_quantize_op.register_fake
def _(x, act, norm_weight, norm_bias, norm_eps, dtype, residual):
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32),
            x.new_empty(x.shape if residual is not None else (0,)))


def quantize_rows(x: torch.Tensor, act: str = "none", norm: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
                  config: Optional[dict] = None, dtype: torch.dtype = FP8, residual: Optional[torch.Tensor] = None):
    """(M, K) activations -> (``act(norm(x))`` / scale in ``dtype`` (M, K), float32 scales
    (M, 1)), one scale per row (amax / ``QMAX[dtype]``), rounded to nearest even. ``dtype``:
    float8 e4m3 or int8. ``norm``: None or a layer norm's ``(weight, bias, eps)``, each (K,),
    applied per row in float32 first; ``act``: "none" or "gelu" (tanh form). ``residual``: an
    (M, K) tensor added to ``x`` first (in float32, rounded to x's dtype); the sum is then
    returned too: (q, scales, x + residual). A custom op, so ``torch.compile`` keeps the kernel
    whole. ``config`` (benchmarks only: ``row_elements`` / ``num_warps`` of
    :func:`_launch_config`) bypasses the op."""
    if act not in ACTIVATIONS:
        raise ValueError(f"quantize_rows: act must be one of {ACTIVATIONS}, got {act!r}.")
    if dtype not in QMAX:
        raise ValueError(f"quantize_rows: dtype must be one of {tuple(QMAX)}, got {dtype}.")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows: expected a 2-D float tensor, got {tuple(x.shape)} {x.dtype}.")
    nw, nb, eps = norm if norm is not None else (None, None, 0.0)
    if norm is not None and not (nw.shape == nb.shape == (x.shape[1],)):
        raise ValueError(f"quantize_rows: the norm's weight and bias must both be ({x.shape[1]},), got "
                         f"{tuple(nw.shape)} and {tuple(nb.shape)}.")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"quantize_rows: residual must be {tuple(x.shape)} like x, got {tuple(residual.shape)}.")
        residual = residual.contiguous()
    if config is not None:
        q, s, y = _launch_quantize(x, act, nw, nb, eps, dtype, residual, config)
    else:
        q, s, y = _quantize_op(x, act, nw, nb, eps, dtype, residual)
    return (q, s) if residual is None else (q, s, y)


class RowQuantLinear(nn.Module):
    """``nn.Linear`` with a weight quantized to ``QDTYPE`` (one scale per output row) whose
    input is quantized per row at run time (:func:`quantize_rows`), after an optional layer
    norm (``input_norm``) and activation (``input_act``). Subclasses give the matmul.

    Buffers: ``weight`` (out, in) in ``QDTYPE``, ``weight_scale`` (1, out) float32, ``bias``
    (out,) in the model dtype (or None) and, with ``input_norm``, that ``nn.LayerNorm``'s
    ``norm_weight`` / ``norm_bias`` (in,); ``out_dtype`` is the dtype of the original weight.
    """

    QDTYPE: torch.dtype
    MODE: str  # the compress mode that makes these
    takes_residual = True  # forward(x, residual): see modeling.common.linear_residual
    # whether matmul adds ``residual`` in its epilogue (int8); if not (fp8), image-encoder blocks
    # leave their residual adds to the next quantization kernel (``Block.defer_residual``)
    residual_in_epilogue: bool

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias, out_dtype: torch.dtype,
                 input_act: str = "none", input_norm: Optional[nn.LayerNorm] = None) -> None:
        super().__init__()
        if input_act not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: input_act must be one of {ACTIVATIONS}, got {input_act!r}.")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype
        self.input_act = input_act
        self.norm_eps = 0.0
        self.register_buffer("norm_weight", None)
        self.register_buffer("norm_bias", None)
        if input_norm is not None:
            self.fuse_input_norm_(input_norm)

    def fuse_input_norm_(self, norm: nn.LayerNorm) -> None:
        """Apply ``norm`` (copied) to every input row inside the quantization."""
        if not fusable_norm(norm, self.in_features):
            raise ValueError(f"{type(self).__name__}: input_norm must be an nn.LayerNorm over the last "
                             f"{self.in_features} features with a weight and a bias, got {norm}.")
        self.norm_weight = norm.weight.detach().clone()
        self.norm_bias = norm.bias.detach().clone()
        self.norm_eps = float(norm.eps)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_act: str = "none",
                    input_norm: Optional[nn.LayerNorm] = None) -> "RowQuantLinear":
        """Quantize ``linear``'s weight per output row (scale = row amax / ``QMAX``)."""
        w = linear.weight.detach().float()
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"{cls.MODE} needs linear sizes that are multiples of 16 (tensor-core matmul), got "
                             f"{tuple(w.shape)}.")
        qmax = QMAX[cls.QDTYPE]
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / qmax
        q = (w / scale).clamp(-qmax, qmax)
        q = (q.round() if cls.QDTYPE == torch.int8 else q).to(cls.QDTYPE)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.t().contiguous(), bias, linear.weight.dtype, input_act, input_norm)

    def matmul(self, q: torch.Tensor, s: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """(M, in) quantized rows with (M, 1) scales -> (M, out) in ``out_dtype``, bias and the
        (M, out) ``residual`` (or None) added."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                input_residual: Optional[torch.Tensor] = None):
        """``linear(act(norm(x)))``, plus ``residual`` (same shape as the output) if given. With
        ``input_residual`` (same shape as ``x``) the input is ``x + input_residual``, added
        inside the quantization kernel, and the result is the pair (output, that sum)."""
        lead = x.shape[:-1]
        norm = None if self.norm_weight is None else (self.norm_weight, self.norm_bias, self.norm_eps)
        rows = x.reshape(-1, x.shape[-1])
        if input_residual is None:
            q, s = quantize_rows(rows, self.input_act, norm, dtype=self.QDTYPE)
        else:
            q, s, total = quantize_rows(rows, self.input_act, norm, dtype=self.QDTYPE,
                                        residual=input_residual.reshape(rows.shape))
        res = None if residual is None else residual.reshape(-1, self.out_features)
        y = self.matmul(q, s, res).reshape(*lead, self.out_features)
        return y if input_residual is None else (y, total.reshape(x.shape))

    def extra_repr(self) -> str:
        norm = "" if self.norm_weight is None else f", input_norm=LayerNorm(eps={self.norm_eps:g})"
        return f"in_features={self.in_features}, out_features={self.out_features}, input_act={self.input_act}{norm}"


class Fp8Linear(RowQuantLinear):
    """:class:`RowQuantLinear` in float8 e4m3, multiplied by ``torch._scaled_mm``."""

    QDTYPE = FP8
    MODE = "fp8_triton"
    residual_in_epilogue = False

    def matmul(self, q: torch.Tensor, s: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        # fast accumulation, as torchao's fp8 linears use for inference
        y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=self.out_dtype, use_fast_accum=True)
        return y if residual is None else residual + y  # _scaled_mm has no residual input


def fusable_norm(norm: nn.Module, features: int) -> bool:
    """Whether ``norm`` is an ``nn.LayerNorm`` over the last ``features`` features with a weight
    and a bias, i.e. one :func:`quantize_rows` can apply inside the quantization."""
    return (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (features,)
            and norm.weight is not None and norm.bias is not None)


# (linear, the norm that feeds it and nothing else) inside an image-encoder Block
_BLOCK_NORMS = (("attn.qkv", "norm1"), ("mlp.lin1", "norm2"))


def to_row_quant_linears_(encoder: nn.Module, filter_fn, cls=Fp8Linear) -> int:
    """Replace, in place, the ``nn.Linear`` modules of ``encoder`` selected by
    ``filter_fn(module, name)`` with ``cls`` (a :class:`RowQuantLinear`), moving into the
    quantization what only feeds them: where a block's ``mlp.lin2`` is replaced and its
    activation is ``nn.GELU()``, the GELU (``mlp.act`` becomes ``nn.Identity``); where an
    image-encoder block's ``attn.qkv`` / ``mlp.lin1`` is replaced, the layer norm before it
    (``norm1`` / ``norm2`` become ``nn.Identity``), and, where both moved and ``cls`` adds no
    residual in its matmul, the block's residual adds (``Block.defer_residual``). Returns how
    many linears were replaced."""
    from .modeling.image_encoder import Block

    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name)
        act = "none"
        if child == "lin2" and type(getattr(parent, "act", None)) is nn.GELU and parent.act.approximate == "none":
            act = "gelu"
            parent.act = nn.Identity()
        setattr(parent, child, cls.from_linear(getattr(parent, child), input_act=act))
    for blk in (m for m in encoder.modules() if type(m) is Block):
        for lin_name, norm_name in _BLOCK_NORMS:
            lin, norm = blk.get_submodule(lin_name), getattr(blk, norm_name)
            if type(lin) is cls and lin.input_act == "none" and lin.norm_weight is None \
                    and fusable_norm(norm, lin.in_features):
                lin.fuse_input_norm_(norm)
                setattr(blk, norm_name, nn.Identity())
        # both norms moved in and no epilogue add: the block's adds go into those kernels
        blk.defer_residual = not cls.residual_in_epilogue and all(
            type(blk.get_submodule(lin)) is cls and type(getattr(blk, norm)) is nn.Identity for lin, norm in _BLOCK_NORMS)
    return len(names)
