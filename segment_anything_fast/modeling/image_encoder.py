"""ViT image encoder: windowed + global attention with decomposed relative-position bias."""
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import check_backend, grid_backend, rel_pos_attention
from .common import LayerNorm2d, MLPBlock, linear_residual


class ImageEncoderViT(nn.Module):
    """Patch embedding -> transformer blocks -> conv neck, as in SAM (ViTDet backbone).

    Same constructor arguments as the original, plus ``attention``: the name of the
    :mod:`segment_anything_fast.attention` backend every block uses.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Tuple[int, ...] = (),
        attention: str = "math",
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_set else window_size,
                input_size=(grid, grid),
                attention=attention,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, img_size, img_size) normalised image -> (B, out_chans, grid, grid)."""
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        pending = None  # a residual add a block left to the next one (Block.defer_residual)
        for blk in self.blocks:
            out = blk(x, pending)
            x, pending = out if isinstance(out, tuple) else (out, None)
        if pending is not None:
            x = x + pending
        return self.neck(x.permute(0, 3, 1, 2))


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size > 0`` attends within (padded) windows.

    ``defer_residual`` (off; set by ``compress(..., "fp8_triton")``, whose quantization kernels
    take the layer norms and can add a residual while they read a row): the block returns the
    pair ``(x, y)`` whose sum is its output, and takes the previous block's pair as ``x`` and
    ``pending``, so each residual add happens inside the next ``qkv`` / ``lin1`` quantization
    instead of as a separate pass over the tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
        attention: str = "math",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            attention=attention,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        self.defer_residual = False

    def forward(self, x: torch.Tensor, pending: Optional[torch.Tensor] = None):
        """The block on ``x`` (+ ``pending``, a residual still to add); see ``defer_residual``."""
        if self.defer_residual:
            if pending is None:
                shortcut, qkv = x, self.attn.qkv(x)
            else:
                qkv, shortcut = self.attn.qkv(x, input_residual=pending)
            h, x = self.mlp.lin1(self.attn.proj(self._attention(qkv)), input_residual=shortcut)
            return x, self.mlp.lin2(self.mlp.act(h))
        shortcut = x if pending is None else x + pending
        x = self._attention(self.attn.qkv(self.norm1(shortcut)))
        # both residual adds through linear_residual: in the matmul's epilogue where it can
        x = linear_residual(self.attn.proj, x, shortcut)
        return self.mlp(self.norm2(x), residual=x)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3C) projected tokens -> (B, H, W, C) attention output before ``proj``."""
        # qkv and proj act per token: they run on the H*W real tokens, not on the padded
        # windows. Padded tokens get the qkv bias, i.e. qkv(0), exactly what projecting SAM's
        # zero padding gives (and no all-zero rows reach a quantized linear).
        return self.attn.attend(qkv, self.window_size, self.attn.qkv.bias)


def _rel_pos_index(q_size: int, k_size: int) -> torch.Tensor:
    """(q_size, k_size) long table: row of the rel-pos table for each query/key offset."""
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate an (L, C) rel-pos table to (length, C)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
    )
    return resized.reshape(-1, length).permute(1, 0)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, C) relative-position embeddings, interpolating the table if needed."""
    table = _resize_rel_pos(rel_pos, int(2 * max(q_size, k_size) - 1))
    return table[_rel_pos_index(q_size, k_size).to(rel_pos.device)]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed rel-pos bias.

    The attention itself runs through ``rel_pos_attention(..., self.backend)``; set
    ``module.backend`` to switch implementations after construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
        attention: str = "math",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.backend = check_backend(attention)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.input_size = input_size
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True.")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))

    def attend(
        self, qkv: torch.Tensor, window_size: int = 0, pad_value: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, H, W, 3C) projected q, k, v -> (B, H, W, C) attention output before ``proj``.

        ``window_size`` > 0: attention within ws x ws windows, the grid padded up to whole
        windows with tokens whose q, k, v are ``pad_value`` (3C,) (zeros when None). A backend
        with a grid attention (``"triton"``) reads the windows in place; the others get copies.
        """
        grid_fn = grid_backend(self.backend)
        if grid_fn is not None:
            rel = self._rel_logits(qkv, window_size) if self.use_rel_pos else None
            return grid_fn(qkv, self.num_heads, window_size, rel, pad_value if window_size else None)
        if window_size == 0:
            return self._attend_tokens(qkv)
        H, W = qkv.shape[1], qkv.shape[2]
        windows, pad_hw = window_partition(qkv, window_size, pad_value)
        return window_unpartition(self._attend_tokens(windows), window_size, pad_hw, (H, W))

    def _rel_logits(self, qkv: torch.Tensor, window_size: int) -> torch.Tensor:
        """q . (rel-pos table entry) for every token and relative offset within its window:
        (B, heads, H, W, E), E >= 2h - 1 + 2w - 1 for h x w windows (the whole grid when
        ``window_size`` is 0). A query at window row r, column c gets the bias
        ``[r - k + h - 1] + [2h - 1 + c - l + w - 1]`` towards the key at (k, l): SAM's
        decomposed bias, from one matmul per head over the rel-pos tables (2h - 1 + 2w - 1
        entries, padded to a multiple of 8) read straight from ``qkv``, with no gathered
        (h, h, head_dim) tables and no copy of q."""
        B, H, W, C = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
        h, w = (window_size, window_size) if window_size else (H, W)
        table = torch.cat([_resize_rel_pos(self.rel_pos_h, 2 * h - 1), _resize_rel_pos(self.rel_pos_w, 2 * w - 1)])
        table = F.pad(table, (0, 0, 0, -table.shape[0] % 8)).to(qkv.dtype)
        q = qkv[..., :C].reshape(B * H * W, self.num_heads, -1).transpose(0, 1)  # (heads, T, d)
        logits = torch.bmm(q, table.t().expand(self.num_heads, -1, -1))  # (heads, T, E)
        return logits.view(self.num_heads, B, H, W, -1).permute(1, 0, 2, 3, 4)

    def _attend_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention over all tokens of (B, H, W, 3C) ``qkv`` through ``rel_pos_attention``."""
        B, H, W, C = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
        N = H * W
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
        rel_h = rel_w = None
        if self.use_rel_pos:  # one value per key row / column, picked from the logits
            logits = self._rel_logits(qkv, 0)
            dev = logits.device
            iy = torch.arange(H, device=dev)
            ix = torch.arange(W, device=dev)
            idx_h = (iy[:, None, None] - iy[None, None, :] + H - 1).expand(B, self.num_heads, H, W, H)
            idx_w = (ix[:, None] - ix[None, :] + 2 * H + W - 2).expand(B, self.num_heads, H, W, W)
            rel_h = logits.gather(-1, idx_h).reshape(B, self.num_heads, N, H)
            rel_w = logits.gather(-1, idx_w).reshape(B, self.num_heads, N, W)
        out = rel_pos_attention(q, k, v, rel_h, rel_w, self.backend)
        return out.transpose(1, 2).reshape(B, H, W, C)


def window_partition(
    x: torch.Tensor, window_size: int, pad_value: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, ws, ws, C), padding H and W up to multiples of ws with
    zeros, or with the (C,) vector ``pad_value`` at every padded position.

    Returns the windows and the padded size (Hp, Wp).
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_value is None and (pad_h > 0 or pad_w > 0):
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    elif pad_value is not None:
        fill = pad_value.to(x.dtype)
        if pad_w > 0:
            x = torch.cat([x, fill.expand(B, H, pad_w, C)], dim=2)
        if pad_h > 0:
            x = torch.cat([x, fill.expand(B, pad_h, W + pad_w, C)], dim=1)
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWindows, ws, ws, C) -> (B, H, W, C)."""
    Hp, Wp = pad_hw
    H, W = hw
    nh, nw = Hp // window_size, Wp // window_size
    B = windows.shape[0] // (nh * nw)
    x = windows.reshape(B, nh, nw, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class PatchEmbed(nn.Module):
    """Conv patchify: (B, C, H, W) -> (B, H/ps, W/ps, embed_dim).

    With non-overlapping patches (stride = kernel, no padding: every SAM model) the conv runs
    as one GEMM over the unfolded patches: the same sums, but cuDNN's bf16 kernel for this
    3-channel, stride-16 conv took ~8% of vit_b's encoder time on an H100.
    """

    def __init__(
        self,
        kernel_size: Tuple[int, int] = (16, 16),
        stride: Tuple[int, int] = (16, 16),
        padding: Tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj
        if p.stride != p.kernel_size or p.padding != (0, 0):
            return p(x).permute(0, 2, 3, 1)
        (kh, kw), (b, c, h, w) = p.kernel_size, x.shape
        gh, gw = h // kh, w // kw  # like the conv, drop a remainder smaller than a patch
        x = x[:, :, : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * kh * kw)
        return F.linear(x, p.weight.reshape(p.out_channels, -1), p.bias)
