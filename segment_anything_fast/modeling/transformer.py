"""Two-way transformer of the mask decoder: tokens attend to the image and back."""
import math
from typing import Optional, Tuple, Type

import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token-to-image attention (original's keys)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def set_attention(self, backend: str) -> None:
        """Choose the attention of every layer: "sdpa" (``scaled_dot_product_attention``, any
        device) or "triton" (``decoder_attention``: one fused kernel, CUDA; same outputs)."""
        if backend not in ("sdpa", "triton"):
            raise ValueError(f"decoder attention must be 'sdpa' or 'triton', not {backend!r}.")
        attns = [m for m in self.modules() if isinstance(m, Attention)]
        if backend == "triton":
            bad = [(a.internal_dim, a.num_heads) for a in attns if not triton_supported(a)]
            if bad:
                raise ValueError(
                    f"decoder_attention='triton' needs power-of-two head dims >= 16; this decoder has "
                    f"(width, heads) {sorted(set(bad))}. Use decoder_attention='sdpa'."
                )
        for a in attns:
            a.backend = backend

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """(B, C, h, w) image, (B, C, h, w) PE, (B, N, C) tokens -> (tokens, image tokens).

        The image and PE may have batch 1 for B prompts of one image (no per-prompt dense
        embedding): the image side is then computed once until it first depends on the
        tokens, instead of B times (the same values as repeating it). Likewise for prompts of
        several images: the image and PE hold one row per image (or batch 1) and
        ``image_index`` (B,) gives each prompt's row; the result equals that of
        ``image_embedding[image_index]``.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe,
                                  image_index=image_index)
            if image_index is not None:  # the image side is per prompt from here on
                key_pe, image_index = take_rows(key_pe, image_index), None
        keys = take_rows(keys, image_index)  # no layers: not gathered yet
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """``image_index`` (see :meth:`TwoWayTransformer.forward`): the keys and key_pe hold one
        row per image; the returned keys hold one per prompt."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        attn = self.cross_attn_token_to_image(q=q, k=k, v=keys, kv_index=image_index)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        attn = self.cross_attn_image_to_token(q=k, k=q, v=queries, q_index=image_index)
        keys = self.norm4(take_rows(keys, image_index) + attn)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the attention width "
                f"{embedding_dim} // {downsample_rate} = {self.internal_dim}."
            )
        self.backend = "sdpa"  # or "triton": see TwoWayTransformer.set_attention
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor, num_heads: int) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, h, n, c = x.shape
        return x.transpose(1, 2).reshape(b, n, h * c)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_index: Optional[Tensor] = None,
                kv_index: Optional[Tensor] = None) -> Tensor:
        """Batch sizes may differ where one of them is 1 (broadcast, as in the original's matmul).
        ``q_index`` / ``kv_index`` (B,): output batch b takes row ``index[b]`` of that side
        (projected first, so a side of one row per image is projected once per image)."""
        if self.backend == "triton":
            from ..decoder_attention import decoder_attention

            return self.out_proj(decoder_attention(self.q_proj(q), self.k_proj(k), self.v_proj(v),
                                                   self.num_heads, q_index, kv_index))
        q = take_rows(self._separate_heads(self.q_proj(q), self.num_heads), q_index)
        k = take_rows(self._separate_heads(self.k_proj(k), self.num_heads), kv_index)
        v = take_rows(self._separate_heads(self.v_proj(v), self.num_heads), kv_index)
        b = max(q.shape[0], k.shape[0])
        if q.shape[0] != b:
            q = q.expand(b, -1, -1, -1)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]))
        return self.out_proj(self._recombine_heads(out))


def take_rows(x: Tensor, index: Optional[Tensor]) -> Tensor:
    """``x[index]`` along dim 0; ``x`` itself without an index or with batch 1 (broadcasts)."""
    return x if index is None or x.shape[0] == 1 else x.index_select(0, index)


def triton_supported(attn: Attention) -> bool:
    """Whether ``decoder_attention``'s kernel takes this layer's head dim (a power of two >= 16)."""
    d = attn.internal_dim // attn.num_heads
    return d >= 16 and d & (d - 1) == 0
