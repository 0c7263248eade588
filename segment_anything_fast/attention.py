"""Attention with SAM's decomposed relative-position bias, behind one dispatch.

The image encoder calls :func:`rel_pos_attention` with the bias in its decomposed form
(``rel_h``/``rel_w``); each backend decides whether the full (N, N) bias is ever built:

* ``"math"``: reference, materialises the bias and runs softmax in float32.
* ``"sdpa"``: ``scaled_dot_product_attention`` with the bias as an additive mask.

Faster backends (fused kernels) register themselves with :func:`register_backend`.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

# fn(q, k, v, rel_h, rel_w) -> out, all (B, heads, N, d) except rel_h (B, heads, N, H),
# rel_w (B, heads, N, W); rel_h/rel_w may be None (no relative position bias).
AttentionFn = Callable[..., torch.Tensor]
_BACKENDS: Dict[str, AttentionFn] = {}
# grid_fn(qkv, num_heads, window_size, rel, pad) -> out: attention read straight from
# the encoder's (B, H, W, 3C) qkv, windows included (see triton_attention._launch_grid).
_GRID_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {}


def register_backend(name: str, fn: AttentionFn, grid_fn: Optional[Callable[..., torch.Tensor]] = None) -> None:
    """Make ``fn`` selectable as ``attention=name`` in the builders; ``grid_fn``, if given, is
    the backend's attention on the token grid, which the image encoder then uses instead of
    partitioning windows itself."""
    _BACKENDS[name] = fn
    if grid_fn is not None:
        _GRID_BACKENDS[name] = grid_fn


def grid_backend(name: str) -> Optional[Callable[..., torch.Tensor]]:
    """The grid attention of backend ``name`` (see :func:`register_backend`), or None."""
    return _GRID_BACKENDS.get(name)


def available_backends() -> list:
    return sorted(_BACKENDS)


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise a ValueError listing them."""
    _load_optional_backends()
    if name not in _BACKENDS:
        raise ValueError(
            f"Unknown attention backend {name!r}; choose one of {available_backends()}."
        )
    return name


def dense_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Expand (B, h, N, H) and (B, h, N, W) into the full (B, h, N, H*W) additive bias."""
    B, nh, N, H = rel_h.shape
    W = rel_w.shape[-1]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, N, H * W)


def _math(q, k, v, rel_h=None, rel_w=None):
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        attn = attn + dense_bias(rel_h, rel_w)
    attn = attn.float().softmax(dim=-1).to(v.dtype)
    return attn @ v


def _sdpa(q, k, v, rel_h=None, rel_w=None):
    mask = None if rel_h is None else dense_bias(rel_h, rel_w).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


register_backend("math", _math)
register_backend("sdpa", _sdpa)

_optional_loaded = False


def _load_optional_backends() -> None:
    """Import the modules of the fused backends, which register themselves."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for mod in ("segment_anything_fast.flex_attention", "segment_anything_fast.triton_attention"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    backend: str = "math",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + rel_h[..., kh] + rel_w[..., kw]) v for (B, heads, N, d) inputs."""
    fn = _BACKENDS.get(backend)
    if fn is None:
        fn = _BACKENDS[check_backend(backend)]
    return fn(q, k, v, rel_h, rel_w)
