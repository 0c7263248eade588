"""Mask decoder: predicts masks and their IoU from image and prompt embeddings."""
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .transformer import take_rows


class MaskDecoder(nn.Module):
    """Same arguments and state-dict keys as the original ``MaskDecoder``.

    Inputs are cast to the module's dtype, so float32 prompt embeddings work with a bf16 model.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.upscaling = "conv"  # or "triton": see upscale_masks / set_upscaling

    def set_upscaling(self, upscaling: str) -> None:
        """Choose how masks are upscaled: "conv" (the original modules, any device) or
        "triton" (``fused_upscale``: one fused kernel, CUDA; same weights and outputs)."""
        if upscaling not in ("conv", "triton"):
            raise ValueError(f"upscaling must be 'conv' or 'triton', not {upscaling!r}.")
        if upscaling == "triton":
            from ..fused_upscale import check_supported

            check_supported(self.transformer_dim, self.num_mask_tokens)
        self.upscaling = upscaling

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns masks (B, C, 4h, 4w) and IoU predictions (B, C); C = 3 if multimask else 1."""
        masks, iou_pred = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl, :, :], iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoU predictions."""
        dense = dense_prompt_embeddings
        if image_embeddings.shape[0] == 1 and is_shared_dense(dense):
            # One image and one dense embedding for all prompts (no mask prompts): the
            # transformer computes the image side once (TwoWayTransformer.forward).
            return self.predict_masks_per_prompt(image_embeddings, image_pe, sparse_prompt_embeddings, dense)
        # Per-image tensors repeated for each prompt (repeat_interleave without a host sync).
        n = sparse_prompt_embeddings.shape[0]
        return self.predict_masks_per_prompt(
            _repeat_each(image_embeddings, n), _repeat_each(image_pe, n), sparse_prompt_embeddings, dense
        )

    def predict_masks_per_prompt(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`predict_masks` with one image embedding / PE / dense row per prompt
        (N, C, h, w), so prompts of several images go through one call (used in training), or
        one row shared by all N prompts. With ``image_index`` (N,), the image embeddings (and
        PE, or batch 1) hold one row per *image* and prompt n uses row ``image_index[n]``: with
        a shared dense embedding (no mask prompts) the transformer's first layer then projects
        each image once instead of once per prompt; the result equals that of
        ``image_embeddings[image_index]``."""
        dtype = self.iou_token.weight.dtype
        sparse = sparse_prompt_embeddings.to(dtype)
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((out_tokens, sparse), dim=1)
        dense = dense_prompt_embeddings
        if image_index is not None and (image_index.dim() != 1 or image_index.shape[0] != sparse.shape[0]
                                        or image_index.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"image_index must be a 1-D integer tensor with one entry per prompt "
                             f"({sparse.shape[0]}), got {tuple(image_index.shape)} {image_index.dtype}.")
        if is_shared_dense(dense):  # one row, broadcast over the prompts
            dense = dense[:1]
        elif image_index is not None:  # per-prompt dense: gather the images first
            image_embeddings = take_rows(image_embeddings, image_index)
            image_pe = take_rows(image_pe, image_index)
            image_index = None
        src = image_embeddings.to(dtype) + dense.to(dtype)
        pos_src = image_pe.to(dtype)
        w = src.shape[-1]

        hs, src = self.transformer(src, pos_src, tokens, image_index=image_index)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        masks = self.upscale_masks(src.expand(tokens.shape[0], -1, -1), mask_tokens_out, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def upscale_masks(self, src: torch.Tensor, mask_tokens_out: torch.Tensor, grid_w: int) -> torch.Tensor:
        """(B, T, 4h, 4w) mask logits from the transformer's image tokens ``src`` (B, h*w, C)
        and mask-token outputs (B, T, C): the hypernetwork vectors times the upscaled
        embedding, by ``self.upscaling`` ("conv": the modules; "triton": one fused kernel)."""
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        if self.upscaling == "triton":
            from ..fused_upscale import fused_upscale_masks

            return fused_upscale_masks(self.output_upscaling, src, hyper_in, grid_w)
        b, n, c = src.shape
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, n // grid_w, grid_w))
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


def is_shared_dense(dense: torch.Tensor) -> bool:
    """Whether (N, C, h, w) dense prompt embeddings are one row for all N prompts (batch 1, or
    a broadcast view such as the prompt encoder's no-mask embedding)."""
    return dense.shape[0] == 1 or dense.stride(0) == 0


def _repeat_each(x: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.repeat_interleave(x, n, dim=0)`` as a view when x has batch size 1."""
    return x.unsqueeze(1).expand(x.shape[0], n, *x.shape[1:]).reshape(-1, *x.shape[1:])


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (optional final sigmoid)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x
