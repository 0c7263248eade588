"""Resize images, points and boxes so that the longest image side matches the model input.

Matches ``segment_anything.utils.transforms`` without torchvision: numpy images are resized
with PIL's bilinear filter (what torchvision does for PIL images), tensors with
``F.interpolate(bilinear, antialias=True)``.
"""
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F


class ResizeLongestSide:
    """Resize to longest side ``target_length``; rescale coordinates and boxes alike."""

    def __init__(self, target_length: int) -> None:
        self.target_length = int(target_length)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """(H, W) after scaling the longest side of (oldh, oldw) to ``long_side_length``."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 image -> resized HxWxC uint8 image (PIL bilinear; a copy when the size
        does not change, which is what PIL returns then)."""
        new_h, new_w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if (new_h, new_w) == image.shape[:2] and image.dtype == np.uint8 and image.ndim in (2, 3):
            return np.array(image)
        pil = Image.fromarray(np.ascontiguousarray(image))
        return np.array(pil.resize((new_w, new_h), Image.BILINEAR))

    def apply_image_to(self, image: np.ndarray, device) -> torch.Tensor:
        """``apply_image`` of an HxWx3 uint8 image as a (3, H', W') uint8 tensor on ``device``.

        On CUDA an image that grows (or keeps its size) is uploaded as it is, without blocking,
        and resized there with PIL's arithmetic (``gpu_resize``: the same pixels as
        ``apply_image``), so the host does not spend the resize while the GPU waits. Images that
        shrink are resized by PIL on the host (Pillow picks the order of its two passes for
        those by rules we do not reproduce)."""
        from ..gpu_resize import resize_uint8
        from .amg import to_device

        new_h, new_w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        on_gpu = torch.device(device).type == "cuda" and image.dtype == np.uint8 and image.ndim == 3
        if on_gpu and new_h >= image.shape[0] and new_w >= image.shape[1]:
            resized = to_device(np.ascontiguousarray(image), device)
            if (new_h, new_w) != image.shape[:2]:
                resized = resize_uint8(resized, (new_h, new_w))
        else:
            resized = to_device(self.apply_image(image), device)
        return resized.permute(2, 0, 1).contiguous()

    def _scale(self, original_size: Tuple[int, ...]) -> Tuple[float, float]:
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Coordinates (..., 2) as (x, y) in the original (H, W) frame -> float64, resized frame."""
        sx, sy = self._scale(original_size)
        out = np.array(coords, dtype=float, copy=True)
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Boxes (B, 4) XYXY in the original frame -> (B, 4) float64 in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW float images -> resized (bilinear, antialiased). May differ slightly from
        ``apply_image``; the original computes the target size from dims 0 and 1 of the tensor,
        here the spatial dims are used (identical for the square images the original expects)."""
        new_size = self.get_preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, new_size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """Tensor version of ``apply_coords`` (returns float32)."""
        sx, sy = self._scale(original_size)
        out = coords.detach().clone().to(torch.float)
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
        return out

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """Tensor version of ``apply_boxes`` (returns float32, shape (B, 4))."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
