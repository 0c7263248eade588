"""SamAutomaticMaskGenerator: segment everything by prompting SAM with a grid of points.

Same constructor arguments and ``generate`` records as ``segment_anything``. The point loop
runs on the model's device and queues the decoder on every batch of points without a host
sync, keeping each candidate's low-resolution logits and predicted IoU. Once per crop (or
every ``_COMPACT_EVERY`` candidates) one ``nonzero`` picks the candidates passing
``pred_iou_thresh``, and only those are upscaled to full resolution and scored (stability,
box, crop-edge test) in chunks of ``3 * points_per_batch`` rows (the last chunk padded when
the scoring is compiled, so it sees one shape); a second ``nonzero`` keeps the accepted
ones. Candidates are de-duplicated (our own batched NMS, no torchvision) after the loop, and
full-resolution masks are rebuilt from the low-res logits only for the survivors, then
run-length encoded, or for 'binary_mask' output without ``min_mask_region_area`` copied to
the host as they are. COCO RLE and ``min_mask_region_area`` (OpenCV) run on the CPU.

Host syncs are kept to those that decide shapes or need host work: on CUDA, host-to-device
copies go through page-locked memory without blocking (``to_device``), and for one crop with
'binary_mask' output a ``generate`` call waits for the GPU five times: the image upload
(before any GPU work), the two ``nonzero`` above (one without ``pred_iou_thresh``), the IoU
matrix of the NMS (its greedy pass runs on the host) and once at the end, for all the
device-to-host copies of the output.
"""
import functools
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import validation
from .modeling.sam import _masks_from_logits
from .predictor import SamPredictor, module_dtype
from .utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
    to_device,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

# Candidates (3 per point) queued on the device before they are filtered and scored (two host
# syncs): a 32x32 grid, 0.8 GB of float32 256x256 logits (twice that while they are joined).
_COMPACT_EVERY = 3072


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _near_crop_edge(boxes: torch.Tensor, crop_box: List[int], orig_size, atol: float = 20.0) -> torch.Tensor:
    """``is_box_near_crop_edge`` with Python-scalar edges (no host-to-device copy)."""
    x0, y0 = crop_box[0], crop_box[1]
    orig_box = (0, 0, orig_size[1], orig_size[0])
    offsets = (x0, y0, x0, y0)
    near = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for k in range(4):
        b = (boxes[:, k] + offsets[k]).float()
        near |= ((b - crop_box[k]).abs() <= atol) & ~((b - orig_box[k]).abs() <= atol)
    return near


def _render_masks(model, low_res: torch.Tensor, input_size, image_size, count: bool,
                  masks_fn=_masks_from_logits):
    """Full-resolution bool masks of (N, h, w) low-res logits, with their pixel counts (int64)
    when ``count`` (else None). Compiled, the image-resolution float logits are thresholded and
    counted as they are computed, never written out (inductor still materializes the first,
    model-input-sized upscale); ``masks_fn``: ``fused_postprocess.masks_from_logits`` for
    ``postprocess="triton"``."""
    masks = masks_fn(model, low_res[:, None], input_size, image_size, False)[:, 0]
    return masks, (masks.flatten(1).sum(1) if count else None)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor's copy into page-locked host memory, queued without blocking: not to be
    read before the stream is synchronized. Host tensors are returned as they are."""
    if not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _mask_scores(model, low_res: torch.Tensor, input_size, image_size, offset: float):
    """Stability scores and XYXY boxes of the full-resolution masks of (N, h, w) low-res
    logits (the masks themselves are not returned)."""
    masks = model.postprocess_masks(low_res.float()[:, None], input_size, image_size)[:, 0]
    thr = model.mask_threshold
    return calculate_stability_score(masks, thr, offset), batched_mask_to_box(masks > thr)


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image (see ``segment_anything.SamAutomaticMaskGenerator``).

    Arguments are the original's: ``points_per_side`` (or explicit ``point_grids`` in [0, 1],
    one per crop layer), ``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``,
    ``stability_score_offset``, ``box_nms_thresh``, ``crop_n_layers``, ``crop_nms_thresh``,
    ``crop_overlap_ratio``, ``crop_n_points_downscale_factor``, ``min_mask_region_area``
    (OpenCV) and ``output_mode`` ('binary_mask', 'uncompressed_rle' or 'coco_rle').
    If a batch of points runs out of GPU memory, the batch is halved and retried (with a
    warning); later batches keep the smaller size. ``generate_batch`` does the same with
    ``encoder_batch_size`` when the image encoder runs out of memory.

    ``postprocess_compile_mode`` (not in the original; a ``torch.compile`` mode or None for
    eager) compiles the candidates' scoring (upscale to full resolution, stability score,
    box) and the survivors' rendering (upscale, threshold, area), so the full-resolution
    logits are fused into the reductions instead of being written out; both are called on
    chunks of exactly ``3 * points_per_batch`` rows. ``postprocess="triton"`` (CUDA) runs both
    as our kernels instead (``fused_postprocess.mask_scores`` / ``masks_from_logits``: no
    full-resolution intermediate at all); ``postprocess_compile_mode`` must then be None.
    ``postprocess=None`` (the default) picks "triton" for a model on CUDA without
    ``postprocess_compile_mode`` (vit_h on an H200: scoring + rendering 7.5 ms instead of 12.5
    per image, the same masks), else "torch".
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        postprocess_compile_mode: Optional[str] = None,
        postprocess: Optional[str] = None,
    ) -> None:
        grids = validation.check_amg_params(
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
            stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh,
            crop_overlap_ratio, crop_n_points_downscale_factor, point_grids,
            min_mask_region_area, output_mode,
        )
        if points_per_side is not None:
            grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        self.point_grids = grids
        if output_mode == "coco_rle":
            try:
                from pycocotools import mask as _  # noqa: F401
            except ImportError as e:
                raise ImportError("output_mode='coco_rle' needs pycocotools: pip install pycocotools") from e
        if min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as e:
                raise ImportError("min_mask_region_area > 0 needs OpenCV: pip install opencv-python") from e

        from .compile import POSTPROCESS_BACKENDS

        if postprocess is None:
            on_cuda = model.device.type == "cuda"
            postprocess = "triton" if on_cuda and postprocess_compile_mode is None else "torch"
        if postprocess not in POSTPROCESS_BACKENDS:
            raise ValueError(f"postprocess must be 'torch' or 'triton', got {postprocess!r}.")
        if postprocess == "triton" and postprocess_compile_mode is not None:
            raise ValueError("postprocess='triton' runs our kernels uncompiled; pass "
                             "postprocess_compile_mode=None with it.")
        self._scores, self._render = _mask_scores, _render_masks
        if postprocess == "triton":
            from . import fused_postprocess
            from .triton_env import interpreting

            if model.device.type != "cuda" and not interpreting():
                raise ValueError("postprocess='triton' needs a model on CUDA; use postprocess='torch'.")

            self._scores = fused_postprocess.mask_scores
            self._render = functools.partial(_render_masks, masks_fn=fused_postprocess.masks_from_logits)
        elif postprocess_compile_mode is not None:
            from .compile import compile_function

            self._scores = compile_function(_mask_scores, postprocess_compile_mode)
            self._render = compile_function(_render_masks, postprocess_compile_mode)
        self._pad_chunks = postprocess_compile_mode is not None
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Mask records for an HxWx3 uint8 RGB image.

        Each record has ``segmentation`` (HxW bool array or RLE dict per ``output_mode``),
        ``area`` (int), ``bbox`` (XYWH), ``predicted_iou``, ``point_coords`` ([[x, y]]),
        ``stability_score`` and ``crop_box`` (XYWH). Without ``min_mask_region_area`` the
        'binary_mask' arrays are views of one host block (per call on CUDA, per batch of masks
        on the CPU), kept alive while any of them is referenced; ``.copy()`` the few you keep
        of many.
        """
        validation.check_image(image, "RGB", self.predictor.transform.target_length)
        return self._finish(self._generate_masks(image))

    @torch.no_grad()
    def generate_batch(self, images: List[np.ndarray], encoder_batch_size: int = 4) -> List[List[Dict[str, Any]]]:
        """``generate`` for a list of images, running the image encoder on up to
        ``encoder_batch_size`` images/crops per call. Every image is validated before any
        work. Batched encoder calls may differ from ``generate`` by float rounding."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise TypeError("generate_batch takes a list of images; for one image call generate(image).")
        validation._check_number(encoder_batch_size, "encoder_batch_size", lo=1, integer=True)
        images = list(images)
        target = self.predictor.transform.target_length
        for i, im in enumerate(images):
            try:
                validation.check_image(im, "RGB", target)
            except (TypeError, ValueError) as e:
                raise type(e)(f"images[{i}]: {e}") from None
        out = []
        for g in range(0, len(images), encoder_batch_size):
            group = images[g : g + encoder_batch_size]
            jobs = []  # (image index in group, crop box)
            for k, im in enumerate(group):
                for box in generate_crop_boxes(im.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)[0]:
                    if not self._degenerate(im, box):
                        jobs.append((k, tuple(box)))
            embeddings = {}
            j, step = 0, encoder_batch_size
            while j < len(jobs):
                chunk = jobs[j : j + step]
                crops = [group[k][b[1] : b[3], b[0] : b[2]] for k, b in chunk]
                try:
                    embs = self._embed(crops)
                except RuntimeError as e:
                    if not _is_oom(e):
                        raise
                    if step == 1:
                        raise RuntimeError(
                            "out of memory running the image encoder on a single image; use a smaller "
                            "model, a lower precision (bfloat16) or the CPU."
                        ) from e
                    step = max(1, step // 2)
                    warnings.warn(f"out of memory in the image encoder: retrying with encoder_batch_size={step}")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                embeddings.update(zip(chunk, embs))
                j += len(chunk)
            for k, im in enumerate(group):
                embs = {b: e for (kk, b), e in embeddings.items() if kk == k}
                out.append(self._finish(self._generate_masks(im, embs)))
        return out

    def _embed(self, crops: List[np.ndarray]):
        """One image-encoder call for several crops: [(features, input_size, crop_size)]."""
        pred = self.predictor
        model = pred.model
        inputs, sizes = [], []
        for c in crops:
            if model.image_format != "RGB":
                c = c[..., ::-1]
            t = pred.transform.apply_image_to(c, pred.device)[None]
            sizes.append((tuple(t.shape[-2:]), c.shape[:2]))
            inputs.append(model.preprocess(t.float()))
        x = torch.cat(inputs).to(module_dtype(model.image_encoder))
        feats = model.image_encoder(x)
        return [(feats[i : i + 1], *sizes[i]) for i in range(len(crops))]

    def _degenerate(self, image: np.ndarray, crop_box) -> bool:
        """Empty crop, or one that resizes to zero pixels (tiny/thin images; the original
        crashes there). The full-image layer already covers such a crop."""
        h, w = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
        if h < 1 or w < 1:
            return True
        return min(self.predictor.transform.get_preprocess_shape(h, w, self.predictor.transform.target_length)) < 1

    def _finish(self, data: MaskData) -> List[Dict[str, Any]]:
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return self._records(data)

    # ------------------------------------------------------------------ pipeline
    def _records(self, data: MaskData) -> List[Dict[str, Any]]:
        if "masks" in data:  # binary_mask output straight from the device (see _encode)
            segs, areas = data["masks"], data["areas"]
        else:
            rles = data["rles"]
            if self.output_mode == "coco_rle":
                segs = [coco_encode_rle(r) for r in rles]
            elif self.output_mode == "binary_mask":
                segs = [rle_to_mask(r) for r in rles]
            else:
                segs = rles
            areas = [area_from_rle(r) for r in rles]
        # Whole columns to Python lists at once (per-record indexing and copies cost ~20 us each).
        columns = zip(
            segs, areas, box_xyxy_to_xywh(np.asarray(data["boxes"])).tolist(), data["iou_preds"].tolist(),
            data["points"].tolist(), data["stability_score"].tolist(),
            box_xyxy_to_xywh(np.asarray(data["crop_boxes"])).tolist(),
        )
        return [
            {"segmentation": seg, "area": area, "bbox": box, "predicted_iou": iou, "point_coords": [point],
             "stability_score": stability, "crop_box": crop}
            for seg, area, box, iou, point, stability, crop in columns
        ]

    def _generate_masks(self, image: np.ndarray, embeddings: Optional[Dict] = None) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        crop_meta = []
        for ci, (crop_box, layer_idx) in enumerate(zip(crop_boxes, layer_idxs)):
            emb = None if embeddings is None else embeddings.get(tuple(crop_box))
            crop_data, meta = self._process_crop(image, crop_box, layer_idx, orig_size, ci, emb)
            crop_meta.append(meta)
            data.cat(crop_data)

        device = self.predictor.device
        if "boxes" not in data:
            data = MaskData(
                low_res=torch.empty(0), iou_preds=torch.empty(0), stability_score=torch.empty(0),
                boxes=torch.empty(0, 4, dtype=torch.int64), points=torch.empty(0, 2, dtype=torch.float64),
                crop_idx=torch.empty(0, dtype=torch.int64),
            )
        data["crop_boxes"] = torch.tensor(crop_boxes, dtype=torch.int64)[data["crop_idx"]]  # on the host, as crop_idx
        if len(crop_boxes) > 1 and len(data["boxes"]) > 0:
            # Remove duplicates between crops, preferring masks from smaller crops.
            scores = to_device(1 / box_area(data["crop_boxes"]), device)
            keep = batched_nms(
                data["boxes"].float(), scores, torch.zeros_like(scores, dtype=torch.int64), self.crop_nms_thresh
            )
            data.filter(keep)

        # binary_mask output without small-region cleanup needs no RLE: the masks are copied to
        # the host as they are (decoding RLEs costs ~0.2 ms per mask on the CPU).
        as_masks = self.output_mode == "binary_mask" and self.min_mask_region_area <= 0
        encoded = self._encode(data, crop_boxes, crop_meta, orig_size, as_masks)
        del data["low_res"]
        fields = {k: _host_copy(v) for k, v in data.items() if isinstance(v, torch.Tensor)}
        if device.type == "cuda":
            # The one wait for the output: every device-to-host copy queued above and by
            # _encode (same stream) has landed after it; nothing below reads the GPU.
            torch.cuda.current_stream(device).synchronize()
        for k, v in fields.items():
            data[k] = v.numpy()
        if as_masks:
            blocks, areas, order = encoded
            rows = [m for b in blocks for m in b.numpy()]  # views, in rendering order
            where = np.empty(len(order), dtype=np.int64)
            where[order] = np.arange(len(order))  # record -> rendered row
            data["masks"], data["areas"] = [rows[j] for j in where.tolist()], np.asarray(areas)[where].tolist()
        else:
            data["rles"] = encoded
        return data

    def _process_crop(self, image, crop_box, layer_idx, orig_size, crop_idx, embedding=None):
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = cropped.shape[:2]
        if self._degenerate(image, crop_box):
            return MaskData(), None
        if embedding is None:
            self.predictor.set_image(cropped)
        else:
            self.predictor._set_features(*embedding)
        meta = (self.predictor.input_size, crop_size)
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        # Both copies go to the device once per crop; the loop below only slices them.
        device = self.predictor.device
        points_t = to_device(points, device)
        coords_t = to_device(self.predictor.transform.apply_coords(points, crop_size), device)

        # Each step queues the decoder on one batch of points, or, once _COMPACT_EVERY candidates
        # are queued or every point is, filters and scores the queued candidates (_score_pending).
        data, pending, n_pending, start = MaskData(), [], 0, 0
        while start < len(points) or pending:
            try:
                if start < len(points) and n_pending < _COMPACT_EVERY:
                    end = start + self.points_per_batch
                    pending.append(self._process_batch(points_t[start:end], coords_t[start:end]))
                    start, n_pending = end, n_pending + len(pending[-1][1])
                else:
                    data.cat(self._score_pending(pending, crop_size, crop_box, orig_size))
                    pending, n_pending = [], 0
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
                if self.points_per_batch == 1:
                    raise RuntimeError(
                        "out of memory with points_per_batch=1; use a smaller image or model, or the CPU."
                    ) from e
                self.points_per_batch = max(1, self.points_per_batch // 2)
                warnings.warn(f"out of memory: retrying with points_per_batch={self.points_per_batch}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.predictor.reset_image()

        if "boxes" not in data or len(data["boxes"]) == 0:
            return MaskData(), meta
        # Remove duplicates within this crop.
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"],
            torch.zeros(len(data["boxes"]), dtype=torch.int64, device=data["boxes"].device), self.box_nms_thresh,
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_idx"] = torch.full((len(data["boxes"]),), crop_idx, dtype=torch.int64)
        return data, meta

    def _process_batch(self, points: torch.Tensor, coords: torch.Tensor):
        """Queue the decoder on one batch of point prompts (crop-frame ``points``, model-frame
        ``coords``): (low-res logits, predicted IoU, point) per candidate, on the device; no
        host sync and no host-to-device copy."""
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        low_res, iou = self.predictor._predict_low_res(coords[:, None, :], labels[:, None], None, None, True)
        return low_res.flatten(0, 1), iou.flatten(0, 1).float(), points.repeat_interleave(iou.shape[1], dim=0)

    def _score_pending(self, pending, crop_size, crop_box, orig_size) -> MaskData:
        """The accepted candidates of several queued batches (``_process_batch`` outputs), in
        order. One ``nonzero`` (host sync) selects those passing ``pred_iou_thresh``; only they
        are upscaled and scored, in chunks of ``3 * points_per_batch`` rows; a second keeps
        those passing the stability and crop-edge tests."""
        low_res, iou, points = (torch.cat(t) for t in zip(*pending))
        if self.pred_iou_thresh > 0.0:
            idx = torch.nonzero(iou > self.pred_iou_thresh)[:, 0]
        else:
            idx = torch.arange(len(iou), device=iou.device)
        n, step = len(idx), 3 * self.points_per_batch
        if n == 0:
            return MaskData()
        # A compiled _scores sees one shape: the last chunk is padded with a repeated row.
        rows = torch.cat([idx, idx[-1:].expand((-n) % step if self._pad_chunks else 0)])
        pred, offset = self.predictor, self.stability_score_offset
        # Outputs are cloned before the next call (a CUDA-graph replay would overwrite them).
        parts = [
            [t.clone() for t in self._scores(pred.model, low_res[r], pred.input_size, crop_size, offset)]
            for r in rows.split(step)
        ]
        stability, boxes = (torch.cat(t)[:n] for t in zip(*parts))
        keep = ~_near_crop_edge(boxes, crop_box, orig_size)
        if self.stability_score_thresh > 0.0:
            keep &= stability >= self.stability_score_thresh
        k = torch.nonzero(keep)[:, 0]
        idx = idx[k]
        return MaskData(
            low_res=low_res[idx], iou_preds=iou[idx], stability_score=stability[k], boxes=boxes[k], points=points[idx]
        )

    def _encode(self, data: MaskData, crop_boxes, crop_meta, orig_size, as_masks: bool = False):
        """Rebuild the survivors' full-resolution masks from their low-res logits (``_render``,
        compiled with ``postprocess_compile_mode``), crop by crop in chunks of one size.
        Returns their uncompressed RLEs (in record order), or with ``as_masks`` (blocks, areas,
        order): (k, H, W) bool host blocks holding the masks of records ``order[0], order[1],
        ...`` in turn, and their areas in that order.

        On CUDA with ``as_masks`` nothing here waits for the GPU: each chunk is copied with
        non_blocking=True (on a side stream, overlapping the next chunk's rendering) into one
        page-locked (n, H, W) block (a blocking copy per chunk would sync) and the areas are
        counted into one device tensor, copied once; neither may be read before the caller
        synchronizes the current stream. On the CPU the chunks are used in place and counted
        with numpy (~10x torch's count); the arrays are views of the blocks (1024 masks of
        480x640 on the 2-core CPU: 0.13 s instead of 1.3 s for an RLE round trip)."""
        n = len(data["boxes"])
        crop_idx = data["crop_idx"].numpy()
        order = np.argsort(crop_idx, kind="stable")  # records grouped by crop, in order
        if n == 0:
            return ([], np.zeros(0, np.int64), order) if as_masks else []
        orig_h, orig_w = orig_size
        model, low_res = self.predictor.model, data["low_res"]
        on_gpu = as_masks and low_res.is_cuda
        step = max(1, 3 * self.points_per_batch)
        if on_gpu:
            # Chunks of points_per_batch rows: while the GPU renders one, a side stream copies the
            # previous ones to the host (the copy engine runs beside the kernels). They are staged
            # in one device block, so that no CUDA-graph replay of _render overwrites a chunk
            # still being copied.
            dev, step = low_res.device, max(1, self.points_per_batch)
            main, copier = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
            staged = torch.empty((n, orig_h, orig_w), dtype=torch.bool, device=dev)
            host = torch.empty((n, orig_h, orig_w), dtype=torch.bool, pin_memory=True)
            areas = torch.empty(n, dtype=torch.int64, device=dev)
        blocks, counts, rles, start = [], [], [], 0
        for ci in np.unique(crop_idx).tolist():
            rows = order[start : start + int(np.count_nonzero(crop_idx == ci))]
            input_size, crop_size = crop_meta[ci]
            # A compiled _render sees one shape: the last chunk is padded with a repeated row.
            pad = (-len(rows)) % step if self._pad_chunks else 0
            rows_t = to_device(np.concatenate([rows, rows[-1:].repeat(pad)]), low_res.device)
            for lo in range(0, len(rows), step):
                k, at = min(step, len(rows) - lo), start + lo
                # Outputs are used before the next call (a CUDA-graph replay would overwrite them).
                masks, count = self._render(model, low_res[rows_t[lo : lo + step]], input_size, crop_size, on_gpu)
                masks = uncrop_masks(masks[:k], crop_boxes[ci], orig_h, orig_w)
                if on_gpu:
                    staged[at : at + k], areas[at : at + k] = masks, count[:k]
                    copier.wait_stream(main)
                    with torch.cuda.stream(copier):
                        host[at : at + k].copy_(staged[at : at + k], non_blocking=True)
                elif as_masks:
                    blocks.append(masks)
                    counts.append(np.count_nonzero(masks.numpy().reshape(k, -1), axis=1))
                else:
                    rles += mask_to_rle_pytorch(masks)
            start += len(rows)
        if on_gpu:
            main.wait_stream(copier)  # so the caller's one synchronize of the main stream covers the copies
            return [host], _host_copy(areas), order
        if as_masks:
            return blocks, np.concatenate(counts), order
        out: List[Any] = [None] * n
        for i, rle in zip(order.tolist(), rles):
            out[i] = rle
        return out

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill small holes / drop small islands in every mask, then re-run box NMS
        preferring unchanged masks. Edits ``mask_data`` in place (OpenCV, CPU)."""
        if len(mask_data["rles"]) == 0:
            return mask_data
        new_masks, scores = [], []
        for rle in mask_data["rles"]:
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(mask))
            scores.append(float(not (changed_holes or changed_islands)))
        masks = torch.stack(new_masks)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes), dtype=torch.int64), nms_thresh)
        changed = [int(i) for i in keep.tolist() if scores[i] == 0.0]
        if changed:
            for i, rle in zip(changed, mask_to_rle_pytorch(masks[changed])):
                mask_data["rles"][i] = rle
                mask_data["boxes"][i] = boxes[i].numpy() if isinstance(mask_data["boxes"], np.ndarray) else boxes[i]
        mask_data.filter(keep)
        return mask_data
