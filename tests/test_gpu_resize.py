"""gpu_resize.resize_uint8 (the predictor's device-side resize) against PIL, bit for bit."""
import numpy as np
import pytest
import torch
from PIL import Image

from segment_anything_fast.gpu_resize import resize_uint8
from segment_anything_fast.utils.transforms import ResizeLongestSide


def _pil(img, h, w):
    return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def test_enlargements_equal_pil():
    rng = np.random.default_rng(0)
    cases = [(480, 640, 768, 1024), (640, 480, 1024, 768), (7, 9, 13, 40), (300, 1024, 300, 1024), (1, 5, 3, 15)]
    for _ in range(25):  # random enlargements, including one axis only
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        cases.append((h, w, h + int(rng.integers(0, 400)), w + int(rng.integers(0, 400))))
    for h, w, nh, nw in cases:
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img[: h // 2, : w // 3] = 255  # saturated corner: the clipping of both passes
        out = resize_uint8(torch.from_numpy(img), (nh, nw))
        assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), _pil(img, nh, nw)), (h, w, nh, nw)


def test_apply_image_to_matches_apply_image():
    t = ResizeLongestSide(64)
    rng = np.random.default_rng(1)
    for hw in ((30, 40), (100, 60), (64, 64)):  # grows, shrinks (PIL on the host), unchanged
        img = (rng.random((*hw, 3)) * 255).astype(np.uint8)
        out = t.apply_image_to(img[..., ::-1], "cpu")  # a negatively strided view, as BGR input gives
        assert np.array_equal(out.permute(1, 2, 0).numpy(), t.apply_image(img[..., ::-1]))


def test_shrinking_is_refused():
    with pytest.raises(ValueError, match="only enlarges"):
        resize_uint8(torch.zeros(10, 10, 3, dtype=torch.uint8), (5, 20))
