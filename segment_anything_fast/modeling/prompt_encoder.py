"""Prompt encoder: points, boxes and masks -> sparse and dense embeddings."""
import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm2d


class PromptEncoder(nn.Module):
    """Encodes prompts for SAM's mask decoder (same arguments and keys as the original).

    Coordinates may be float32 while the module runs in a lower precision: positional
    encodings are computed in float32 and cast to the module's dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings: int = 4  # negative point, positive point, 2 box corners
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def _dtype(self) -> torch.dtype:
        return self.no_mask_embed.weight.dtype

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def get_dense_pe(self) -> torch.Tensor:
        """(1, embed_dim, h, w) positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self._dtype())

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            n = points.shape[0]
            points = torch.cat(
                [points, torch.zeros((n, 1, 2), device=points.device, dtype=points.dtype)], dim=1
            )
            labels = torch.cat(
                [labels, torch.full((n, 1), -1, device=labels.device, dtype=labels.dtype)], dim=1
            )
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size).to(self._dtype())
        lab = labels[..., None]
        # Label -1: padding (not-a-point), 0: negative, 1: positive; others keep the bare PE.
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(lab == 0, emb + self.point_embeddings[0].weight, emb)
        emb = torch.where(lab == 1, emb + self.point_embeddings[1].weight, emb)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self._dtype())
        corner_embed = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )
        return emb + corner_embed

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks.to(self._dtype()))

    def _get_batch_size(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (B, N, embed_dim) and dense (B, embed_dim, h, w) embeddings."""
        bs = self._get_batch_size(points, boxes, masks)
        parts = [torch.empty((bs, 0, self.embed_dim), device=self._get_device(), dtype=self._dtype())]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random Gaussian spatial frequencies (computed in float32)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode (..., 2) float32 coords in [0, 1] -> (..., 2 * num_pos_feats) float32."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.float()
        coords = (2 * math.pi) * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """(C, h, w) float32 encoding of the centres of an h x w grid."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: Tuple[int, int]
    ) -> torch.Tensor:
        """Encode (B, N, 2) pixel (x, y) coords of an image of size (H, W); float32 out."""
        coords = coords_input.float()
        coords = torch.stack(
            [coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], dim=-1
        )
        return self._pe_encoding(coords)
