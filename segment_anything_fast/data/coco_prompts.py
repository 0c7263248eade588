"""COCO point-prompt evaluation data: center points, a DataLoader-ready dataset, mask IoU.

For every annotation the prompt is the point farthest from the object boundary (OpenCV
distance transform of the zero-padded mask, as in the SAM paper's point sampling), so it lies
inside the object even for rings and C shapes. Points are cached on disk by annotation id.
"""
import contextlib
import hashlib
import io
import json
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch


def center_point(mask: np.ndarray) -> Tuple[float, float]:
    """(x, y) of the pixel of ``mask`` farthest from its boundary (image edges count as boundary)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}.")
    if not m.any():
        raise ValueError("mask is empty: an annotation without pixels has no center point.")
    padded = np.pad((m > 0).astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU per mask of boolean (N, H, W) tensors; an empty union counts as IoU 1."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}.")
    p, g = pred.bool().flatten(1), gt.bool().flatten(1)
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def pack_masks(masks: List[torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """Bool (K, H, W) mask groups packed 8 pixels per byte (``np.packbits`` order), back to back,
    each mask column by column (pixel order (K, W, H): the dataset keeps its masks as such a
    transposed view of COCO's column-major masks, which then packs without a copy): (uint8
    bytes, number of pixels). 8x fewer bytes to copy to the GPU; :func:`unpack_mask_groups`."""
    flat = [np.asarray(torch.as_tensor(m).transpose(-1, -2), dtype=bool).reshape(-1) for m in masks]
    bits = np.concatenate(flat) if flat else np.zeros(0, dtype=bool)
    return torch.from_numpy(np.packbits(bits)), int(bits.size)


def unpack_masks(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The (n,) bool pixels of :func:`pack_masks`, in its order, on ``packed``'s device."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).flatten()[:n].bool()


def unpack_mask_groups(packed: torch.Tensor, n: int, shapes: List[Tuple[int, int, int]]) -> List[torch.Tensor]:
    """The (K, H, W) bool mask groups of :func:`pack_masks` (``shapes``, in order), on
    ``packed``'s device: views of one unpacked buffer."""
    flat = unpack_masks(packed, n)
    out, o = [], 0
    for k, h, w in shapes:
        out.append(flat[o:o + k * h * w].view(k, w, h).transpose(1, 2))
        o += k * h * w
    return out


def load_coco(annotations: str):
    """``pycocotools.coco.COCO`` for ``annotations`` (quiet), with a clear error when missing."""
    from pycocotools.coco import COCO

    if not os.path.isfile(annotations):
        raise FileNotFoundError(
            f"Annotation file {annotations!r} not found. Generate one with "
            "`python scripts/make_synthetic_coco.py --output DIR` or pass --annotations.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(annotations)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{annotations!r} is not a COCO instances file: {e}") from e


def select_annotations(coco, image_ids: List[int]) -> Dict[int, List[dict]]:
    """Non-crowd annotations per image; raises ValueError naming annotations without segmentation."""
    per_image, bad = {}, []
    for img_id in image_ids:
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a.get("iscrowd", 0)]
        for a in anns:
            if not a.get("segmentation"):
                bad.append(a.get("id"))
        per_image[img_id] = anns
    if bad:
        raise ValueError(
            f"{len(bad)} annotation(s) have no 'segmentation' (ids {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}); point-prompt mIoU needs a mask for every "
            "annotation. Fix or remove them from the annotation file.")
    return per_image


class CenterPointCache:
    """On-disk JSON map annotation id -> (x, y), keyed by the annotation file's identity."""

    def __init__(self, cache_dir: Optional[str], annotations: str):
        self.path = None
        self.points: Dict[int, Tuple[float, float]] = {}
        if cache_dir is None:
            return
        st = os.stat(annotations)
        key = f"{os.path.abspath(annotations)}|{st.st_size}|{st.st_mtime_ns}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.path = os.path.join(cache_dir, f"center_points_{digest}.json")
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.points = {int(k): tuple(v) for k, v in json.load(f).items()}
            except (ValueError, OSError):
                self.points = {}  # a corrupt cache is rebuilt

    def update(self, new: Dict[int, Tuple[float, float]]) -> None:
        self.points.update(new)

    def save(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({str(k): list(v) for k, v in self.points.items()}, f)
        os.replace(tmp, self.path)


class CocoPointPromptDataset(torch.utils.data.Dataset):
    """One item per image: resized uint8 image, transformed center points, GT masks.

    Items are dicts with ``image`` (3, h, w) uint8 resized so the long side is
    ``image_size`` (with ``resize=False``: the decoded (3, H, W) image, its memory (H, W, 3), for
    ``fused_preprocess.pack_images`` to resize on the GPU), ``input_size`` (h, w) the resized size,
    ``original_size`` (H, W), ``points`` (K, 2) float in resized coordinates, ``gt_masks``
    (K, H, W) bool (a transposed view of (K, W, H) memory), ``ann_ids``, ``new_points`` (center
    points computed because the cache missed them), ``image_id``, ``file_name``, and ``error`` (None, or why the image
    could not be read; then the tensors are empty).
    """

    def __init__(self, coco, image_dir: str, image_ids: List[int], anns: Dict[int, List[dict]],
                 image_size: int, cached_points: Optional[Dict[int, Tuple[float, float]]] = None,
                 resize: bool = True):
        from segment_anything_fast.utils.transforms import ResizeLongestSide

        self.coco = coco
        self.image_dir = image_dir
        self.image_ids = list(image_ids)
        self.anns = anns
        self.transform = ResizeLongestSide(image_size)
        self.cached = dict(cached_points or {})
        self.resize = resize

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        img_id = self.image_ids[i]
        info = self.coco.loadImgs(img_id)[0]
        path = os.path.join(self.image_dir, info["file_name"])
        item = {"image_id": img_id, "file_name": path, "error": None, "new_points": {}}
        bgr = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
        if bgr is None:
            item["error"] = "missing file" if not os.path.isfile(path) else "unreadable image"
            return item
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        rles = []
        for a in self.anns[img_id]:
            rle = self.coco.annToRLE(a)
            if tuple(rle["size"]) != (h, w):
                item["error"] = (f"annotation {a['id']} mask is {rle['size'][1]}x{rle['size'][0]} but the "
                                 f"image is {w}x{h}")
                return item
            rles.append(rle)
        # all masks in one decode: (h, w, K) column-major, i.e. (K, w, h) rows of 0 / 1 bytes
        from pycocotools import mask as mask_utils

        masks = mask_utils.decode(rles).T.view(np.bool_) if rles else np.zeros((0, w, h), bool)
        keep = masks.any(axis=(1, 2))  # degenerate annotations: nothing to segment
        if not keep.all():
            masks = masks[keep]
        pts, ids = [], []
        for a, m in zip((a for a, k in zip(self.anns[img_id], keep) if k), masks):
            p = self.cached.get(a["id"])
            if p is None:
                p = center_point(m.T)
                item["new_points"][a["id"]] = p
            pts.append(p)
            ids.append(a["id"])
        if self.resize:
            image = np.array(self.transform.apply_image(image), dtype=np.uint8, copy=True)
        item["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        item["input_size"] = self.transform.get_preprocess_shape(h, w, self.transform.target_length)
        item["original_size"] = (h, w)
        coords = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        item["points"] = torch.from_numpy(self.transform.apply_coords(coords, (h, w))).float()
        # (K, H, W) as a transposed view: no row-major copy of each mask here (pack_masks)
        item["gt_masks"] = torch.from_numpy(masks).transpose(1, 2)
        item["ann_ids"] = ids
        return item
