"""Attention backend ``"flex"``: FlexAttention with SAM's rel-pos bias added inside the kernel.

SAM's decomposed relative-position bias is ``bias[q, kv] = rel_h[q, kv // W] + rel_w[q, kv % W]``
for a key grid of ``H x W`` tokens (64x64 in the global layers, 14x14 in the windowed ones).
Here it is a FlexAttention ``score_mod``: the kernel reads the two small tables and adds them to
each score tile, so the ``(B, heads, N, N)`` bias is never built.

On CUDA the call goes through one module-level ``torch.compile(flex_attention, dynamic=False)``
(one compiled kernel per shape) unless an outer ``torch.compile`` is already tracing it, in which
case the outer graph fuses it. On the CPU the eager (reference) implementation runs, for tests.
"""
from typing import Optional

import torch
from torch.nn.attention.flex_attention import flex_attention

from .attention import register_backend

_compiled_flex = torch.compile(flex_attention, dynamic=False)


def _rel_pos_score_mod(bias: torch.Tensor, H: int, W: int):
    """score_mod adding ``bias[b, h, q, kv // W] + bias[b, h, q, H + kv % W]``.

    ``bias`` is ``cat([rel_h, rel_w], -1)``: one (B, heads, N, H + W) table, so both reads of a
    score come from the same row.
    """

    def score_mod(score, b, h, q_idx, kv_idx):
        row = kv_idx // W
        col = kv_idx - row * W
        return score + bias[b, h, q_idx, row].to(score.dtype) + bias[b, h, q_idx, H + col].to(score.dtype)

    return score_mod


def flex_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + rel_h[..., kv // W] + rel_w[..., kv % W]) v with FlexAttention."""
    score_mod = None
    if rel_h is not None:
        if rel_w is None:
            raise ValueError("flex attention: rel_h and rel_w must be given together.")
        H, W = rel_h.shape[-1], rel_w.shape[-1]
        if H * W != k.shape[-2]:
            raise ValueError(
                f"flex attention: rel_h/rel_w describe a {H}x{W} key grid but k has "
                f"{k.shape[-2]} tokens."
            )
        bias = torch.cat([rel_h, rel_w.to(rel_h.dtype)], dim=-1)
        score_mod = _rel_pos_score_mod(bias, H, W)
    if q.is_cuda and not torch.compiler.is_compiling():
        return _compiled_flex(q, k, v, score_mod=score_mod)
    return flex_attention(q, k, v, score_mod=score_mod)


register_backend("flex", flex_rel_pos_attention)
