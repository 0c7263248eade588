"""Builders of the fast inference model: bf16, fused rel-pos attention, compiled, on the GPU.

``sam_model_fast_registry[name](checkpoint)`` mirrors ``sam_model_registry`` and returns an
eval-mode model that :class:`SamPredictor` and :class:`SamAutomaticMaskGenerator` take as is.
"""
import os
from typing import Optional, Sequence, Union

import torch

from .attention import check_backend
from .build_sam import SamConfig, build_sam, demo_weights
from .compile import DEFAULT_DECODER_BUCKETS, check_postprocess, make_fast
from .quantize import ENCODER_LINEARS, check_linears, check_mode, lin1_epilogue_possible


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "build_sam_fast(device='cuda') but CUDA is not available on this machine; pass "
            "device='cpu' (and compile_mode=None for quick start-up) or use build_sam()."
        )
    return dev


def _decoder_triton_ok(sam) -> bool:
    from .modeling.transformer import Attention, triton_supported

    return all(triton_supported(m) for m in sam.mask_decoder.modules() if isinstance(m, Attention))


def build_sam_fast(
    config: Union[str, SamConfig] = "vit_h",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    attention: Optional[str] = None,
    upscaling: Optional[str] = None,
    decoder_attention: Optional[str] = None,
    compile_mode: Optional[str] = "max-autotune",
    batch_size: int = 1,
    device: Union[str, torch.device] = "cuda",
    regional: bool = False,
    decoder_compile_mode: Optional[str] = "max-autotune-no-cudagraphs",
    decoder_buckets: Sequence[int] = DEFAULT_DECODER_BUCKETS,
    postprocess_compile_mode: Optional[str] = "default",
    postprocess: Optional[str] = None,
    compress: str = "none",
    compress_linears: Sequence[str] = ENCODER_LINEARS,
    mlp_epilogue: Optional[bool] = None,
    compiled_package: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
):
    """Build SAM for fast inference.

    Args:
        config: a name of ``SAM_CONFIGS`` ("vit_h" / "vit_l" / "vit_b" / "default", "demo",
            ...) or a :class:`SamConfig`; a name alone gives random weights (the bundled demo
            weights: ``sam_model_fast_registry["demo"]()``).
        checkpoint: optional state-dict file (official SAM checkpoints load as is).
        dtype: weights and activations dtype (None keeps float32).
        attention: image-encoder attention backend: "triton" (our fused rel-pos kernel, CUDA
            only), "flex" (FlexAttention score_mod), "sdpa" or "math". None picks "triton" on CUDA
            (5-10x faster than "flex" on an H100, experiments/results/attention_h100_b8.json) and
            "flex" elsewhere.
        upscaling: mask-decoder upscaling: "triton" (``fused_upscale``: ConvTranspose chain and
            hypernetwork product in one kernel, CUDA only) or "conv" (the original modules).
            None picks "triton" on CUDA and "conv" elsewhere.
        decoder_attention: mask-decoder attention: "triton" (``decoder_attention``: tiles sized to
            the few prompt tokens, no head-split or broadcast copies, CUDA only) or "sdpa". None
            picks "triton" on CUDA when the decoder's head dims allow it, else "sdpa".
        compile_mode: torch.compile mode of the image encoder ("max-autotune" uses CUDA graphs),
            or None for eager.
        batch_size: static encoder batch; smaller batches are padded to it, larger ones chunked.
        device: where the model runs.
        regional: compile one windowed and one global block and reuse them (faster compile).
        decoder_compile_mode: torch.compile mode of the mask decoder, or None for eager.
        decoder_buckets: prompt counts the decoder is compiled for (inputs padded up to one).
        postprocess_compile_mode: torch.compile mode of the predictor's mask post-processing
            (``compile.compile_postprocess``: upscale + threshold in one kernel, compiled at the
            first prediction), or None for eager; used with ``postprocess="torch"``.
        postprocess: the mask post-processing: "torch" (the modules' ops, compiled as above)
            or "triton" (``fused_postprocess``: one kernel from low-res logits to full-resolution
            masks, CUDA only). None picks "triton" on CUDA (predictor set_image + 64 points,
            vit_b on an H200: 6.9 ms vs 7.7, the same masks) and "torch" elsewhere.
        compress: image-encoder compression mode of ``quantize.COMPRESS_MODES`` (applied after
            the cast, before compiling).
        compress_linears: which block linears ``compress`` acts on: a non-empty selection of
            ``quantize.ENCODER_LINEARS`` ("qkv", "proj", "lin1", "lin2"; default all), e.g.
            ``("qkv", "proj", "lin1")`` keeps ``mlp.lin2`` in bf16 under fp8 (its 4x-wide input
            costs a run-time amax + cast). Checked, like ``compress``, before any work.
        mlp_epilogue: run each encoder MLP's lin1 + GELU as one GEMM with cuBLASLt's bias + GELU
            epilogue (``mlp_epilogue``; on CUDA that GELU is the tanh approximation). None
            turns it on for CUDA wherever lin1 is not compressed; True raises if no block
            qualifies.
        compiled_package: an AOTInductor ``.pt2`` made by ``scripts/export_package.py`` for
            this model: attached instead of compiling (no compile in this process; a package
            built for another GPU / torch / dtype / batch raises ``aot.PackageMismatchError``).
        cache_dir: keep inductor / autotune caches in this folder so the next process reuses
            them (``aot.enable_persistent_caches``).
    """
    check_mode(compress)
    linears = check_linears(compress_linears, "compress_linears")
    dev = _resolve_device(device)
    if compiled_package is not None and mlp_epilogue:
        raise ValueError(
            "mlp_epilogue=True cannot be combined with compiled_package=: the package is an "
            "already compiled encoder; export it with scripts/export_package.py --mlp-epilogue instead."
        )
    if compiled_package is not None and (compress != "none" or linears != ENCODER_LINEARS):
        given = "compress=" if compress != "none" else "compress_linears="
        raise ValueError(
            f"{given} cannot be combined with compiled_package=: the package already holds the "
            "encoder's weights; export a package from a compressed model instead."
        )
    if cache_dir is not None:
        from .aot import enable_persistent_caches

        enable_persistent_caches(cache_dir)
    if attention is None:
        attention = "triton" if dev.type == "cuda" else "flex"
    check_backend(attention)
    if attention == "triton" and dev.type != "cuda":
        raise ValueError("attention='triton' needs device='cuda'; use 'flex' or 'sdpa' on the CPU.")
    if upscaling is None:
        upscaling = "triton" if dev.type == "cuda" else "conv"
    if upscaling == "triton" and dev.type != "cuda":
        raise ValueError("upscaling='triton' needs device='cuda'; use 'conv' on the CPU.")
    with dev:  # initialise the weights on the target device (much faster than on the CPU)
        sam = build_sam(config, checkpoint, attention=attention)
    sam.to(dev)
    if mlp_epilogue is None:
        mlp_epilogue = dev.type == "cuda" and lin1_epilogue_possible(compress, linears)
    if decoder_attention is None:
        decoder_attention = "triton" if dev.type == "cuda" and _decoder_triton_ok(sam) else "sdpa"
    if postprocess is None:
        postprocess = "triton" if dev.type == "cuda" else "torch"
    if check_postprocess(postprocess) == "triton" and dev.type != "cuda":
        raise ValueError("postprocess='triton' needs device='cuda'; use 'torch' on the CPU.")
    if decoder_attention == "triton" and dev.type != "cuda":
        raise ValueError("decoder_attention='triton' needs device='cuda'; use 'sdpa' on the CPU.")
    if compiled_package is not None:
        from .aot import attach_compiled_package

        make_fast(sam, dtype=dtype, attention=attention, upscaling=upscaling,
                  decoder_attention=decoder_attention, compile_mode=None, decoder_mode=None,
                  postprocess_mode=postprocess_compile_mode, postprocess=postprocess)
        return attach_compiled_package(sam, compiled_package, batch_size=batch_size, cache_dir=cache_dir)
    return make_fast(
        sam,
        dtype=dtype,
        attention=attention,
        upscaling=upscaling,
        decoder_attention=decoder_attention,
        compress=compress,
        compress_linears=linears,
        compile_mode=compile_mode,
        batch_size=batch_size,
        regional=regional,
        decoder_mode=decoder_compile_mode,
        decoder_buckets=decoder_buckets,
        postprocess_mode=postprocess_compile_mode,
        postprocess=postprocess,
        mlp_epilogue=mlp_epilogue,
    )


def build_sam_fast_vit_h(checkpoint=None, **kwargs):
    return build_sam_fast("vit_h", checkpoint, **kwargs)


def build_sam_fast_vit_l(checkpoint=None, **kwargs):
    return build_sam_fast("vit_l", checkpoint, **kwargs)


def build_sam_fast_vit_b(checkpoint=None, **kwargs):
    return build_sam_fast("vit_b", checkpoint, **kwargs)


def build_sam_fast_demo(checkpoint=None, **kwargs):
    """The demo model (``SAM_CONFIGS["demo"]``), by default with the bundled trained weights."""
    return build_sam_fast("demo", demo_weights(checkpoint), **kwargs)


sam_model_fast_registry = {
    "default": build_sam_fast_vit_h,
    "vit_h": build_sam_fast_vit_h,
    "vit_l": build_sam_fast_vit_l,
    "vit_b": build_sam_fast_vit_b,
    "demo": build_sam_fast_demo,
}
