"""Bad inputs to SamPredictor / SamAutomaticMaskGenerator: error type and a message saying
what to fix (fuzzing: tests/test_robustness.py)."""
import numpy as np
import pytest
import torch

from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything_fast.predictor import SamPredictor
from segment_anything_fast.validation import check_amg_params
from tests.oracle import build_pair


IMG = np.random.RandomState(0).randint(0, 256, (60, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return build_pair()[0]


@pytest.fixture(scope="module")
def pred(model):
    p = SamPredictor(model)
    p.set_image(IMG)
    return p


# ---------------------------------------------------------------- images
BAD_IMAGES = [
    (torch.zeros(60, 80, 3, dtype=torch.uint8), TypeError, "numpy array.*set_torch_image"),
    ([[1, 2, 3]], TypeError, "numpy array"),
    (np.zeros((60, 80), np.uint8), ValueError, "grayscale.*COLOR_GRAY2RGB"),
    (np.zeros((60, 80, 1), np.uint8), ValueError, "grayscale"),
    (np.zeros((60, 80, 4), np.uint8), ValueError, r"RGBA.*image\[\.\.\., :3\]"),
    (np.zeros((3, 60, 80), np.uint8), ValueError, "channels-first.*transpose"),
    (np.zeros((2, 60, 80, 3), np.uint8), ValueError, "once per image"),
    (np.zeros((60, 80, 2), np.uint8), ValueError, "3 colour channels"),
    (np.zeros((60, 80, 3), np.float32), ValueError, r"uint8.*\* 255"),
    (np.full((60, 80, 3), np.nan), ValueError, "NaN/inf"),
    (np.full((60, 80, 3), np.inf, np.float32), ValueError, "NaN/inf"),
    (np.zeros((60, 80, 3), np.uint16), ValueError, "16-bit.*>> 8"),
    (np.zeros((60, 80, 3), np.int64), ValueError, "uint8.*np.clip"),
    (np.zeros((60, 80, 3), bool), ValueError, "uint8"),
    (np.zeros((0, 80, 3), np.uint8), ValueError, "empty"),
    (np.zeros((60, 0, 3), np.uint8), ValueError, "empty"),
    (np.zeros((1, 500, 3), np.uint8), ValueError, "aspect ratio"),
]


@pytest.mark.parametrize("image,err,msg", BAD_IMAGES, ids=range(len(BAD_IMAGES)))
def test_bad_image(model, image, err, msg):
    p = SamPredictor(model)
    with pytest.raises(err, match=msg):
        p.set_image(image)
    assert not p.is_image_set
    gen = SamAutomaticMaskGenerator(model, points_per_side=2)
    with pytest.raises(err, match=msg):
        gen.generate(image)


def test_bad_image_format(model):
    with pytest.raises(ValueError, match="'RGB' or 'BGR'"):
        SamPredictor(model).set_image(IMG, image_format="RGBA")


def test_odd_but_valid_images(model):
    p = SamPredictor(model)
    for img in (np.zeros((1, 1, 3), np.uint8), IMG[::2, ::-1], np.zeros((1, 200, 3), np.uint8)):
        p.set_image(img)
        m, s, low = p.predict(point_coords=np.array([[0, 0]]), point_labels=np.array([1]))
        assert m.shape == (3, *img.shape[:2]) and m.dtype == bool


BAD_TORCH_IMAGES = [
    (np.zeros((1, 3, 128, 96), np.uint8), (128, 96), TypeError, "torch.Tensor"),
    (torch.zeros(3, 128, 96), (128, 96), ValueError, "1x3xHxW"),
    (torch.zeros(2, 3, 128, 96), (128, 96), ValueError, "1x3xHxW"),
    (torch.zeros(1, 3, 100, 96), (100, 96), ValueError, "long side 128.*apply_image_torch"),
    (torch.full((1, 3, 128, 96), float("nan")), (128, 96), ValueError, "NaN"),
    (torch.zeros(1, 3, 128, 96), (0, 96), ValueError, "positive"),
    (torch.zeros(1, 3, 128, 96), "big", TypeError, "pair of ints"),
    (torch.zeros(1, 3, 128, 96, device="meta"), (128, 96), ValueError, "on meta but the model is on cpu.*to\\(predictor.device\\)"),
]


@pytest.mark.parametrize("image,size,err,msg", BAD_TORCH_IMAGES, ids=range(len(BAD_TORCH_IMAGES)))
def test_bad_torch_image(model, image, size, err, msg):
    with pytest.raises(err, match=msg):
        SamPredictor(model).set_torch_image(image, size)


# ---------------------------------------------------------------- predict() prompts
P1, L1 = np.array([[10.0, 20.0]]), np.array([1])
BAD_PROMPTS = [
    (dict(point_coords=P1), "without point_labels.*one label per point"),
    (dict(point_labels=L1), "without point_coords"),
    (dict(point_coords=np.zeros((2, 2)), point_labels=np.ones(3)), "2 points but point_labels has 3"),
    (dict(point_coords=np.array([10.0, 20.0]), point_labels=L1), r"Nx2.*np.array\(\[\[x, y\]\]\)"),
    (dict(point_coords=np.zeros((2, 3)), point_labels=np.ones(2)), "Nx2"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
    (dict(point_coords=np.array([[np.nan, 1.0]]), point_labels=L1), "NaN or inf"),
    (dict(point_coords=np.array([[np.inf, 1.0]]), point_labels=L1), "NaN or inf"),
    (dict(point_coords=P1, point_labels=np.array([2])), r"0 \(background\) or 1"),
    (dict(point_coords=P1, point_labels=np.array([-1])), r"0 \(background\) or 1"),
    (dict(point_coords=P1, point_labels=np.ones((1, 1))), r"shape \(N,\)"),
    (dict(box=np.array([50, 10, 20, 40])), "x1 >= x0.*XYWH"),
    (dict(box=np.array([10, 50, 20, 40])), "y1 >= y0"),
    (dict(box=np.array([1, 2, 3, 4, 5])), r"shape \(4,\)"),
    (dict(box=np.zeros((3, 4))), "one box.*predict_torch"),
    (dict(box=np.array([0, 0, np.nan, 4])), "NaN"),
    (dict(box=np.zeros(0)), "empty"),
    (dict(mask_input=np.zeros((32, 32))), r"1x32x32.*mask_input\[None\]"),
    (dict(mask_input=np.zeros((1, 64, 64))), "1x32x32"),
    (dict(mask_input=np.zeros((3, 32, 32))), "one of the low-res logits"),
    (dict(mask_input=np.full((1, 32, 32), np.nan)), "NaN"),
    (dict(), "needs a prompt"),
]


@pytest.mark.parametrize("kw,msg", BAD_PROMPTS, ids=range(len(BAD_PROMPTS)))
def test_bad_prompt(pred, kw, msg):
    with pytest.raises(ValueError, match=msg):
        pred.predict(**kw)


def test_non_numeric_prompt(pred):
    with pytest.raises(TypeError, match="numeric"):
        pred.predict(point_coords=[["a", "b"]], point_labels=[1])


def test_predict_before_set_image(model):
    p = SamPredictor(model)
    with pytest.raises(RuntimeError, match=r"set_image"):
        p.predict(point_coords=P1, point_labels=L1)
    with pytest.raises(RuntimeError, match=r"set_image"):
        p.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match=r"set_image"):
        p.get_image_embedding()


def test_outside_coords_are_allowed(pred):
    """Finite coordinates outside the image behave as in the original (documented)."""
    m, s, low = pred.predict(point_coords=np.array([[-50.0, 500.0]]), point_labels=L1, box=np.array([-10, -10, 900, 900]))
    assert m.shape == (3, 60, 80) and s.shape == (3,) and low.shape == (3, 32, 32)


# ---------------------------------------------------------------- predict_torch() prompts
C, L = torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.int)
BAD_TORCH_PROMPTS = [
    ((np.zeros((2, 1, 2)), np.ones((2, 1)), None), TypeError, "torch.Tensor"),
    ((C, None, None), ValueError, "together"),
    ((torch.zeros(2, 2), L, None), ValueError, "BxNx2"),
    ((C, torch.ones(2, 2), None), ValueError, "BxN"),
    ((C, torch.full((2, 1), 3), None), ValueError, r"-1 \(padding"),
    ((C, torch.full((2, 1), 0.5), None), ValueError, "integers"),
    ((torch.zeros(2, 0, 2), torch.zeros(2, 0), None), ValueError, "empty"),
    ((C, L, torch.zeros(3, 4)), ValueError, "batch sizes differ"),
    ((None, None, torch.zeros(4)), ValueError, "Bx4"),
    ((None, None, torch.zeros(0, 4)), ValueError, "empty"),
    ((None, None, torch.tensor([[5.0, 0, 1, 1]])), ValueError, "x1 >= x0"),
    ((C * float("nan"), L, None), ValueError, "NaN"),
    ((C.to("meta"), L, None), ValueError, "point_coords is on meta.*predictor.device"),
]


@pytest.mark.parametrize("args,err,msg", BAD_TORCH_PROMPTS, ids=range(len(BAD_TORCH_PROMPTS)))
def test_bad_torch_prompt(pred, args, err, msg):
    with pytest.raises(err, match=msg):
        pred.predict_torch(*args)


def test_bad_torch_mask_input(pred):
    with pytest.raises(ValueError, match="Bx1x32x32"):
        pred.predict_torch(None, None, mask_input=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="needs a prompt"):
        pred.predict_torch(None, None)


# ---------------------------------------------------------------- AMG parameters
AMG_DEFAULTS = dict(
    points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
    stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, point_grids=None,
    min_mask_region_area=0, output_mode="binary_mask",
)
BAD_AMG = [
    (dict(point_grids=[np.zeros((4, 2))]), ValueError, "exactly one of points_per_side"),
    (dict(points_per_side=None), ValueError, "exactly one of points_per_side"),
    (dict(points_per_side=0), ValueError, "points_per_side must be >= 1"),
    (dict(points_per_side=3.5), TypeError, "points_per_side must be an int"),
    (dict(points_per_side=True), TypeError, "points_per_side must be an int"),
    (dict(points_per_batch=0), ValueError, "points_per_batch must be >= 1"),
    (dict(pred_iou_thresh=1.5), ValueError, "pred_iou_thresh must be <= 1"),
    (dict(stability_score_thresh=-0.1), ValueError, "stability_score_thresh must be >= 0"),
    (dict(stability_score_offset=0.0), ValueError, "stability_score_offset must be > 0"),
    (dict(box_nms_thresh=float("nan")), ValueError, "box_nms_thresh must be finite"),
    (dict(box_nms_thresh="0.7"), TypeError, "box_nms_thresh must be a number"),
    (dict(crop_n_layers=-1), ValueError, "crop_n_layers must be >= 0"),
    (dict(crop_nms_thresh=2), ValueError, "crop_nms_thresh must be <= 1"),
    (dict(crop_overlap_ratio=1.0), ValueError, "crop_overlap_ratio must be < 1"),
    (dict(crop_n_points_downscale_factor=0), ValueError, "crop_n_points_downscale_factor must be >= 1"),
    (dict(min_mask_region_area=-1), ValueError, "min_mask_region_area must be >= 0"),
    (dict(output_mode="png"), ValueError, "output_mode must be one of"),
    (dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2), ValueError, "leaves no points"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), ValueError, "needs 2"),
    (dict(points_per_side=None, point_grids=[np.full((4, 2), 2.0)]), ValueError, r"normalised to \[0, 1\]"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), ValueError, "Nx2"),
    (dict(points_per_side=None, point_grids=np.zeros((4, 2))), TypeError, "list of Nx2 arrays"),
]


@pytest.mark.parametrize("kw,err,msg", BAD_AMG, ids=range(len(BAD_AMG)))
def test_bad_amg_params(model, kw, err, msg):
    with pytest.raises(err, match=msg):
        check_amg_params(**dict(AMG_DEFAULTS, **kw))
    with pytest.raises(err, match=msg):
        SamAutomaticMaskGenerator(model, **kw)


def test_generate_batch_rejects_single_image(model):
    with pytest.raises(TypeError, match="generate"):
        SamAutomaticMaskGenerator(model, points_per_side=2).generate_batch(IMG)


# Seeded hypothesis fuzzing of predict / set_image / generate (>= 1,000 examples each, counted)
# lives in tests/test_robustness.py.


class _OOMDecoder(torch.nn.Module):
    def forward(self, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")


def test_predict_torch_oom_suggests_smaller_batch():
    ours = build_pair()[0]
    p = SamPredictor(ours)
    p.set_image(IMG)
    ours.mask_decoder = _OOMDecoder()
    with pytest.raises(torch.OutOfMemoryError, match="5 prompt.*smaller batches"):
        p.predict_torch(None, None, torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5))
