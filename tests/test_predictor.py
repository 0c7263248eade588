"""SamPredictor and ResizeLongestSide parity with the original segment_anything (tiny model)."""
import copy

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as OrigPredictor
from segment_anything.utils.transforms import ResizeLongestSide as OrigResize

from segment_anything_fast.predictor import SamPredictor
from segment_anything_fast.utils.transforms import ResizeLongestSide
from tests.oracle import build_pair


IMG = np.random.RandomState(0).randint(0, 256, (100, 150, 3), dtype=np.uint8)
PTS = np.array([[30.0, 40.0], [100.0, 60.0], [149.0, 0.0]])
LAB = np.array([1, 0, 1])
BOX = np.array([10, 20, 90, 80])


@pytest.fixture(scope="module")
def pair():
    ours, orig = build_pair()
    p, q = SamPredictor(ours), OrigPredictor(orig)
    p.set_image(IMG)
    q.set_image(IMG)
    return p, q


def _same(a, b, logits=False):
    (m1, s1, l1), (m2, s2, l2) = a, b
    assert m1.shape == m2.shape and m1.dtype == m2.dtype
    assert s1.dtype == s2.dtype == np.float32 and l1.dtype == l2.dtype == np.float32
    if logits:
        np.testing.assert_allclose(m1, m2, atol=1e-4)
    else:
        assert m1.dtype == bool
        # identical masks (a pixel within float noise of the threshold may flip: allow <= 1e-4)
        assert (m1 != m2).mean() <= 1e-4
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_allclose(l1, l2, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(point_coords=PTS[:1], point_labels=LAB[:1]),
        dict(point_coords=PTS, point_labels=LAB, multimask_output=False),
        dict(box=BOX),
        dict(box=BOX[None]),
        dict(point_coords=PTS, point_labels=LAB, box=BOX),
        dict(point_coords=PTS, point_labels=LAB, return_logits=True),
        dict(box=BOX, multimask_output=False, return_logits=True),
    ],
)
def test_predict_parity(pair, kw):
    p, q = pair
    out = p.predict(**kw)
    _same(out, q.predict(**kw), logits=kw.get("return_logits", False))
    c = 3 if kw.get("multimask_output", True) else 1
    assert out[0].shape == (c, 100, 150) and out[1].shape == (c,) and out[2].shape == (c, 32, 32)


def test_mask_input_parity(pair):
    p, q = pair
    _, s, low = q.predict(point_coords=PTS[:1], point_labels=LAB[:1])
    mask = low[np.argmax(s)][None]
    kw = dict(point_coords=PTS, point_labels=LAB, mask_input=mask, multimask_output=False)
    _same(p.predict(**kw), q.predict(**kw))
    _same(p.predict(mask_input=mask), q.predict(mask_input=mask))


def test_embedding_and_sizes(pair):
    p, q = pair
    torch.testing.assert_close(p.get_image_embedding(), q.get_image_embedding(), atol=1e-5, rtol=1e-5)
    assert p.original_size == (100, 150) and p.input_size == (85, 128) == q.input_size
    assert p.is_image_set and p.device == torch.device("cpu")


def test_predict_torch_batched_boxes(pair):
    p, q = pair
    boxes = torch.tensor([[10, 20, 90, 80], [0, 0, 150, 100], [50, 10, 60, 95.5]])
    tb = p.transform.apply_boxes_torch(boxes, p.original_size)
    pts = p.transform.apply_coords_torch(torch.tensor([[[40.0, 50.0]], [[5.0, 5.0]], [[55.0, 50.0]]]), (100, 150))
    lab = torch.ones(3, 1, dtype=torch.int)
    for args in [(None, None, tb), (pts, lab, tb), (pts, lab, None)]:
        for logits in (False, True):
            a = p.predict_torch(*args, multimask_output=True, return_logits=logits)
            b = q.predict_torch(*args, multimask_output=True, return_logits=logits)
            assert a[0].shape == b[0].shape == (3, 3, 100, 150) and a[0].dtype == b[0].dtype
            if logits:
                torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)
            else:
                assert (a[0] != b[0]).float().mean() <= 1e-4
            torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
            torch.testing.assert_close(a[2], b[2], atol=1e-4, rtol=0)


def test_bgr_and_set_torch_image():
    ours, orig = build_pair(seed=1)
    p, q = SamPredictor(ours), OrigPredictor(orig)
    bgr = IMG[..., ::-1]  # non-contiguous view
    p.set_image(bgr, image_format="BGR")
    q.set_image(bgr, image_format="BGR")
    _same(p.predict(point_coords=PTS, point_labels=LAB), q.predict(point_coords=PTS, point_labels=LAB))
    t = torch.as_tensor(p.transform.apply_image(IMG)).permute(2, 0, 1)[None]
    p.set_torch_image(t, IMG.shape[:2])
    q.set_torch_image(t, IMG.shape[:2])
    _same(p.predict(box=BOX), q.predict(box=BOX))
    p.reset_image()
    assert not p.is_image_set and p.features is None
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=BOX)


def test_bf16_model():
    ours, _ = build_pair()
    ref = SamPredictor(ours)
    p = SamPredictor(copy.deepcopy(ours).to(torch.bfloat16))
    ref.set_image(IMG)
    p.set_image(IMG)
    assert p.features.dtype == torch.bfloat16
    mask = ref.predict(box=BOX)[2][:1]
    for kw in [dict(point_coords=PTS, point_labels=LAB), dict(box=BOX, mask_input=mask, return_logits=True)]:
        m, s, low = p.predict(**kw)
        m32, s32, low32 = ref.predict(**kw)
        assert m.dtype == m32.dtype and s.dtype == np.float32 and low.dtype == np.float32
        assert m.shape == m32.shape and s.shape == s32.shape and low.shape == low32.shape
        assert np.abs(s - s32).max() < 0.1
        if m.dtype == bool:
            assert (m == m32).mean() > 0.9
    tb = p.transform.apply_boxes_torch(torch.tensor([[10, 20, 90, 80], [0, 0, 150, 100]]), p.original_size)
    m, s, low = p.predict_torch(None, None, tb)
    assert m.dtype == torch.bool and s.dtype == low.dtype == torch.float32 and m.shape == (2, 3, 100, 150)


@pytest.mark.parametrize("shape", [(100, 150, 3), (150, 100, 3), (7, 1, 3), (1, 1, 3), (128, 128, 3), (300, 31, 3)])
def test_transforms_parity(shape):
    img = np.random.RandomState(1).randint(0, 256, shape, dtype=np.uint8)
    ours, orig = ResizeLongestSide(128), OrigResize(128)
    np.testing.assert_array_equal(ours.apply_image(img), orig.apply_image(img))
    coords = np.random.RandomState(2).rand(2, 5, 2) * 200
    np.testing.assert_array_equal(ours.apply_coords(coords, shape[:2]), orig.apply_coords(coords, shape[:2]))
    boxes = np.random.RandomState(3).rand(4, 4) * 200
    np.testing.assert_array_equal(ours.apply_boxes(boxes, shape[:2]), orig.apply_boxes(boxes, shape[:2]))
    ct, bt = torch.as_tensor(coords), torch.as_tensor(boxes)
    assert torch.equal(ours.apply_coords_torch(ct, shape[:2]), orig.apply_coords_torch(ct, shape[:2]))
    assert torch.equal(ours.apply_boxes_torch(bt, shape[:2]), orig.apply_boxes_torch(bt, shape[:2]))
    assert ours.get_preprocess_shape(*shape[:2], 128) == orig.get_preprocess_shape(*shape[:2], 128)


def test_apply_image_torch_uses_spatial_dims():
    x = torch.rand(2, 3, 100, 150)
    y = ResizeLongestSide(128).apply_image_torch(x)
    assert y.shape == (2, 3, 85, 128)
    ref = torch.nn.functional.interpolate(x, (85, 128), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(y, ref)
