"""Compression of the SAM image encoder: torchao int8 / fp8 quantization and 2:4 sparsity.

``compress(sam_or_image_encoder, mode, linears=ENCODER_LINEARS)`` rewrites, in place, the
linear layers of the image encoder's transformer blocks: ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.mlp.lin1`` and ``blocks.N.mlp.lin2``. They hold nearly all
of the encoder's FLOPs.

``linears`` selects which of these kinds (``ENCODER_LINEARS``: "qkv", "proj", "lin1", "lin2")
are compressed, in every block; the others stay as they are (model dtype, dense). Why leave
one out: with ``fp8`` the input of ``lin2`` (the 4x-wide MLP hidden activation) needs a per-row
amax and an fp8 cast at run time; on vit_h (H200 profile, README) that spends again most of
what the fp8 GEMMs save, so ``linears=("qkv", "proj", "lin1")`` keeps ``lin2`` in bf16 to
measure the trade.

Left in full precision, on purpose:
  * ``patch_embed`` (a 16x16 stride-16 conv) and the ``neck`` convs: convolutions, a few
    percent of the FLOPs, and they touch the raw pixels / the final embedding;
  * the attention matmuls and relative-position tables (not weights of a linear layer);
  * the prompt encoder and mask decoder: tiny, run once per prompt on variable shapes, and
    the masks are most sensitive to their precision.
  * the block linears that ``linears`` leaves out (see above).

Modes (``COMPRESS_MODES``):
  none              unchanged (the baseline).
  int8_dynamic      int8 weights (per output channel) x int8 activations quantized per token
                    at run time (torchao ``Int8DynamicActivationInt8WeightConfig``). CPU or GPU.
  int8_weight_only  int8 weights, activations kept in the model dtype (``Int8WeightOnlyConfig``).
  fp8               float8 e4m3 weights and dynamically quantized activations, per-row scales
                    (``Float8DynamicActivationFloat8WeightConfig``); CUDA capability >= 8.9,
                    bf16 model. Needs rows that are not all zero (torchao's per-row scale of a
                    zero row is 0 -> NaN): windowed blocks therefore project only real tokens,
                    never the zero padding of the windows (``image_encoder.Block``).
  sparse_2_4        our 2:4 pruning (magnitude, or Wanda with ``calibration``; see
                    ``sparsity.py``), then ``torch.sparse.to_sparse_semi_structured``;
                    CUDA capability >= 8.0, bf16/fp16 model.
  fp8_triton        the arithmetic of ``fp8`` (per-row scales, ``torch._scaled_mm``), but the
                    weights quantized by us and the activations by our Triton kernel, with
                    the MLP's GELU fused into the quantization of ``lin2``'s input
                    (``fp8_linear.py``: why). The layer norms in front of qkv / lin1 and
                    the blocks' residual adds (``Block.defer_residual``) happen inside the same
                    kernel. CUDA capability >= 8.9, bf16 model; no torchao.
  int8_triton       the arithmetic of ``int8_dynamic`` (per-row int8 weights and activations),
                    activations quantized by the same kernel as ``fp8_triton`` (norms and GELU
                    fused) and the matmul by our Triton kernel with the scales, bias and the
                    block's residual add in its epilogue (``int8_linear.py``). CUDA capability
                    >= 8.0, bf16 model; no torchao.
  fp8_sparse_2_4    2:4 pruning, then fp8 per-row with torchao's CUTLASS 2:4 fp8 kernel;
                    CUDA capability >= 9.0 (Hopper), bf16 model. The compressed linears become
                    ``FlatInputLinear`` (same parameters) to feed that kernel 2-D inputs.
int8 activations combined with 2:4 sparsity is not offered: torchao 0.18 removed that layout
(version 1 of ``Int8DynamicActivationInt8WeightConfig``).

torchao is imported only when a quantizing mode is asked for. torchao's own global inductor
tuning (``set_inductor_config``) is switched off; ``InductorSettings`` is the explicit knob.
"""
import functools
import importlib
import re
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .sparsity import input_channel_norms, prune_linears_2_4_, sparse_gpu_problem, to_semi_structured_
from .triton_env import interpreting

COMPRESS_MODES = ("none", "int8_dynamic", "int8_weight_only", "fp8", "sparse_2_4", "fp8_sparse_2_4", "fp8_triton",
                  "int8_triton")
_ROW_QUANT_MODES = ("fp8_triton", "int8_triton")  # our RowQuantLinear modules (GELU / norms moved in)
_TORCHAO_MODES = ("int8_dynamic", "int8_weight_only", "fp8", "fp8_sparse_2_4")
_SPARSE_MODES = ("sparse_2_4", "fp8_sparse_2_4")

# the kinds of block linears, by leaf name, and the submodule of a block holding each
ENCODER_LINEARS = ("qkv", "proj", "lin1", "lin2")
_LINEAR_PARENT = {"qkv": "attn", "proj": "attn", "lin1": "mlp", "lin2": "mlp"}


def check_mode(mode) -> str:
    """Return ``mode`` if it is one of ``COMPRESS_MODES``, else raise a ValueError."""
    if not isinstance(mode, str) or mode not in COMPRESS_MODES:
        raise ValueError(f"unknown compress mode {mode!r}; choose one of {', '.join(COMPRESS_MODES)}")
    return mode


def check_linears(linears: Sequence[str], arg: str = "linears") -> Tuple[str, ...]:
    """Validate a selection of ``ENCODER_LINEARS`` (a non-empty tuple or list of unique names)
    and return it in ``ENCODER_LINEARS`` order; ``arg`` names the argument in the ValueError."""
    valid = ", ".join(ENCODER_LINEARS)
    if not isinstance(linears, (tuple, list)) or not linears:
        raise ValueError(f"{arg} must be a non-empty tuple or list of names from {valid}, got {linears!r}")
    bad = [n for n in linears if not isinstance(n, str) or n not in ENCODER_LINEARS]
    if bad:
        raise ValueError(f"{arg}: unknown encoder linear(s) {', '.join(map(repr, bad))}; valid names: {valid}")
    repeated = [n for n in ENCODER_LINEARS if list(linears).count(n) > 1]
    if repeated:
        raise ValueError(f"{arg} names {', '.join(map(repr, repeated))} more than once; valid names: {valid}")
    return tuple(n for n in ENCODER_LINEARS if n in linears)


@functools.lru_cache(maxsize=None)
def _linear_pattern(linears: Tuple[str, ...]) -> "re.Pattern":
    kinds = "|".join(f"{_LINEAR_PARENT[n]}\\.{n}" for n in linears)
    return re.compile(rf"blocks\.\d+\.(?:{kinds})")


ENCODER_LINEAR_PATTERN = _linear_pattern(ENCODER_LINEARS)


def encoder_linear_filter(module: nn.Module, fqn: str, linears: Sequence[str] = ENCODER_LINEARS) -> bool:
    """torchao-style filter: True for the image encoder's block linears of the kinds in
    ``linears`` (fqn relative to the encoder). For ``quantize_(filter_fn=...)`` with a
    selection: ``functools.partial(encoder_linear_filter, linears=...)``."""
    pattern = _linear_pattern(check_linears(linears))
    return isinstance(module, nn.Linear) and pattern.fullmatch(fqn) is not None


def has_plain_weight(linear: nn.Module) -> bool:
    """Whether ``linear`` is an ``nn.Linear`` whose weight is an ordinary dense tensor (not
    quantized, sparse or replaced by :func:`compress`)."""
    if not isinstance(linear, nn.Linear):
        return False
    w = linear.weight
    return type(w) in (torch.Tensor, nn.Parameter) and type(w.data) is torch.Tensor


def lin1_epilogue_possible(mode: str, linears: Sequence[str]) -> bool:
    """Whether, after ``compress(..., mode, linears=linears)``, the MLPs can still run lin1 +
    GELU as one GEMM (``mlp_epilogue``): lin1 stays plain, and ``fp8_triton`` / ``int8_triton``
    have not moved the GELU into lin2's input quantization."""
    if mode == "none":
        return True
    return "lin1" not in linears and not (mode in _ROW_QUANT_MODES and "lin2" in linears)


def _encoder_of(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects a Sam model or its image_encoder (nn.Module), got {type(model).__name__}")
    encoder = getattr(model, "image_encoder", model)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"model.image_encoder is a {type(encoder).__name__}, not an nn.Module")
    return encoder


def encoder_linears(model, linears: Sequence[str] = ENCODER_LINEARS) -> List[str]:
    """Names (relative to the image encoder) of the linears ``compress(..., linears=linears)``
    acts on."""
    encoder = _encoder_of(model)
    selected = check_linears(linears)
    return [n for n, m in encoder.named_modules() if encoder_linear_filter(m, n, selected)]


def _import_torchao():
    try:
        torchao = importlib.import_module("torchao")
        q = importlib.import_module("torchao.quantization")
    except ImportError as e:
        raise ImportError(
            f"this compression mode needs torchao (>= 0.18), which could not be imported ({e}); "
            "install it with `pip install torchao`"
        ) from e
    found = re.match(r"(\d+)\.(\d+)", getattr(torchao, "__version__", ""))
    if found is None or (int(found[1]), int(found[2])) < (0, 18):
        raise ImportError(
            f"this compression mode needs torchao >= 0.18 (its quantize_ configs), found "
            f"{getattr(torchao, '__version__', 'unknown')}; upgrade with `pip install -U torchao`"
        )
    return q


def _capability_problem(device: torch.device, need: tuple, what: str) -> Optional[str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{what} (CUDA compute capability >= {need[0]}.{need[1]}); the image encoder is on {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return (f"{what} (CUDA compute capability >= {need[0]}.{need[1]}); "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def _fp8_problem(device: torch.device) -> Optional[str]:
    return _capability_problem(device, (8, 9), "fp8 matmuls need an Ada/Hopper or newer GPU")


def _or_interpreted(problem):
    """``problem`` for a mode of our Triton kernels, which also run on CPU tensors under the
    Triton interpreter (tests)."""
    return lambda d: None if d.type == "cpu" and interpreting() else problem(d)


# mode -> (GPU problem finder, weight dtypes the kernels take)
_BF16 = (torch.bfloat16,)
_REQUIREMENTS = {
    "fp8": (_fp8_problem, _BF16),
    "fp8_triton": (_or_interpreted(_fp8_problem), _BF16),
    "int8_triton": (_or_interpreted(lambda d: _capability_problem(
        d, (8, 0), "int8_triton's Triton matmul needs int8 tensor cores (an Ampere or newer GPU)")), _BF16),
    "fp8_sparse_2_4": (lambda d: _capability_problem(d, (9, 0), "torchao's CUTLASS fp8 2:4 kernel needs a Hopper GPU"), _BF16),
    "sparse_2_4": (sparse_gpu_problem, (torch.bfloat16, torch.float16)),
}


def _check_requirements(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise one RuntimeError listing every unmet hardware / dtype requirement of ``mode``."""
    if mode not in _REQUIREMENTS:
        return
    gpu_problem, dtypes = _REQUIREMENTS[mode]
    problems = []
    if gpu_problem(device):
        problems.append(gpu_problem(device))
    if dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        problems.append(f"its kernels take {' or '.join(names)} weights but the image encoder has "
                        f"{str(dtype).replace('torch.', '')} (convert first: sam.to(torch.{names[0]}))")
    if problems:
        raise RuntimeError(f"compress mode {mode!r} cannot run here: " + "; ".join(problems))


def _torchao_config(q, mode: str):
    if mode == "int8_dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(granularity=q.PerRow(), set_inductor_config=False)
    if mode == "int8_weight_only":
        return q.Int8WeightOnlyConfig(granularity=q.PerRow(), set_inductor_config=False)
    if mode == "fp8":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow(), set_inductor_config=False)
    from torchao.quantization.quantize_.workflows import Float8PackingFormat

    return q.Float8DynamicActivationFloat8WeightConfig(
        granularity=q.PerRow(), set_inductor_config=False,
        packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA,
    )


def _check_calibration(calibration, mode: str, encoder: nn.Module) -> None:
    if mode not in _SPARSE_MODES:
        raise ValueError(f"calibration images are used only by the 2:4 modes {_SPARSE_MODES}, not by {mode!r}; drop the argument")
    size = getattr(encoder, "img_size", None)
    if (not isinstance(calibration, torch.Tensor) or not calibration.is_floating_point() or calibration.dim() != 4
            or calibration.shape[1] != 3 or (size is not None and tuple(calibration.shape[2:]) != (size, size))):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(
            f"calibration must be a float tensor (B, 3, {size or 'S'}, {size or 'S'}) of images already through "
            f"sam.preprocess, got {shape}"
        )


class FlatInputLinear(nn.Linear):
    """``nn.Linear`` that hands its weight a 2-D (tokens, features) input and restores the
    leading dims after. The encoder feeds (B, H, W, C); the 2:4 weights need 2-D inputs:
    torchao 0.18's fp8 2:4 linear squeezes the activation scale on dim 1, and dynamo (torch 2.11)
    cannot trace a 4-D input through a ``SparseSemiStructuredTensor`` weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def flatten_linear_inputs_(module: nn.Module, filter_fn) -> List[str]:
    """Swap, in place, each ``nn.Linear`` selected by ``filter_fn(submodule, name)`` for a
    ``FlatInputLinear`` holding the same parameters (same names, same state-dict keys)."""
    names = []
    for name, lin in [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear and filter_fn(m, n)]:
        flat = FlatInputLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        flat.weight, flat.bias = lin.weight, lin.bias
        flat.train(lin.training)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, flat)
        names.append(name)
    return names


def compress(model: nn.Module, mode: str, *, calibration: Optional[torch.Tensor] = None,
             linears: Sequence[str] = ENCODER_LINEARS) -> nn.Module:
    """Compress, in place, the image-encoder linears of ``model`` (a Sam or its image encoder)
    with ``mode`` (one of ``COMPRESS_MODES``) and return ``model``.

    Call it on the model already moved to its final device and dtype (bf16 on GPUs) and before
    ``torch.compile``. Every check runs before any weight is changed.
    ``linears``: the kinds of block linears to compress (a non-empty selection of
    ``ENCODER_LINEARS``, default all); the others are left untouched (no pruning, no
    quantization, no ``FlatInputLinear`` swap).
    ``calibration`` (2:4 modes only): a (B, 3, S, S) batch of ``sam.preprocess``-ed images; the
    encoder runs on it once and pruning then keeps, in each group of 4, the 2 weights with the
    largest ``|w| * ||input channel||`` (Wanda) instead of the largest ``|w|``.
    """
    check_mode(mode)
    selected = check_linears(linears)
    encoder = _encoder_of(model)
    from .fp8_linear import RowQuantLinear

    done = next((m for m in encoder.modules() if isinstance(m, RowQuantLinear)), None)
    if done is not None:
        raise RuntimeError(f"the image encoder is already compressed ({done.MODE} linears); compress a freshly built model")
    everything = [m for n, m in encoder.named_modules() if encoder_linear_filter(m, n)]
    if not everything:
        raise ValueError(
            f"found no image-encoder linears (blocks.N.attn.qkv/proj, blocks.N.mlp.lin1/lin2) in "
            f"{type(model).__name__}; pass a Sam model or its image_encoder"
        )
    filter_fn = functools.partial(encoder_linear_filter, linears=selected)
    targets = [m for n, m in encoder.named_modules() if filter_fn(m, n)]
    if not targets:
        raise ValueError(
            f"found no image-encoder linears of the kinds {', '.join(selected)} in {type(model).__name__}"
        )
    if calibration is not None:
        _check_calibration(calibration, mode, encoder)
    if mode == "none":
        return model
    for m in everything:  # also the kinds not selected now: no second pass over a compressed model
        if not has_plain_weight(m):
            raise RuntimeError(
                f"the image encoder is already compressed (weight is {type(m.weight.data).__name__}); "
                "compress a freshly built model"
            )
    devices = {m.weight.device for m in targets}
    dtypes = {m.weight.dtype for m in targets}
    if len(devices) != 1 or len(dtypes) != 1:
        raise RuntimeError(
            f"image-encoder linears are spread over devices {sorted(map(str, devices))} and dtypes "
            f"{sorted(map(str, dtypes))}; move the model to one device and dtype first"
        )
    device, dtype = devices.pop(), dtypes.pop()
    _check_requirements(mode, device, dtype)
    q = _import_torchao() if mode in _TORCHAO_MODES else None

    if mode in _SPARSE_MODES:
        norms = None
        if calibration is not None:
            x = calibration.to(device=device, dtype=dtype)
            norms = input_channel_norms(encoder, filter_fn, lambda: encoder(x))
        prune_linears_2_4_(encoder, filter_fn, norms)
        flatten_linear_inputs_(encoder, filter_fn)
    if mode == "sparse_2_4":
        to_semi_structured_(encoder, filter_fn)
    elif mode in _ROW_QUANT_MODES:
        from .fp8_linear import Fp8Linear, to_row_quant_linears_
        from .int8_linear import Int8Linear

        to_row_quant_linears_(encoder, filter_fn, Fp8Linear if mode == "fp8_triton" else Int8Linear)
    else:
        q.quantize_(encoder, _torchao_config(q, mode), filter_fn=filter_fn)
    return model


@dataclass(frozen=True)
class InductorSettings:
    """Inductor options from the torchao SAM tutorial, each ``None`` (leave torch's value) or a bool.

    Field names are ``torch._inductor.config`` names; a name this torch lacks raises, never
    ignored. Use ``torch.compile(m, options=s.options(mode="max-autotune"))`` or
    ``with s.patch(): ...`` around the call that triggers compilation (the first forward, not
    ``torch.compile`` itself).
    """

    # fuse int8 matmul with its rescale (int8_dynamic); torch 2.11-2.14 keep the name but no
    # longer register the pattern that reads it, so there it changes nothing (README)
    force_fuse_int_mm_with_mul: Optional[bool] = None
    coordinate_descent_tuning: Optional[bool] = None  # refine Triton kernel configs after autotuning
    coordinate_descent_check_all_directions: Optional[bool] = None  # widen that search
    epilogue_fusion: Optional[bool] = None  # fuse pointwise epilogues into matmul templates
    epilogue_fusion_first: Optional[bool] = None  # do epilogue fusion before other fusions

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"InductorSettings.{f.name} must be True, False or None, got {value!r}")

    @classmethod
    def tutorial(cls) -> "InductorSettings":
        """The seed tutorial's final choice: fused int mm, coordinate descent in all directions,
        no epilogue fusion."""
        return cls(force_fuse_int_mm_with_mul=True, coordinate_descent_tuning=True,
                   coordinate_descent_check_all_directions=True, epilogue_fusion=False)

    def options(self, mode: Optional[str] = None) -> Dict[str, object]:
        """The set (non-None) values as a ``torch.compile(options=...)`` dict. ``mode`` (a
        ``torch.compile`` mode such as "max-autotune") starts from that mode's options, which
        the set values then override, since torch takes ``mode`` or ``options``, not both."""
        ours = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        check_inductor_config_names(ours)
        out: Dict[str, object] = {}
        if mode is not None:
            from torch._inductor import list_mode_options

            try:
                out.update(list_mode_options(mode))
            except RuntimeError as e:
                raise ValueError(f"unknown torch.compile mode {mode!r}: {e}") from e
        out.update(ours)
        return out

    def patch(self):
        """Context manager setting these values in ``torch._inductor.config`` and restoring them."""
        import torch._inductor.config as inductor_config

        return inductor_config.patch(self.options())


def check_inductor_config_names(names: Iterable[str]) -> None:
    """Raise a RuntimeError naming every entry of ``names`` missing from ``torch._inductor.config``."""
    import torch._inductor.config as inductor_config

    known = set(inductor_config.get_config_copy())
    missing = [n for n in names if n not in known]
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} has no inductor option(s) {', '.join(missing)}; "
            "leave them unset (None) with this torch version"
        )
