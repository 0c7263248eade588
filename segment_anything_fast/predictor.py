"""SamPredictor: embed an image once, then predict masks for many prompts.

Same API and outputs as ``segment_anything.SamPredictor``; also runs models whose weights
are bfloat16/float16 (inputs are cast where they enter the model, outputs returned as
float32 scores/logits and bool masks). Inputs are checked by ``validation``.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from . import validation
from .utils.amg import to_device
from .utils.transforms import ResizeLongestSide

_NOT_SET = "An image must be set with .set_image(...) before mask prediction."


def module_dtype(module: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """dtype of the first floating-point parameter of ``module``."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class SamPredictor:
    """Predict masks for prompts on one image, reusing its image embedding."""

    def __init__(self, sam_model) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 image given in ``image_format`` ('RGB' or 'BGR')."""
        validation.check_image(image, image_format, self.transform.target_length)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        self._set_torch_image(self.transform.apply_image_to(image, self.device)[None], image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Embed a 1x3xHxW image already resized with ``transform`` (long side = model input)."""
        size = validation.check_torch_image(
            transformed_image, original_image_size, self.model.image_encoder.img_size, self.device
        )
        self._set_torch_image(transformed_image, size)

    @torch.no_grad()
    def _set_torch_image(self, transformed_image: torch.Tensor, original_image_size) -> None:
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        x = self.model.preprocess(transformed_image.float())
        x = x.to(module_dtype(self.model.image_encoder))
        self.features = self.model.image_encoder(x)
        self.is_image_set = True

    def _set_features(self, features: torch.Tensor, input_size, original_size) -> None:
        """Install a precomputed 1xCxhxw embedding (e.g. from a batched encoder call)."""
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_size)
        self.input_size = tuple(int(s) for s in input_size)
        self.features = features
        self.is_image_set = True

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for numpy prompts in original-image pixels.

        point_coords Nx2 (x, y) with point_labels N (1 fg, 0 bg); box [x0, y0, x1, y1];
        mask_input 1x256x256 low-res logits from a previous call. Returns masks CxHxW
        (bool, or float32 logits if ``return_logits``), scores C (float32) and low-res
        logits Cx256x256 (float32); C is 3 with ``multimask_output`` else 1.
        """
        if not self.is_image_set:
            raise RuntimeError(_NOT_SET)
        coords, labels = validation.check_points(point_coords, point_labels)
        box = validation.check_box(box)
        mask_input = validation.check_mask_input(mask_input, self.model.prompt_encoder.mask_input_size)
        if coords is None and box is None and mask_input is None:
            raise ValueError("predict() needs a prompt: pass point_coords + point_labels, a box, or mask_input.")

        # through page-locked memory: a pageable copy to CUDA would wait for set_image's
        # encoder, and the decoder could not be queued behind it
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = to_device(np.asarray(coords, np.float32), self.device)[None]
            labels_t = to_device(np.asarray(labels, np.int32), self.device)[None]
        if box is not None:
            box = self.transform.apply_boxes(box, self.original_size)
            box_t = to_device(np.asarray(box, np.float32), self.device)
        if mask_input is not None:
            mask_t = to_device(np.asarray(mask_input, np.float32), self.device)[None]

        masks, scores, low_res = self._predict(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits)
        return masks[0].cpu().numpy(), scores[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched masks for tensor prompts already in the model's input frame.

        point_coords BxNx2 and point_labels BxN (1 fg, 0 bg, -1 padding), boxes Bx4 XYXY,
        mask_input Bx1x256x256 (transform coords/boxes with ``transform.apply_*_torch``).
        Returns masks BxCxHxW (bool, or float32 logits), scores BxC and low-res logits
        BxCx256x256 (float32). Prompt values (NaN, labels, box order) are checked only for CPU
        tensors: on a GPU each check would be a host sync waiting for the image encoder.
        """
        if not self.is_image_set:
            raise RuntimeError(_NOT_SET)
        validation.check_prompts_torch(
            point_coords, point_labels, boxes, mask_input, self.model.prompt_encoder.mask_input_size, self.device
        )
        if point_coords is None and boxes is None and mask_input is None:
            raise ValueError("predict_torch() needs a prompt: point_coords + point_labels, boxes, or mask_input.")
        try:
            return self._predict(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits)
        except torch.OutOfMemoryError as e:
            batch = next(t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None)
            h, w = self.original_size
            raise torch.OutOfMemoryError(
                f"out of memory predicting {batch} prompt(s) with masks of {h}x{w} pixels: split the "
                "prompts into smaller batches, or pass a downscaled image to set_image(). "
                f"Original error: {e}"
            ) from e

    def _predict(self, coords, labels, boxes, mask_input, multimask_output, return_logits):
        low_res, scores = self._predict_low_res(coords, labels, boxes, mask_input, multimask_output)
        masks = self.model.masks_from_logits(low_res, self.input_size, self.original_size, return_logits)
        return masks, scores.float(), low_res.float()

    @torch.no_grad()
    def _predict_low_res(self, coords, labels, boxes, mask_input, multimask_output):
        """Unchecked decoder call: (low-res logits, scores) in the model's dtype."""
        if mask_input is not None:
            mask_input = mask_input.to(module_dtype(self.model.prompt_encoder))
        sparse, dense = self.model.prompt_encoder(
            points=(coords, labels) if coords is not None else None, boxes=boxes, masks=mask_input
        )
        return self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def get_image_embedding(self) -> torch.Tensor:
        """The 1xCxhxw embedding of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features
