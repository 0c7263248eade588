"""Central input validation for the predictor, the automatic mask generator and the CLIs.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (wrong shape,
dtype or value) with a message that says what was wrong and how to fix it. Checks return
the (possibly normalised) input so callers can write ``x = check_x(x)``.

Finite point coordinates and boxes outside the image are accepted, as in the original
``segment_anything`` (the prompt encoder extrapolates); NaN/inf values, boxes with
x1 < x0 or y1 < y0, and labels other than 0/1 (or -1 = padding in ``predict_torch``) are
rejected. Documented limits: images up to ``MAX_PIXELS`` (2**31 - 1) pixels, AMG
``points_per_side`` <= ``MAX_POINTS_PER_SIDE`` (1024) and ``crop_n_layers`` <=
``MAX_CROP_N_LAYERS`` (6). ``check_output_path`` and ``explain_os_error`` serve the CLIs
(output path usable before any work; "disk full" / "no permission" messages).
"""
import errno
import numbers
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_FORMATS = ("RGB", "BGR")
OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MAX_PIXELS = 2**31 - 1  # torch kernels index masks with int32 in places
# AMG bounds that keep memory and run time finite: a 1024x1024 point grid is already 1M
# decoder calls per crop, and crop layer i has 4**i crops (layer 6: 4096 encoder runs).
MAX_POINTS_PER_SIDE = 1024
MAX_CROP_N_LAYERS = 6


def _kind(x) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_image_format(image_format: str) -> str:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
    return image_format


def check_image(image, image_format: str = "RGB", target_length: Optional[int] = None) -> np.ndarray:
    """An HxWx3 uint8 numpy image (values 0..255)."""
    check_image_format(image_format)
    if isinstance(image, torch.Tensor):
        raise TypeError(
            "image must be a numpy array (HxWx3 uint8), got a torch.Tensor; pass "
            "tensor.cpu().numpy(), or use set_torch_image() for an already transformed 1x3xHxW tensor."
        )
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a numpy array of shape HxWx3 and dtype uint8, got {_kind(image)}; "
            "load images with e.g. np.asarray(PIL.Image.open(path).convert('RGB'))."
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(
            f"image is grayscale (shape {image.shape}); SAM needs 3 channels: pass "
            "np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2) or "
            "cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)."
        )
    if image.ndim != 3:
        raise ValueError(
            f"image must have shape HxWx3, got {image.ndim} dimensions {image.shape}"
            + ("; for a batch, call once per image." if image.ndim == 4 else ".")
        )
    if image.shape[2] == 4:
        raise ValueError(
            f"image has 4 channels (RGBA, shape {image.shape}); drop the alpha channel with image[..., :3]."
        )
    if image.shape[2] != 3:
        raise ValueError(
            f"image must have 3 colour channels in the last axis (HxWx3), got shape {image.shape}"
            + ("; it looks channels-first, pass image.transpose(1, 2, 0)." if image.shape[0] == 3 else ".")
        )
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"image is empty (shape {image.shape}); pass an image with at least 1x1 pixels.")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            bad = "" if np.isfinite(image).all() else " containing NaN/inf values"
            raise ValueError(
                f"image must be uint8 (0..255), got {image.dtype}{bad}; convert floats in [0, 1] with "
                "(np.nan_to_num(image).clip(0, 1) * 255).round().astype(np.uint8)."
            )
        if image.dtype == np.uint16:
            raise ValueError(
                "image must be 8-bit uint8, got 16-bit uint16; scale it with (image >> 8).astype(np.uint8)."
            )
        raise ValueError(
            f"image must be uint8 (0..255), got {image.dtype}; convert with "
            "np.clip(image, 0, 255).astype(np.uint8) if its values are already in 0..255."
        )
    if h * w > MAX_PIXELS:
        raise ValueError(f"image of {h}x{w} pixels is too large (max {MAX_PIXELS} pixels); downscale it first.")
    if target_length is not None:
        scale = target_length / max(h, w)
        if int(h * scale + 0.5) < 1 or int(w * scale + 0.5) < 1:
            raise ValueError(
                f"image of {h}x{w} pixels has too extreme an aspect ratio: resized to long side "
                f"{target_length} one side becomes 0 pixels; crop or pad it first."
            )
    return image


def check_torch_image(image, original_size, img_size: int, device) -> Tuple[int, int]:
    """A 1x3xHxW tensor with long side ``img_size`` on ``device``; returns original (H, W)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"transformed_image must be a torch.Tensor (1x3xHxW), got {_kind(image)}; "
                        "for numpy images use set_image().")
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(
            f"transformed_image must have shape 1x3xHxW, got {tuple(image.shape)}; "
            "use predictor.transform.apply_image_torch(...) on a 1x3xHxW tensor."
        )
    if max(image.shape[2:]) != img_size or min(image.shape[2:]) < 1:
        raise ValueError(
            f"transformed_image must have long side {img_size}, got {tuple(image.shape[2:])}; "
            "resize it with predictor.transform.apply_image_torch(...)."
        )
    if not _same_device(image.device, device):
        raise ValueError(f"transformed_image is on {image.device} but the model is on {device}; "
                         "move it with .to(predictor.device).")
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError("transformed_image contains NaN or inf values; replace them (e.g. torch.nan_to_num).")
    return check_size(original_size, "original_image_size")


def check_size(size, name: str = "size") -> Tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
        ok = all(float(s) == int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of ints (H, W), got {size!r}.") from None
    if not ok or h < 1 or w < 1:
        raise ValueError(f"{name} must be two positive ints (H, W), got {tuple(size)!r}.")
    return h, w


def _as_float_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise ValueError(f"{name} is a tensor on the meta device (no data); pass real values.")
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array, got {_kind(x)}.") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values; pass finite pixel coordinates.")
    return arr


def check_points(point_coords, point_labels) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Nx2 (x, y) pixel coordinates and N labels (1 foreground, 0 background) for ``predict``."""
    if point_coords is None:
        if point_labels is not None:
            raise ValueError("point_labels given without point_coords; pass both or neither.")
        return None, None
    if point_labels is None:
        raise ValueError(
            "point_coords given without point_labels; pass point_labels with one label per point "
            "(1 = foreground, 0 = background), e.g. np.ones(len(point_coords))."
        )
    coords = _as_float_array(point_coords, "point_coords")
    if coords.ndim == 1 and coords.shape == (2,):
        raise ValueError("point_coords must have shape Nx2; for one point pass np.array([[x, y]]).")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"point_coords must have shape Nx2 (x, y), got {coords.shape}.")
    if coords.shape[0] == 0:
        raise ValueError("point_coords is empty; pass at least one point, or point_coords=None.")
    labels = _as_float_array(point_labels, "point_labels")
    if labels.ndim != 1:
        raise ValueError(f"point_labels must have shape (N,), got {labels.shape}.")
    if labels.shape[0] != coords.shape[0]:
        raise ValueError(
            f"point_coords has {coords.shape[0]} points but point_labels has {labels.shape[0]} labels; "
            "pass one label per point."
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(
            f"point_labels must be 0 (background) or 1 (foreground), got {sorted(set(labels.tolist()))}."
        )
    return coords, labels


def check_box(box) -> Optional[np.ndarray]:
    """One XYXY box (shape (4,) or (1, 4)) for ``predict``."""
    if box is None:
        return None
    arr = _as_float_array(box, "box")
    if arr.ndim == 2 and arr.shape[0] > 1 and arr.shape[1] == 4:
        raise ValueError(
            f"predict() takes one box, got {arr.shape[0]}; for several boxes use predict_torch() with "
            "boxes=predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), predictor.original_size)."
        )
    if arr.size == 0:
        raise ValueError("box is empty; pass a box [x0, y0, x1, y1] or box=None.")
    if arr.shape not in ((4,), (1, 4)):
        raise ValueError(f"box must have shape (4,) as [x0, y0, x1, y1], got {arr.shape}.")
    _check_box_order(arr.reshape(-1, 4), "box")
    return arr


def _check_box_order(boxes: np.ndarray, name: str) -> None:
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be XYXY with x1 >= x0 and y1 >= y0, got {boxes[i].tolist()}"
            + (f" (row {i})" if len(boxes) > 1 else "")
            + "; if it is XYWH convert with [x, y, x + w, y + h]."
        )


def check_mask_input(mask_input, mask_size: Tuple[int, int]) -> Optional[np.ndarray]:
    """Low-res mask logits of shape 1xHxW (H, W = ``mask_size``) for ``predict``."""
    if mask_input is None:
        return None
    arr = _as_float_array(mask_input, "mask_input")
    h, w = mask_size
    if arr.shape == (h, w):
        raise ValueError(f"mask_input must have shape 1x{h}x{w}, got {arr.shape}; pass mask_input[None].")
    if arr.ndim == 3 and arr.shape[1:] == (h, w) and arr.shape[0] > 1:
        raise ValueError(
            f"mask_input must have shape 1x{h}x{w}, got {arr.shape}; pass one of the low-res logits "
            "returned by predict(), e.g. logits[np.argmax(scores)][None]."
        )
    if arr.shape != (1, h, w):
        raise ValueError(
            f"mask_input must have shape 1x{h}x{w} (the low-res logits returned by predict()), got {arr.shape}."
        )
    return arr


def check_prompts_torch(
    point_coords, point_labels, boxes, mask_input, mask_size: Tuple[int, int], device
) -> None:
    """Batched prompt tensors for ``predict_torch`` (already in the model's input frame).

    Shapes, dtypes and devices are always checked; the values (NaN/inf, label values, box
    order) only of tensors on the CPU: on a GPU each such check is a host sync that would stall
    the caller until the image encoder has finished (``predict`` checks every value)."""
    dev = torch.device(device)
    batch = {}

    def tensor(x, name):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_kind(x)}; use predict() for numpy inputs.")
        if not _same_device(x.device, dev):
            raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move it with .to(predictor.device).")
        if x.is_floating_point() and x.device.type == "cpu" and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values.")
        batch[name] = x.shape[0] if x.ndim else None

    if (point_coords is None) != (point_labels is None):
        raise ValueError("point_coords and point_labels must be given together (or both None).")
    if point_coords is not None:
        tensor(point_coords, "point_coords")
        tensor(point_labels, "point_labels")
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
            raise ValueError(f"point_coords must have shape BxNx2, got {tuple(point_coords.shape)}.")
        if point_coords.shape[0] == 0 or point_coords.shape[1] == 0:
            raise ValueError(f"point_coords is empty (shape {tuple(point_coords.shape)}); pass at least one point.")
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise ValueError(
                f"point_labels must have shape BxN = {tuple(point_coords.shape[:2])} to match point_coords, "
                f"got {tuple(point_labels.shape)}."
            )
        if point_labels.dtype == torch.bool:
            raise ValueError(f"point_labels must be integers, got dtype {point_labels.dtype}.")
        if point_labels.device.type == "cpu":
            if point_labels.is_floating_point() and not bool((point_labels == point_labels.round()).all()):
                raise ValueError(f"point_labels must be integers, got dtype {point_labels.dtype}.")
            bad = ~((point_labels == 0) | (point_labels == 1) | (point_labels == -1))
            if bool(bad.any()):
                raise ValueError(
                    "point_labels must be 1 (foreground), 0 (background) or -1 (padding, ignored), got "
                    f"{sorted(set(point_labels[bad].tolist()))}."
                )
    if boxes is not None:
        tensor(boxes, "boxes")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape Bx4 (XYXY), got {tuple(boxes.shape)}.")
        if boxes.shape[0] == 0:
            raise ValueError("boxes is empty (shape 0x4); pass at least one box or boxes=None.")
        if boxes.device.type == "cpu":
            _check_box_order(boxes.detach().float().numpy(), "boxes")
    if mask_input is not None:
        tensor(mask_input, "mask_input")
        h, w = mask_size
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, h, w):
            raise ValueError(f"mask_input must have shape Bx1x{h}x{w}, got {tuple(mask_input.shape)}.")
    sizes = {k: v for k, v in batch.items() if k != "point_labels"}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "prompt batch sizes differ: " + ", ".join(f"{k} has {v}" for k, v in sizes.items())
            + "; every prompt tensor needs the same first dimension B."
        )


def _check_number(value, name: str, lo=None, hi=None, integer=False, lo_open=False, allow_none=False):
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}.")
    if not integer and not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}.")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}.")


def check_amg_params(
    points_per_side: Optional[int],
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    box_nms_thresh: float,
    crop_n_layers: int,
    crop_nms_thresh: float,
    crop_overlap_ratio: float,
    crop_n_points_downscale_factor: int,
    point_grids: Optional[Sequence[np.ndarray]],
    min_mask_region_area: int,
    output_mode: str,
) -> Optional[List[np.ndarray]]:
    """Validate ``SamAutomaticMaskGenerator`` arguments; returns ``point_grids`` as float arrays."""
    if (points_per_side is None) == (point_grids is None):
        raise ValueError(
            "pass exactly one of points_per_side (e.g. 32) or point_grids (a list of Nx2 arrays in [0, 1]), "
            f"got points_per_side={points_per_side!r} and point_grids={'None' if point_grids is None else 'a list'}."
        )
    _check_number(points_per_side, "points_per_side", lo=1, integer=True, allow_none=True)
    if points_per_side is not None and points_per_side > MAX_POINTS_PER_SIDE:
        raise ValueError(
            f"points_per_side must be <= {MAX_POINTS_PER_SIDE}, got {points_per_side} ({points_per_side}**2 "
            "points per crop would exhaust memory); the original default is 32."
        )
    _check_number(points_per_batch, "points_per_batch", lo=1, integer=True)
    _check_number(pred_iou_thresh, "pred_iou_thresh", lo=0.0, hi=1.0)
    _check_number(stability_score_thresh, "stability_score_thresh", lo=0.0, hi=1.0)
    _check_number(stability_score_offset, "stability_score_offset", lo=0.0, lo_open=True)
    _check_number(box_nms_thresh, "box_nms_thresh", lo=0.0, hi=1.0)
    _check_number(crop_n_layers, "crop_n_layers", lo=0, integer=True)
    if crop_n_layers > MAX_CROP_N_LAYERS:
        raise ValueError(
            f"crop_n_layers must be <= {MAX_CROP_N_LAYERS}, got {crop_n_layers} (layer i runs the encoder on "
            "4**i crops); use 0-2, or crop the image yourself."
        )
    _check_number(crop_nms_thresh, "crop_nms_thresh", lo=0.0, hi=1.0)
    _check_number(crop_overlap_ratio, "crop_overlap_ratio", lo=0.0, hi=1.0)
    if crop_overlap_ratio >= 1.0:
        raise ValueError(f"crop_overlap_ratio must be < 1, got {crop_overlap_ratio!r}.")
    _check_number(crop_n_points_downscale_factor, "crop_n_points_downscale_factor", lo=1, integer=True)
    _check_number(min_mask_region_area, "min_mask_region_area", lo=0)
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {list(OUTPUT_MODES)}, got {output_mode!r}.")
    if points_per_side is not None:
        last = int(points_per_side / crop_n_points_downscale_factor**crop_n_layers)
        if last < 1:
            raise ValueError(
                f"points_per_side={points_per_side} / crop_n_points_downscale_factor="
                f"{crop_n_points_downscale_factor}**crop_n_layers={crop_n_layers} leaves no points in the "
                "last crop layer; use more points, fewer crop layers or a smaller downscale factor."
            )
        return None
    if isinstance(point_grids, np.ndarray) or not isinstance(point_grids, (list, tuple)):
        raise TypeError(f"point_grids must be a list of Nx2 arrays (one per crop layer), got {_kind(point_grids)}.")
    if len(point_grids) < crop_n_layers + 1:
        raise ValueError(
            f"point_grids has {len(point_grids)} grid(s) but crop_n_layers={crop_n_layers} needs "
            f"{crop_n_layers + 1} (one per layer, layer 0 = the full image)."
        )
    grids = []
    for i, g in enumerate(point_grids):
        arr = _as_float_array(g, f"point_grids[{i}]")
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise ValueError(f"point_grids[{i}] must have shape Nx2 with N >= 1, got {arr.shape}.")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"point_grids[{i}] must be normalised to [0, 1] (x / width, y / height), "
                f"got values in [{arr.min():g}, {arr.max():g}]."
            )
        grids.append(arr)
    return grids


def check_checkpoint_arg(checkpoint, model_type) -> Optional[str]:
    """A command line's ``--checkpoint`` (a file, "demo" for the bundled one, or None) as a
    file path, checked together with ``--model-type``; ValueError saying what is wrong."""
    from .build_sam import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path!r} does not exist")
    if model_type == "auto" and path is None:
        raise ValueError("--model-type auto reads the architecture from --checkpoint; pass one")
    return path


def check_output_path(path, flag: str = "--output", directory: bool = True) -> str:
    """An output folder (or file) that can be created: no part of it is a file, the deepest
    existing folder is writable. Creates nothing; returns the absolute path."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{flag} must be a path, got {path!r}.")
    full = os.path.abspath(os.fspath(path))
    if os.path.exists(full):
        if directory and not os.path.isdir(full):
            raise ValueError(f"{flag} {path!r} is an existing file, not a folder; choose a folder path.")
        if not directory and os.path.isdir(full):
            raise ValueError(f"{flag} {path!r} is a folder; give a file path, e.g. {os.path.join(path, 'results.csv')!r}.")
    parent = full if os.path.isdir(full) else os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"{flag} {path!r} cannot be created: {parent!r} is a file, not a folder; choose another location."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} is not writable: no write permission in {parent!r}; choose another location.")
    return full


def explain_os_error(err: OSError, path: str) -> OSError:
    """``err`` with a message saying what to do when the disk is full or the path not writable."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "the disk is full (or the quota is used up): free some space or write to another disk"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "no permission to write there: choose another output location"
    else:
        return err
    out = type(err)(err.errno, f"cannot write {path!r}: {hint} ({err.strerror or err})")
    out.__cause__ = err
    return out
