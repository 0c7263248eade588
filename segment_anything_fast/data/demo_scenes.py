"""Generated scenes sized for the demo model, and its point-prompt mIoU measurement.

Scenes come from :func:`synthetic_coco.make_scene` with the long side equal to the model's
``image_size`` (COCO-like aspect ratios), so images need no resizing, only padding.
The held-out set uses seeds that training never draws (``(seed, HELDOUT_OFFSET + i)``).
"""
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .coco_prompts import center_point, mask_iou
from .synthetic_coco import COCO_LIKE_SIZES, Scene, make_scene, write_scenes_coco

HELDOUT_OFFSET = 10_000_000
DEMO_OBJECTS = (3, 10)  # shapes drawn per scene (inclusive); occlusion can only drop some
MAX_OBJECTS = DEMO_OBJECTS[1]


def scene_size(rng: np.random.Generator, long_side: int):
    """(width, height) of a COCO-like aspect ratio with the given long side."""
    w, h = COCO_LIKE_SIZES[int(rng.integers(len(COCO_LIKE_SIZES)))]
    s = long_side / max(w, h)
    return max(round(w * s), 32), max(round(h * s), 32)


def demo_scene(seed: Sequence[int], long_side: int, min_area: int = 60) -> Scene:
    """One scene whose size depends only on ``seed``."""
    w, h = scene_size(np.random.default_rng([*seed, 7]), long_side)
    return make_scene(seed, w, h, num_objects=DEMO_OBJECTS, min_area=min_area)


def scene_arrays(seed: int, index: int, long_side: int):
    """Training arrays of scene ``(seed, index)``: image (3, H, W) uint8, masks (K, H, W) bool and
    center points (K, 2) float32; None for a scene without objects. Plain numpy, so cheap to
    send from a worker process."""
    sc = demo_scene((seed, index), long_side)
    if not sc.masks:
        return None
    centers = np.array([center_point(m) for m in sc.masks], dtype=np.float32)
    return np.ascontiguousarray(sc.image.transpose(2, 0, 1)), np.stack(sc.masks), centers


PACKED_META = 4 + 2 * MAX_OBJECTS  # slot, object count, h, w, then (x, y) per object


def pack_scene(arrays, size: int):
    """:func:`scene_arrays` output in one fixed-size form, cheap to send between processes and
    to the GPU in one copy: pixels (4, size, size) uint8, the image padded bottom-right and then
    a label map (0 background, j + 1 object j: the demo masks are visible parts, so disjoint),
    and meta (PACKED_META,) float32: [slot (set by the receiver), K, h, w, centers...]."""
    img, masks, centers = arrays
    k, (h, w) = masks.shape[0], img.shape[-2:]
    if k > MAX_OBJECTS:
        raise ValueError(f"scene has {k} objects; the packed form holds at most {MAX_OBJECTS}.")
    if h > size or w > size:
        raise ValueError(f"scene is {h}x{w}, larger than the packed size {size}.")
    if masks.sum(0, dtype=np.int32).max(initial=0) > 1:
        raise ValueError("scene masks overlap; the packed label map holds disjoint masks only.")
    px = np.zeros((4, size, size), np.uint8)
    px[:3, :h, :w] = img
    px[3, :h, :w] = (masks * np.arange(1, k + 1, dtype=np.uint8)[:, None, None]).max(0, initial=0)
    meta = np.zeros(PACKED_META, np.float32)
    meta[1:4] = k, h, w
    meta[4:4 + 2 * k] = centers.ravel()
    return px, meta


def packed_scene(seed: int, index: int, long_side: int):
    """:func:`pack_scene` of scene ``(seed, index)``; None for a scene without objects."""
    arrays = scene_arrays(seed, index, long_side)
    return None if arrays is None else pack_scene(arrays, long_side)


def one_thread_worker() -> None:
    """Initializer of scene worker processes: one thread each (OpenCV and torch default to all
    cores, which starves the training process when several workers run)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def heldout_scenes(n: int, long_side: int, seed: int = 0) -> List[Scene]:
    """The fixed held-out set: ``n`` scenes no training step sees."""
    return [demo_scene((seed, HELDOUT_OFFSET + i), long_side) for i in range(n)]


def write_heldout_coco(root: str, n: int, long_side: int, seed: int = 0,
                       split: str = "val2017") -> str:
    """Write ``heldout_scenes(n, long_side, seed)`` as a lossless COCO dataset under ``root``
    (PNG, RLE): ``experiments/eval_combo.py`` on it measures what :func:`point_prompt_ious`
    measures. Returns the annotation JSON path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return write_scenes_coco(root, heldout_scenes(n, long_side, seed), split,
                             f"demo held-out scenes: n={n}, long_side={long_side}, seed={seed}")


def heldout_of_checkpoint(path) -> Tuple[int, int, int]:
    """(n, long_side, seed) of the held-out set whose mIoU a ``scripts/train_demo.py``
    checkpoint reports (its meta's heldout_scenes and seed, its config's image_size)."""
    from ..build_sam import _read_checkpoint, _stored_config

    path = os.fspath(path)
    obj = _read_checkpoint(path, mmap=True)
    cfg = _stored_config(obj, path)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    try:
        n, seed = int(meta["heldout_scenes"]), int(meta["seed"])
    except (TypeError, KeyError, ValueError):
        n = seed = None
    if cfg is None or n is None:
        raise ValueError(
            f"{path!r} is not a scripts/train_demo.py checkpoint: it needs a 'config' entry and "
            "a 'meta' entry with 'heldout_scenes' and 'seed'.")
    return n, cfg.image_size, seed


@torch.no_grad()
def point_prompt_masks(sam, scenes: List[Scene]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(predicted, ground-truth) (K, H, W) bool masks of every scene with objects, one row per
    object, predicted from its center point.

    Protocol of ``experiments/eval_combo.py``: one positive point at the pixel farthest from the
    object boundary, ``multimask_output=True``, the output with the highest predicted IoU.
    """
    size = sam.image_encoder.img_size
    out = []
    for sc in scenes:
        h, w = sc.image.shape[:2]
        if max(h, w) != size:
            raise ValueError(f"scene long side {max(h, w)} != model image_size {size}.")
        if not sc.masks:
            continue
        img = torch.from_numpy(sc.image).permute(2, 0, 1).to(sam.device)
        emb = sam.image_encoder(sam.preprocess(img)[None])
        pts = torch.tensor([center_point(m) for m in sc.masks], dtype=torch.float32, device=sam.device)
        labels = torch.ones(len(sc.masks), 1, dtype=torch.int, device=sam.device)
        sparse, dense = sam.prompt_encoder(points=(pts[:, None], labels), boxes=None, masks=None)
        low, iou = sam.mask_decoder(
            image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )
        best = low[torch.arange(len(low)), iou.argmax(1)][:, None]
        masks = sam.postprocess_masks(best, (h, w), (h, w))[:, 0] > sam.mask_threshold
        out.append((masks.cpu(), torch.from_numpy(np.stack(sc.masks))))
    return out


def point_prompt_ious(sam, scenes: List[Scene]) -> torch.Tensor:
    """IoU of every GT object with the mask predicted from its center point
    (:func:`point_prompt_masks`)."""
    pairs = point_prompt_masks(sam, scenes)
    return torch.cat([mask_iou(pred, gt) for pred, gt in pairs]) if pairs else torch.zeros(0)
