"""Helpers for automatic mask generation (same names and semantics as ``segment_anything``).

Everything here works on any torch device; ``batched_nms`` replaces torchvision's.
"""
import math
from copy import deepcopy
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Tuple

import numpy as np
import torch

_ALLOWED = (list, np.ndarray, torch.Tensor)


def to_device(data, device) -> torch.Tensor:
    """A host tensor or array on ``device``, without a host sync: onto CUDA through page-locked
    memory with non_blocking=True (a blocking copy, from pageable memory, waits for all queued
    GPU work; the caching host allocator keeps the pinned block until the copy has run)."""
    t = torch.as_tensor(data)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class MaskData:
    """Column store for per-mask data (tensors, arrays or lists) with filter / cat."""

    def __init__(self, **kwargs) -> None:
        for k, v in kwargs.items():
            self._check(k, v)
        self._stats = dict(kwargs)

    @staticmethod
    def _check(key: str, item: Any) -> None:
        if not isinstance(item, _ALLOWED):
            raise TypeError(
                f"MaskData[{key!r}] must be a list, numpy array or torch tensor, got {type(item).__name__}."
            )

    def __setitem__(self, key: str, item: Any) -> None:
        self._check(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep rows selected by a bool mask or an index tensor."""
        keep = torch.as_tensor(keep)
        keep_np, moved = None, {}  # keep copied once per device (each copy can sync)
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                if v.device not in moved:
                    moved[v.device] = keep.to(v.device)
                self._stats[k] = v[moved[v.device]]
            else:
                if keep_np is None:
                    keep_np = keep.detach().cpu().numpy()
                if isinstance(v, np.ndarray):
                    self._stats[k] = v[keep_np]
                elif keep_np.dtype == bool:
                    self._stats[k] = [a for a, m in zip(v, keep_np) if m]
                else:
                    self._stats[k] = [v[i] for i in keep_np.tolist()]

    def cat(self, new_stats: "MaskData") -> None:
        """Append the rows of ``new_stats`` (lists are copied; tensors/arrays are shared
        until the next ``cat``, which makes new ones)."""
        for k, v in new_stats.items():
            cur = self._stats.get(k)
            if cur is None:
                self._stats[k] = deepcopy(v) if isinstance(v, list) else v
            elif isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([cur, v.to(cur.device)], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([cur, v], axis=0)
            else:
                self._stats[k] = cur + deepcopy(v)

    def to_numpy(self) -> None:
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.detach().cpu().numpy()


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0
) -> torch.Tensor:
    """True for boxes touching a crop edge that is not also an image edge."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig_t[None, :], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(box_xyxy):
    """One XYXY box (tensor or array, last dim 4) -> XYWH copy."""
    box = deepcopy(box_xyxy)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    """Yield aligned slices of ``batch_size`` rows from each argument."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more inputs of the same length.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(args[0])
    for start in range(0, n, batch_size):
        yield [a[start : start + batch_size] for a in args]


def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """(B, H, W) bool masks -> uncompressed RLEs (column-major counts, pycocotools style).

    Vectorised: one ``nonzero`` and one device->host copy for the whole batch.
    """
    b, h, w = tensor.shape
    n = h * w
    if b == 0:
        return []
    flat = tensor.permute(0, 2, 1).reshape(b, n).bool()
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()  # (K, 2), row-major sorted
    rows, cols = change[:, 0], change[:, 1] + 1
    per_mask = torch.bincount(rows, minlength=b)
    # Boundaries per mask: 0, change positions..., n -> run lengths are their differences.
    stride = n + 1
    keys = torch.cat(
        [
            rows * stride + cols,
            torch.arange(b, device=flat.device) * stride,
            torch.arange(b, device=flat.device) * stride + n,
        ]
    )
    keys = torch.sort(keys)[0]
    bounds = keys % stride
    first = flat[:, 0]
    lengths = per_mask + 2  # boundaries per mask
    payload = torch.cat([bounds, first.to(bounds.dtype), lengths])
    payload = payload.cpu().numpy()
    nb = keys.numel()
    bounds_np, first_np, lengths_np = payload[:nb], payload[nb : nb + b], payload[nb + b :]
    runs = np.diff(bounds_np)
    out = []
    start = 0
    for i in range(b):
        ln = int(lengths_np[i])
        counts = runs[start : start + ln - 1].tolist()
        start += ln
        if first_np[i]:
            counts.insert(0, 0)
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(len(counts)) % 2).astype(bool)
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}*{w}={h * w}.")
    return flat.reshape(w, h).transpose()


def area_from_rle(rle: Dict[str, Any]) -> int:
    return sum(rle["counts"][1::2])


def calculate_stability_score(
    masks: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold +/- threshold_offset``."""
    inter = (masks > (mask_threshold + threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (masks > (mask_threshold - threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) grid of (x, y) points evenly spaced in [0, 1]^2 (cell centres)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """Point grids for crop layers 0..n_layers (layer i has n_per_side / scale**i points a side)."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes: the full image, then (2**i)**2 overlapping crops for layer i."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + to_device(torch.tensor([x0, y0, x0, y0]), boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    return points + to_device(torch.tensor([crop_box[0], crop_box[1]]), points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad crop-frame masks back to the (orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad = (x0, orig_w - x1, y0, orig_h - y1)
    return torch.nn.functional.pad(masks, pad, value=0)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (mode='holes') or drop islands (mode='islands') smaller than ``area_thresh``.

    Returns the mask and whether it changed. Uses OpenCV connected components (8-connectivity).
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    holes = mode == "holes"
    work = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(work, 8)
    sizes = stats[1:, -1]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with a str ``counts`` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (int64) of (..., H, W) bool masks; [0, 0, 0, 0] for empty masks."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device)
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, h, w).bool()
    rows = flat.any(dim=-1)  # (N, H)
    cols = flat.any(dim=-2)  # (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(dim=-1)
    top = torch.where(rows, ar_h, h).amin(dim=-1)
    right = (cols * ar_w).amax(dim=-1)
    left = torch.where(cols, ar_w, w).amin(dim=-1)
    empty = (right < left) | (bottom < top)
    out = torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)
    return out.reshape(*masks.shape[:-2], 4)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of XYXY boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms_keep_mask(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; returns kept indices in descending score order (stable for ties).

    IoUs are computed on the boxes' device in their dtype; the greedy pass runs on the host
    over the thresholded IoU matrix (one transfer), like torchvision's CUDA kernel.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    kept_sorted = []
    removed = np.zeros(n, dtype=bool)
    block = 1024  # bound the IoU matrix memory: rows are computed in blocks
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        if removed[r0:r1].all():
            continue
        # Only boxes ranked below row i can be suppressed by it: columns r0.. suffice.
        w = (torch.minimum(x2[r0:r1, None], x2[None, r0:]) - torch.maximum(x1[r0:r1, None], x1[None, r0:])).clamp_(min=0)
        h = (torch.minimum(y2[r0:r1, None], y2[None, r0:]) - torch.maximum(y1[r0:r1, None], y1[None, r0:])).clamp_(min=0)
        inter = w.mul_(h)
        iou = inter / (areas[r0:r1, None] + areas[None, r0:] - inter)
        over = np.triu((iou > iou_threshold).cpu().numpy(), 1)  # row i vs the boxes ranked below it
        tail = removed[r0:]
        # Greedy pass over the rows that suppress something (the others change nothing): a row
        # still standing when reached is kept and removes the boxes it overlaps.
        for i in np.flatnonzero(over.any(1)).tolist():
            if not tail[i]:
                tail |= over[i]
        kept_sorted.append(r0 + np.flatnonzero(~removed[r0:r1]))
    keep = to_device(np.concatenate(kept_sorted).astype(np.int64), order.device)
    return order[keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Same result as ``torchvision.ops.nms`` (kept indices, descending score)."""
    return _nms_keep_mask(boxes, scores, iou_threshold)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Per-category NMS giving exactly ``torchvision.ops.batched_nms``'s kept indices.

    Boxes are XYXY; boxes of different ``idxs`` never suppress each other. Mirrors
    torchvision's two strategies (coordinate offsets for small inputs, per-class NMS for
    large ones) so that float rounding and tie order agree.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    idxs = idxs.to(boxes.device)
    scores = scores.to(boxes.device)
    limit = 4000 if boxes.device.type == "cpu" else 100_000
    if boxes.numel() > limit:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            cur = torch.where(idxs == class_id)[0]
            keep_mask[cur[nms(boxes[cur], scores[cur], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    offsets = idxs.to(boxes) * (boxes.max() + 1)  # a Python 1: no host-to-device copy
    return nms(boxes + offsets[:, None], scores, iou_threshold)
