"""The full SAM model: image encoder + prompt encoder + mask decoder."""
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """Predicts object masks from an image and prompts (same API as ``segment_anything.Sam``)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self._pixel_stats = (tuple(float(v) for v in pixel_mean), tuple(float(v) for v in pixel_std))
        self.register_buffer("pixel_mean", torch.empty(0), False)
        self.register_buffer("pixel_std", torch.empty(0), False)
        self.init_nonpersistent_buffers()
        self._masks_fn = _masks_from_logits  # compiled by compile.compile_postprocess

    def masks_from_logits(
        self, low_res: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...],
        return_logits: bool = False,
    ) -> torch.Tensor:
        """:meth:`postprocess_masks`, then ``> mask_threshold`` unless ``return_logits``: the
        predictor's last step (one fused kernel once ``compile.compile_postprocess`` ran)."""
        return self._masks_fn(self, low_res, input_size, original_size, return_logits)

    def init_nonpersistent_buffers(self, device=None) -> None:
        """(Re)create pixel_mean/pixel_std, e.g. after building on the meta device."""
        device = self.pixel_mean.device if device is None else device
        mean, std = self._pixel_stats
        self.pixel_mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.pixel_std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(
        self, batched_input: List[Dict[str, Any]], multimask_output: bool
    ) -> List[Dict[str, torch.Tensor]]:
        """End-to-end prediction for a list of images with prompts.

        Each record has 'image' (3xHxW, already resized so the long side is image_size),
        'original_size' (H, W) and optionally 'point_coords' (BxNx2), 'point_labels' (BxN),
        'boxes' (Bx4), 'mask_inputs' (Bx1x256x256), in the resized frame. Returns per image
        'masks' (BxCxHxW bool at original size), 'iou_predictions' (BxC), 'low_res_logits'.
        """
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input], dim=0)
        image_embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes", None), masks=record.get("mask_inputs", None)
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, input_size=record["image"].shape[-2:], original_size=record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Upscale (B, C, h, w) logits to image_size, crop the padding, resize to original_size.

        Half/bfloat16 logits are upcast to float32 first. Same values as upscaling everything
        and cropping, with less work: only the low-res rows/columns that reach the crop are
        upscaled (bilinear at an integer scale reads at most one row past them), and the
        final resize is skipped when it would be the identity.
        """
        if masks.dtype in (torch.float16, torch.bfloat16):
            masks = masks.float()
        size = self.image_encoder.img_size
        ih, iw = int(input_size[0]), int(input_size[1])
        h, w = masks.shape[-2], masks.shape[-1]
        if size % h == 0 and size // h == size // w and size % w == 0:
            s = size // h
            rh, rw = min(h, -(-ih // s) + 1), min(w, -(-iw // s) + 1)
            masks = F.interpolate(masks[..., :rh, :rw], scale_factor=s, mode="bilinear", align_corners=False)
        else:
            masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., :ih, :iw]
        oh, ow = int(original_size[0]), int(original_size[1])
        if (oh, ow) == (ih, iw):
            return masks
        return F.interpolate(masks, (oh, ow), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a 3xHxW image (in float32) and zero-pad it to image_size x image_size."""
        x = (x.float() - self.pixel_mean.float()) / self.pixel_std.float()
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))


def _masks_from_logits(sam: Sam, low_res, input_size, original_size, return_logits: bool):
    masks = sam.postprocess_masks(low_res, input_size, original_size)
    return masks if return_logits else masks > sam.mask_threshold
