"""The generated COCO dataset: loads with pycocotools, RLE round trip, determinism, center points."""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segment_anything_fast.data.synthetic_coco import (
    CATEGORIES, encode_rle, make_scene, mask_to_segmentation, write_coco_dataset,
    write_sample_image,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    path = write_coco_dataset(str(root), 6, seed=3)
    return str(root), path


def test_loads_with_pycocotools(dataset):
    root, path = dataset
    coco = _load(path)
    assert len(coco.getImgIds()) == 6
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == set(CATEGORIES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 12
    kinds = {type(a["segmentation"]).__name__ for a in anns}
    assert kinds == {"list", "dict"}, "both polygon and RLE annotations expected"
    used = {coco.loadCats(a["category_id"])[0]["name"] for a in anns}
    assert {"ring", "c_shape"} <= used or len(used) >= 4
    for img in coco.loadImgs(coco.getImgIds()):
        bgr = cv2.imread(os.path.join(root, "val2017", img["file_name"]))
        assert bgr is not None and bgr.shape[:2] == (img["height"], img["width"])
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            m = coco.annToMask(a)
            assert m.shape == (img["height"], img["width"]) and m.sum() > 0
            assert a["iscrowd"] == 0
            assert abs(a["area"] - m.sum()) <= 0.15 * m.sum() + 20
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert xs.min() >= x - 2 and xs.max() <= x + w + 2
            assert ys.min() >= y - 2 and ys.max() <= y + h + 2


def test_rle_round_trip_and_rings_use_rle():
    scene = make_scene([7, 0], 320, 240, num_objects=(8, 12))
    assert scene.masks, "scene should contain annotated objects"
    for m, kind in zip(scene.masks, scene.kinds):
        rle = encode_rle(m)
        rle2 = json.loads(json.dumps(rle))  # JSON-safe
        back = mask_utils.decode({"size": rle2["size"], "counts": rle2["counts"].encode()})
        np.testing.assert_array_equal(back.astype(bool), m)
        seg = mask_to_segmentation(m, kind)
        if kind == "ring":
            assert isinstance(seg, dict)
    # A mask with a hole is never written as a polygon.
    holed = np.zeros((64, 64), bool)
    holed[10:50, 10:50] = True
    holed[25:35, 25:35] = False
    assert isinstance(mask_to_segmentation(holed, "rectangle"), dict)
    solid = np.zeros((64, 64), bool)
    solid[10:50, 12:40] = True
    poly = mask_to_segmentation(solid, "rectangle")
    assert isinstance(poly, list)
    dec = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 64, 64))) > 0
    assert (dec & solid).sum() / (dec | solid).sum() > 0.9


def test_deterministic_and_prefix_stable(tmp_path):
    a = write_coco_dataset(str(tmp_path / "a"), 3, seed=5, image_format="png")
    b = write_coco_dataset(str(tmp_path / "b"), 4, seed=5, image_format="png", workers=2)
    c = write_coco_dataset(str(tmp_path / "c"), 3, seed=6, image_format="png")
    da, db, dc = (json.load(open(p)) for p in (a, b, c))
    na = len(da["annotations"])
    assert da["annotations"] == db["annotations"][:na]
    assert da["images"] == db["images"][:3]
    assert da["annotations"] != dc["annotations"]

    def digest(root, name):
        return hashlib.sha256(open(os.path.join(root, "val2017", name), "rb").read()).hexdigest()

    for img in da["images"]:
        assert digest(tmp_path / "a", img["file_name"]) == digest(tmp_path / "b", img["file_name"])


def test_center_point_inside_every_mask(dataset):
    from segment_anything_fast.data.coco_prompts import center_point

    _, path = dataset
    coco = _load(path)
    seen = set()
    for a in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(a)
        x, y = center_point(m)
        assert m[int(y), int(x)] == 1, (a["id"], x, y)
        seen.add(coco.loadCats(a["category_id"])[0]["name"])
    # Rings / C shapes have their centroid outside the mask: the point must still be inside.
    ring = np.zeros((100, 100), np.uint8)
    cv2.circle(ring, (50, 50), 40, 1, -1)
    cv2.circle(ring, (50, 50), 25, 0, -1)
    cshape = ring.copy()
    cshape[40:60, 50:] = 0
    for m in (ring, cshape):
        x, y = center_point(m)
        assert m[int(y), int(x)] == 1
        assert 25 <= np.hypot(x - 50, y - 50) <= 40
    edge = np.zeros((20, 30), np.uint8)
    edge[:, :3] = 1  # touches the border: padding keeps the point off the image edge
    x, y = center_point(edge)
    assert x == 1
    with pytest.raises(ValueError, match="empty"):
        center_point(np.zeros((5, 5), np.uint8))


def test_bundled_sample_is_reproducible(tmp_path):
    out = tmp_path / "s.png"
    scene = write_sample_image(str(out))
    assert scene.image.shape == (480, 640, 3) and len(scene.masks) >= 4
    bundled = os.path.join(ROOT, "segment_anything_fast", "assets", "sample.png")
    assert os.path.getsize(bundled) < 100_000
    np.testing.assert_array_equal(cv2.imread(bundled), cv2.imread(str(out)))


def test_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_coco.py"), "--output",
         str(tmp_path), "--num-images", "2", "--size", "96x64", "--split", "mini"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Wrote 2 images" in r.stdout
    coco = _load(str(tmp_path / "annotations" / "instances_mini.json"))
    assert all(i["width"] == 96 and i["height"] == 64 for i in coco.loadImgs(coco.getImgIds()))
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_coco.py"), "--output",
         str(tmp_path), "--size", "big"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "640x480" in bad.stderr
    with pytest.raises(ValueError, match="num_images"):
        write_coco_dataset(str(tmp_path), 0)
