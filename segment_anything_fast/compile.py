"""Turn a built :class:`Sam` into the fast inference model: dtype, attention backend, compile.

* :func:`cast_model`: image encoder, prompt encoder and mask decoder to one dtype (bf16).
* :func:`set_attention_backend`: the backend of every image-encoder ``Attention`` module.
* :func:`compile_image_encoder`: ``torch.compile`` (fullgraph, static shapes) behind
  :class:`StaticBatchEncoder`, which pads every batch to one static size so the compiled
  kernels and CUDA graphs are reused and never recompiled. ``regional=True`` compiles one
  windowed and one global block and reuses them for all identical blocks (compile time grows
  with two blocks, not with the depth).
* :func:`compile_mask_decoder`: the decoder compiled at a few padded prompt counts
  (:class:`BucketedMaskDecoder`).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import check_backend
from .modeling.image_encoder import Attention as EncoderAttention
from .modeling.mask_decoder import is_shared_dense
from .quantize import ENCODER_LINEARS, check_linears, check_mode

COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default")
DEFAULT_DECODER_BUCKETS = (1, 8, 32, 64, 128, 256)


def _check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown compile mode {mode!r}; choose one of {COMPILE_MODES} or None.")
    return mode


def _uses_cudagraphs(mode: str, backend: str) -> bool:
    return backend == "inductor" and mode in ("max-autotune", "reduce-overhead")


def _compile_kwargs(mode: str, backend: str, fullgraph: bool) -> dict:
    """torch.compile arguments; ``mode`` only applies to the inductor backend."""
    _check_mode(mode)
    kw = dict(fullgraph=fullgraph, dynamic=False, backend=backend)
    if backend == "inductor":
        kw["mode"] = mode
    return kw


def compile_function(fn, mode: str, backend: str = "inductor", dynamic: Optional[bool] = None):
    """``torch.compile`` of a plain function, whole graph. ``dynamic=None``: static shapes
    first, then (on a second shape) torch's automatic dynamic shapes, so new image sizes do not
    recompile; ``dynamic=False``: one static graph per input shape (for padded buckets)."""
    kw = _compile_kwargs(mode, backend, fullgraph=True)
    kw["dynamic"] = dynamic
    return torch.compile(fn, **kw)


def compile_postprocess(sam: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """Compile ``sam.masks_from_logits`` (upscale, crop, resize, threshold): the predictor's
    full-resolution float32 logits are then never written, only the bool masks (one fused
    kernel instead of two interpolations and a comparison). New image sizes reuse it
    (automatic dynamic shapes after the second size)."""
    from .modeling.sam import _masks_from_logits

    sam._masks_fn = compile_function(_masks_from_logits, mode, backend)
    return sam


POSTPROCESS_BACKENDS = ("torch", "triton")


def check_postprocess(backend: str) -> str:
    """``backend`` if it is one of :data:`POSTPROCESS_BACKENDS`, else a ValueError."""
    if backend not in POSTPROCESS_BACKENDS:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_BACKENDS}, got {backend!r}.")
    return backend


def set_postprocess(sam: nn.Module, backend: str, compile_mode: Optional[str] = None) -> nn.Module:
    """How ``sam.masks_from_logits`` runs: ``"torch"`` (``Sam.postprocess_masks`` + threshold,
    compiled with ``compile_mode`` unless None) or ``"triton"`` (``fused_postprocess``: one
    kernel from low-res logits to full-resolution masks, CUDA only; ``compile_mode`` unused)."""
    if check_postprocess(backend) == "triton":
        from .fused_postprocess import masks_from_logits

        sam._masks_fn = masks_from_logits
    elif compile_mode is not None:
        compile_postprocess(sam, compile_mode)
    else:
        from .modeling.sam import _masks_from_logits

        sam._masks_fn = _masks_from_logits
    return sam


def cast_model(sam: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the three sub-networks to ``dtype`` in place (pixel mean/std stay float32)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        getattr(sam, name).to(dtype)
    return sam


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Set ``backend`` on every image-encoder Attention inside ``module``; returns how many."""
    check_backend(backend)
    count = 0
    for m in module.modules():
        if isinstance(m, EncoderAttention):
            m.backend = backend
            count += 1
    if count == 0:
        raise ValueError("set_attention_backend: no image-encoder Attention module found.")
    return count


class _Proxy(nn.Module):
    """Holds a wrapped module as ``inner``; unknown attributes (``img_size``...) come from it.

    Its state dict is the inner module's, with the same keys (no ``inner.`` prefix), so
    checkpoints save and load as for the unwrapped model.
    """

    def __init__(self, inner: nn.Module, fn):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_fn", fn)  # the compiled callable; not a registered child
        self._register_load_state_dict_pre_hook(self._add_inner_prefix)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.inner.state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )

    @staticmethod
    def _add_inner_prefix(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if not key.startswith(prefix + "inner."):
                state_dict[prefix + "inner." + key[len(prefix):]] = state_dict.pop(key)


class StaticBatchEncoder(_Proxy):
    """Run ``fn`` (the compiled encoder) on batches of exactly ``batch_size`` images.

    Smaller batches are zero-padded, larger ones run in chunks; the output is sliced back and
    copied out of the CUDA-graph pool (the next replay reuses that memory).
    """

    def __init__(self, inner: nn.Module, fn, batch_size: int, cudagraphs: bool):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        super().__init__(inner, fn)
        self.batch_size = batch_size
        self.cudagraphs = cudagraphs

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.batch_size:
            pad = x.new_zeros((self.batch_size - n,) + tuple(x.shape[1:]))
            x = torch.cat([x, pad], dim=0)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._fn(x)
        return out[:n].clone() if (self.cudagraphs or n < self.batch_size) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"image encoder input must be (B, 3, H, W), got shape {tuple(x.shape)}.")
        if x.shape[0] <= self.batch_size:
            return self._run(x)
        return torch.cat([self._run(c) for c in x.split(self.batch_size)], dim=0)


def compile_image_encoder(
    encoder: nn.Module,
    *,
    mode: str = "max-autotune",
    batch_size: int = 1,
    regional: bool = False,
    fullgraph: bool = True,
    backend: str = "inductor",
) -> StaticBatchEncoder:
    """Compile ``encoder`` for static batches of ``batch_size`` (see :class:`StaticBatchEncoder`).

    ``regional=False`` compiles the whole encoder into one graph (best fusion, one CUDA graph);
    ``regional=True`` compiles patch embedding, each block and the neck separately: identical
    blocks share one compiled graph, so compile time does not grow with depth.
    ``backend`` is torch.compile's (``"eager"``/``"aot_eager"`` check tracing on the CPU).
    """
    kw = _compile_kwargs(mode, backend, fullgraph)
    if regional:
        for blk in encoder.blocks:
            blk.compile(**kw)
        encoder.patch_embed.compile(**kw)
        encoder.neck.compile(**kw)
        fn = encoder
    else:
        fn = torch.compile(encoder, **kw)
    return StaticBatchEncoder(encoder, fn, batch_size, _uses_cudagraphs(mode, backend))


class BucketedMaskDecoder(_Proxy):
    """Mask decoder run at a few static prompt counts.

    The prompts (sparse and dense embeddings, dim 0) are zero-padded up to the next bucket, so
    any number of prompts reuses one of ``len(buckets)`` compiled graphs; more than the largest
    bucket runs in chunks. Prompts are independent, so padding does not change the results.
    """

    def __init__(self, inner: nn.Module, fn, buckets: Sequence[int], cudagraphs: bool):
        b = sorted(set(int(x) for x in buckets))
        if not b or b[0] < 1:
            raise ValueError(f"buckets must be positive ints, got {tuple(buckets)!r}.")
        super().__init__(inner, fn)
        self.buckets = tuple(b)
        self.cudagraphs = cudagraphs

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        return self.buckets[-1]

    def _run(self, image_embeddings, image_pe, sparse, dense, multimask_output):
        n = sparse.shape[0]
        size = self._bucket(n)
        if n < size:
            sparse = torch.cat([sparse, sparse.new_zeros((size - n,) + tuple(sparse.shape[1:]))])
            if is_shared_dense(dense):  # keep it a broadcast (the decoder's shared-image path)
                dense = dense[:1].expand(size, -1, -1, -1)
            else:
                dense = torch.cat([dense, dense.new_zeros((size - n,) + tuple(dense.shape[1:]))])
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        masks, iou = self._fn(image_embeddings, image_pe, sparse, dense, multimask_output)
        if self.cudagraphs or n < size:
            masks, iou = masks[:n].clone(), iou[:n].clone()
        return masks, iou

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        n = sparse_prompt_embeddings.shape[0]
        if dense_prompt_embeddings.shape[0] != n:
            raise ValueError(
                f"sparse ({n}) and dense ({dense_prompt_embeddings.shape[0]}) prompt embeddings "
                "must have the same batch size."
            )
        top = self.buckets[-1]
        if n <= top:
            return self._run(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output,
            )
        outs = [
            self._run(image_embeddings, image_pe, s, d, multimask_output)
            for s, d in zip(sparse_prompt_embeddings.split(top), dense_prompt_embeddings.split(top))
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def compile_mask_decoder(
    decoder: nn.Module,
    *,
    mode: str = "max-autotune-no-cudagraphs",
    buckets: Sequence[int] = DEFAULT_DECODER_BUCKETS,
    fullgraph: bool = True,
    backend: str = "inductor",
) -> BucketedMaskDecoder:
    """Compile the mask decoder (static shapes) behind :class:`BucketedMaskDecoder`."""
    fn = torch.compile(decoder, **_compile_kwargs(mode, backend, fullgraph))
    return BucketedMaskDecoder(decoder, fn, buckets, _uses_cudagraphs(mode, backend))


def make_fast(
    sam: nn.Module,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    attention: Optional[str] = None,
    compile_mode: Optional[str] = "max-autotune",
    batch_size: int = 1,
    regional: bool = False,
    decoder_mode: Optional[str] = "max-autotune-no-cudagraphs",
    decoder_buckets: Sequence[int] = DEFAULT_DECODER_BUCKETS,
    compress: str = "none",
    compress_linears: Sequence[str] = ENCODER_LINEARS,
    upscaling: Optional[str] = None,
    decoder_attention: Optional[str] = None,
    postprocess_mode: Optional[str] = None,
    postprocess: str = "torch",
    mlp_epilogue: Optional[bool] = None,
) -> nn.Module:
    """Apply :func:`cast_model`, :func:`set_attention_backend`, the decoder's ``upscaling``
    ("conv" or "triton", ``MaskDecoder.set_upscaling``) and ``decoder_attention`` ("sdpa" or
    "triton", ``TwoWayTransformer.set_attention``), ``quantize.compress`` and the two compiles
    in place, in that order; ``postprocess`` ("torch" or "triton") and ``postprocess_mode``
    set the predictor's mask post-processing (:func:`set_postprocess`). ``mlp_epilogue``
    (after ``compress``, before compiling) turns ``mlp_epilogue.set_mlp_epilogue`` on or off in
    the image encoder.

    ``None`` for ``dtype``/``attention``/``upscaling``/``decoder_attention``/``mlp_epilogue``/
    ``compile_mode``/``decoder_mode`` (and
    ``"none"`` for ``compress``) skips that step. ``compress_linears``: which encoder linears
    ``compress`` acts on (``quantize.compress(linears=...)``), checked before any step.
    """
    check_mode(compress)
    compress_linears = check_linears(compress_linears, "compress_linears")
    if dtype is not None:
        cast_model(sam, dtype)
    if attention is not None:
        set_attention_backend(sam.image_encoder, attention)
    if upscaling is not None:
        sam.mask_decoder.set_upscaling(upscaling)
    if decoder_attention is not None:
        sam.mask_decoder.transformer.set_attention(decoder_attention)
    if compress != "none":
        from .quantize import compress as compress_encoder

        compress_encoder(sam, compress, linears=compress_linears)
    if mlp_epilogue is not None:
        from .mlp_epilogue import set_mlp_epilogue

        set_mlp_epilogue(sam.image_encoder, mlp_epilogue)
    if compile_mode is not None:
        sam.image_encoder = compile_image_encoder(
            sam.image_encoder, mode=compile_mode, batch_size=batch_size, regional=regional
        )
    if decoder_mode is not None:
        sam.mask_decoder = compile_mask_decoder(
            sam.mask_decoder, mode=decoder_mode, buckets=decoder_buckets
        )
    if postprocess != "torch" or postprocess_mode is not None:
        set_postprocess(sam, postprocess, postprocess_mode)
    return sam.eval()
