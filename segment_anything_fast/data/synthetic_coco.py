"""A generated COCO-format instance segmentation dataset for tests, benchmarks and demos.

Every image is a scene of overlapping, occluding shapes (circles/ellipses, polygons, rings,
C shapes, rotated rectangles) with textured fills on a textured background. Annotations are
written the way COCO writes them: ``iscrowd=0`` polygons for simply connected objects and
``iscrowd=0`` compressed RLE for objects with holes (rings, occluded objects with holes, or
tiny fragments that polygons describe badly). The result loads with ``pycocotools.coco.COCO``
and lays out like COCO (``<root>/<split>/*.jpg`` + ``<root>/annotations/instances_<split>.json``),
so the same evaluation commands work on real ``val2017``.

Image ``i`` depends only on ``(seed, i)``: a larger dataset extends a smaller one.
"""
import json
import multiprocessing
import os
from functools import partial
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = ("circle", "polygon", "ring", "c_shape", "rectangle")
# COCO-like image sizes (width, height); the mix exercises resizing and padding.
COCO_LIKE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (427, 640))
IMAGE_FORMATS = ("jpg", "png")


@dataclass
class Scene:
    """One generated image: ``image`` (H, W, 3) uint8 RGB; visible masks (H, W) bool, front last."""

    image: np.ndarray
    masks: List[np.ndarray]
    kinds: List[str]


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _texture(rng: np.random.Generator, h: int, w: int, noise: bool) -> np.ndarray:
    """A (h, w, 3) float texture: solid, stripes, checker, gradient or blotches."""
    kind = rng.choice(["solid", "stripes", "checker", "gradient", "blotches"])
    c1, c2 = _color(rng), _color(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        tex = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 28)
        t = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0)[..., None]
        tex = np.where(t, c1, c2).astype(np.float32)
    elif kind == "checker":
        s = rng.uniform(6, 24)
        t = ((np.floor(xx / s) + np.floor(yy / s)) % 2 == 0)[..., None]
        tex = np.where(t, c1, c2).astype(np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        p = xx * np.cos(a) + yy * np.sin(a)
        p = ((p - p.min()) / max(float(np.ptp(p)), 1.0))[..., None]
        tex = (c1 * (1 - p) + c2 * p).astype(np.float32)
    else:
        small = rng.uniform(0, 1, size=(max(h // 24, 2), max(w // 24, 2))).astype(np.float32)
        p = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None]
        tex = (c1 * (1 - p) + c2 * p).astype(np.float32)
    if noise:
        tex = tex + rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    return tex


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A filled (h, w) uint8 mask of one shape of ``kind`` at a random place and size."""
    m = np.zeros((h, w), np.uint8)
    s = min(h, w)
    cx, cy = int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.9) * h)
    r = int(rng.uniform(0.07, 0.22) * s)
    if kind == "circle":
        axes = (r, max(int(r * rng.uniform(0.6, 1.0)), 4))
        cv2.ellipse(m, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == "polygon":
        n = int(rng.integers(3, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        rad = r * rng.uniform(0.45, 1.0, size=n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
    elif kind in ("ring", "c_shape"):
        r = max(r, 14)
        inner = int(r * rng.uniform(0.45, 0.7))
        cv2.circle(m, (cx, cy), r, 1, -1)
        cv2.circle(m, (cx, cy), inner, 0, -1)
        if kind == "c_shape":
            gap = np.zeros_like(m)
            start = float(rng.uniform(0, 360))
            cv2.ellipse(gap, (cx, cy), (r + 2, r + 2), 0, start, start + rng.uniform(50, 110), 1, -1)
            m[gap > 0] = 0
    elif kind == "rectangle":
        size = (float(r * rng.uniform(0.8, 2.0)), float(r * rng.uniform(0.5, 1.4)))
        box = cv2.boxPoints(((cx, cy), size, float(rng.uniform(0, 180))))
        cv2.fillPoly(m, [box.round().astype(np.int32)], 1)
    else:
        raise ValueError(f"Unknown shape kind {kind!r}; choose one of {CATEGORIES}.")
    return m


def make_scene(
    seed: Sequence[int],
    width: int = 640,
    height: int = 480,
    num_objects: Tuple[int, int] = (4, 12),
    min_area: int = 100,
    noise: bool = True,
) -> Scene:
    """Generate one scene; ``seed`` is anything ``np.random.default_rng`` accepts.

    ``num_objects`` is an inclusive (min, max) range of shapes drawn before occlusion; shapes
    whose visible part is under ``min_area`` pixels are painted but not annotated.
    """
    if width < 32 or height < 32:
        raise ValueError(f"Image size must be at least 32x32, got {width}x{height}.")
    lo, hi = num_objects
    if not 1 <= lo <= hi:
        raise ValueError(f"num_objects must be a range 1 <= min <= max, got {num_objects}.")
    rng = np.random.default_rng(seed)
    image = _texture(rng, height, width, noise)
    n = int(rng.integers(lo, hi + 1))
    full, kinds = [], []
    for _ in range(n):
        kind = str(rng.choice(CATEGORIES))
        m = _shape_mask(rng, kind, height, width)
        if m.sum() < min_area:
            continue
        tex = _texture(rng, height, width, noise)
        image[m > 0] = tex[m > 0]
        full.append(m > 0)
        kinds.append(kind)
    # Later shapes occlude earlier ones.
    covered = np.zeros((height, width), bool)
    masks, out_kinds = [], []
    for m, kind in zip(reversed(full), reversed(kinds)):
        visible = m & ~covered
        covered |= m
        if visible.sum() >= min_area:
            masks.append(visible)
            out_kinds.append(kind)
    masks.reverse()
    out_kinds.reverse()
    return Scene(np.clip(image, 0, 255).astype(np.uint8), masks, out_kinds)


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) bool mask, JSON-ready (``counts`` as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_to_segmentation(mask: np.ndarray, kind: str, min_polygon_iou: float = 0.9):
    """COCO ``segmentation`` for ``mask``: polygons if they describe it well, else RLE.

    Rings and masks with holes always get RLE (polygons cannot express holes).
    """
    h, w = mask.shape
    m8 = mask.astype(np.uint8)
    contours, hierarchy = cv2.findContours(m8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    has_hole = hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())
    if kind != "ring" and not has_hole:
        polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        if polys:
            decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))) > 0
            union = (decoded | mask).sum()
            if union and (decoded & mask).sum() / union >= min_polygon_iou:
                return polys
    return encode_rle(mask)


def _save_scene(img_dir, img_id, scene, image_format, rle_only=False):
    """Write ``scene`` as image ``img_id``; returns its image record and annotations (no ids).

    ``rle_only`` writes every mask as RLE (lossless) instead of polygons where they fit.
    """
    h, w = scene.image.shape[:2]
    file_name = f"{img_id:012d}.{image_format}"
    bgr = cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if image_format == "jpg" else []
    if not cv2.imwrite(os.path.join(img_dir, file_name), bgr, params):
        raise RuntimeError(f"Could not write image {os.path.join(img_dir, file_name)}.")
    anns = []
    for mask, kind in zip(scene.masks, scene.kinds):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({
            "image_id": img_id,
            "category_id": CATEGORIES.index(kind) + 1,
            "segmentation": encode_rle(mask) if rle_only else mask_to_segmentation(mask, kind),
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return {"id": img_id, "file_name": file_name, "width": w, "height": h}, anns


def _write_image(img_dir, seed, size, image_format, num_objects, idx):
    """Generate and save image ``idx`` (id ``idx + 1``)."""
    rng = np.random.default_rng([seed, idx, 1])
    w, h = size if size is not None else COCO_LIKE_SIZES[int(rng.integers(len(COCO_LIKE_SIZES)))]
    scene = make_scene([seed, idx], w, h, num_objects=num_objects)
    return _save_scene(img_dir, idx + 1, scene, image_format)


def _dataset_dirs(root: str, split: str) -> Tuple[str, str]:
    if not split or os.sep in split:
        raise ValueError(f"split must be a plain folder name like 'val2017', got {split!r}.")
    img_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    return img_dir, ann_dir


def _write_instances(ann_dir: str, split: str, results, description: str) -> str:
    """Number the annotations of ``results`` ((image record, annotations) per image) and write
    ``<ann_dir>/instances_<split>.json``; return its path."""
    images, annotations = [], []
    for info, anns in results:
        images.append(info)
        for a in anns:
            annotations.append({"id": len(annotations) + 1, **a})
    dataset = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CATEGORIES)],
    }
    path = os.path.join(ann_dir, f"instances_{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataset, f)
    os.replace(tmp, path)
    return path


def write_coco_dataset(
    root: str,
    num_images: int,
    seed: int = 0,
    split: str = "val2017",
    image_format: str = "jpg",
    size: Optional[Tuple[int, int]] = None,
    num_objects: Tuple[int, int] = (4, 12),
    workers: int = 1,
) -> str:
    """Write ``num_images`` scenes as a COCO dataset under ``root``; return the JSON path.

    Images go to ``<root>/<split>/<id:012d>.<image_format>``, annotations to
    ``<root>/annotations/instances_<split>.json``. ``size`` is (width, height); None mixes
    COCO-like sizes. ``workers`` > 1 generates images in that many processes (same output).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}.")
    img_dir, ann_dir = _dataset_dirs(root, split)
    job = partial(_write_image, img_dir, seed, size, image_format, num_objects)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(job, range(num_images), chunksize=4)
    else:
        results = [job(idx) for idx in range(num_images)]
    return _write_instances(ann_dir, split, results,
                            f"segment_anything_fast synthetic COCO, seed {seed}")


def write_scenes_coco(root: str, scenes: Sequence[Scene], split: str = "val2017",
                      description: str = "segment_anything_fast scenes") -> str:
    """Write given scenes losslessly (PNG images, RLE masks) as a COCO dataset under ``root``
    (image ``i`` gets id ``i + 1``); return the JSON path. Evaluating the dataset sees exactly
    the scenes' pixels and masks."""
    if not scenes:
        raise ValueError("scenes is empty: nothing to write.")
    img_dir, ann_dir = _dataset_dirs(root, split)
    results = [_save_scene(img_dir, i + 1, sc, "png", rle_only=True) for i, sc in enumerate(scenes)]
    return _write_instances(ann_dir, split, results, description)


def sample_scene(noise: bool = False) -> Scene:
    """The scene of the bundled images: ``assets/sample.png`` (``noise=False``) and, with the
    pixel noise of the demo model's training scenes, ``assets/demo_scene.jpg``."""
    return make_scene([2024, 3], 640, 480, num_objects=(6, 8), noise=noise)


def write_sample_image(path, noise: bool = False) -> Scene:
    """Write :func:`sample_scene` to ``path`` (.jpg: JPEG quality 90, else PNG) and return it."""
    path = os.fspath(path)
    scene = sample_scene(noise)
    params = ([cv2.IMWRITE_JPEG_QUALITY, 90] if path.lower().endswith((".jpg", ".jpeg"))
              else [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not cv2.imwrite(path, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), params):
        raise RuntimeError(f"Could not write {path}.")
    return scene
