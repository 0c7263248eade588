"""AMG helpers and SamAutomaticMaskGenerator.generate parity with segment_anything (tiny model)."""
import numpy as np
import pytest
import torch
import torchvision
from segment_anything import SamAutomaticMaskGenerator as OrigAMG
from segment_anything.utils import amg as orig_amg

import segment_anything_fast.automatic_mask_generator as amg_mod
from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator, _near_crop_edge
from segment_anything_fast.utils import amg
from tests.oracle import build_pair


def _boxes(g, n, scale=100.0):
    b = torch.rand(n, 4, generator=g) * scale
    b[:, 2:] += b[:, :2] * 0.5
    return b


@pytest.mark.parametrize("n", [0, 1, 2, 50, 300, 999, 1001, 2500])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ncls", [1, 4])
def test_batched_nms_matches_torchvision(n, ties, ncls):
    g = torch.Generator().manual_seed(n * 7 + ncls + ties)
    boxes = _boxes(g, n)
    scores = torch.randint(0, 4, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    idxs = torch.randint(0, ncls, (n,), generator=g)
    for thr in (0.0, 0.3, 0.7, 1.0):
        ours = amg.batched_nms(boxes, scores, idxs, thr)
        ref = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, ref), (n, ties, ncls, thr)


def test_batched_nms_integer_boxes_and_duplicates():
    g = torch.Generator().manual_seed(3)
    boxes = torch.randint(0, 50, (400, 4), generator=g)
    boxes[:, 2:] += boxes[:, :2]
    boxes[100:200] = boxes[:100]  # exact duplicates
    scores = torch.rand(400, generator=g)
    scores[150:] = 0.5
    z = torch.zeros(400, dtype=torch.int64)
    assert torch.equal(amg.batched_nms(boxes.float(), scores, z, 0.7), torchvision.ops.batched_nms(boxes.float(), scores, z, 0.7))


def test_stability_score_and_boxes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 23, 31, generator=g) * 3
    for off in (0.5, 1.0, 2.5):
        ours = amg.calculate_stability_score(logits, 0.0, off)
        assert torch.equal(ours, orig_amg.calculate_stability_score(logits, 0.0, off))
    masks = logits > 2.0
    masks[0, 0] = False  # empty mask
    masks[1, 1] = False
    masks[1, 1, 5, 7] = True  # one pixel
    for m in (masks, masks[0], masks[0, 0], masks.flatten(0, 1), masks[:0]):
        ours, ref = amg.batched_mask_to_box(m), orig_amg.batched_mask_to_box(m)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype and torch.equal(ours, ref)


def test_rle_round_trip_and_coco():
    from pycocotools import mask as mask_utils

    g = torch.Generator().manual_seed(1)
    masks = torch.rand(9, 17, 13, generator=g) > 0.6
    masks[0] = True
    masks[1] = False
    masks[2, 0, 0] = True
    masks[3, -1, -1] = True
    rles = amg.mask_to_rle_pytorch(masks)
    assert rles == orig_amg.mask_to_rle_pytorch(masks)
    assert amg.mask_to_rle_pytorch(masks[:0]) == []
    for m, rle in zip(masks, rles):
        assert np.array_equal(amg.rle_to_mask(rle), m.numpy())
        assert amg.area_from_rle(rle) == int(m.sum())
        coco = amg.coco_encode_rle(rle)
        assert coco == orig_amg.coco_encode_rle(rle)
        assert np.array_equal(mask_utils.decode(coco).astype(bool), m.numpy())
    with pytest.raises(ValueError, match="counts sum"):
        amg.rle_to_mask({"size": [2, 2], "counts": [1, 1]})


@pytest.mark.parametrize("size", [(100, 150), (150, 100), (37, 37), (1, 5), (1500, 2250)])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.0, 512 / 1500, 0.5])
def test_crop_boxes_and_grids(size, layers, ratio):
    assert amg.generate_crop_boxes(size, layers, ratio) == orig_amg.generate_crop_boxes(size, layers, ratio)
    for a, b in zip(amg.build_all_layer_point_grids(8, layers, 2), orig_amg.build_all_layer_point_grids(8, layers, 2)):
        assert np.array_equal(a, b)


def test_uncrop_and_edge_helpers():
    g = torch.Generator().manual_seed(2)
    boxes = torch.randint(0, 60, (20, 4), generator=g)
    crop, orig_box = [30, 10, 90, 70], [0, 0, 120, 80]
    assert torch.equal(amg.uncrop_boxes_xyxy(boxes, crop), orig_amg.uncrop_boxes_xyxy(boxes, crop))
    assert torch.equal(amg.uncrop_boxes_xyxy(boxes[None], crop), orig_amg.uncrop_boxes_xyxy(boxes[None], crop))
    pts = torch.rand(20, 2, generator=g, dtype=torch.float64) * 60
    assert torch.equal(amg.uncrop_points(pts, crop), orig_amg.uncrop_points(pts, crop))
    near = orig_amg.is_box_near_crop_edge(boxes, crop, orig_box)
    assert torch.equal(amg.is_box_near_crop_edge(boxes, crop, orig_box), near)
    assert torch.equal(_near_crop_edge(boxes, crop, (80, 120)), near) and near.any() and not near.all()
    masks = torch.rand(3, 60, 60, generator=g) > 0.5
    assert torch.equal(amg.uncrop_masks(masks, crop, 80, 120), orig_amg.uncrop_masks(masks, crop, 80, 120))
    assert torch.equal(amg.box_xyxy_to_xywh(boxes[0]), orig_amg.box_xyxy_to_xywh(boxes[0]))
    batches = list(amg.batch_iterator(3, list(range(7)), np.arange(7)))
    assert [b[0] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="same length"):
        list(amg.batch_iterator(3, [1, 2], [1]))


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions(mode):
    rs = np.random.RandomState(0)
    for _ in range(5):
        m = rs.rand(40, 50) > 0.55
        for thr in (0, 3, 30, 10_000):
            a, ca = amg.remove_small_regions(m, thr, mode)
            b, cb = orig_amg.remove_small_regions(m, thr, mode)
            assert ca == cb and np.array_equal(a, b)


def test_mask_data():
    d = amg.MaskData(a=torch.arange(5), b=np.arange(5) * 2, c=list("abcde"))
    d.filter(torch.tensor([True, False, True, False, True]))
    assert d["a"].tolist() == [0, 2, 4] and d["b"].tolist() == [0, 4, 8] and d["c"] == ["a", "c", "e"]
    d.cat(amg.MaskData(a=torch.tensor([9]), b=np.array([9]), c=["z"]))
    d.filter(torch.tensor([3, 0]))
    assert d["a"].tolist() == [9, 0] and d["c"] == ["z", "a"]
    d.to_numpy()
    assert isinstance(d["a"], np.ndarray)
    with pytest.raises(TypeError, match="MaskData"):
        d["x"] = 3


# ---------------------------------------------------------------- generate() parity


def _blocks(seed, h=100, w=150):
    rs = np.random.RandomState(seed)
    img = np.zeros((h, w, 3), np.uint8) + rs.randint(0, 256, 3).astype(np.uint8)
    for _ in range(8):
        y0, x0 = rs.randint(0, h - 10), rs.randint(0, w - 10)
        img[y0 : y0 + rs.randint(10, 40), x0 : x0 + rs.randint(10, 50)] = rs.randint(0, 256, 3)
    return img


@pytest.fixture(scope="module")
def models():
    """Tiny pair with identical weights; prompt embeddings scaled so masks depend on the point
    (random weights otherwise give one speckled mask per image)."""
    ours, orig = build_pair(seed=1)
    sd = ours.state_dict()
    for k in sd:
        if "point_embeddings" in k or "gaussian" in k:
            sd[k] = sd[k] * 10
    ours.load_state_dict(sd)
    orig.load_state_dict(sd)
    return ours, orig


def _same_records(a, b, mode):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        if mode == "binary_mask":
            assert x["segmentation"].dtype == bool and np.array_equal(x["segmentation"], y["segmentation"])
        else:
            assert x["segmentation"] == y["segmentation"]
        for k in ("area", "bbox", "point_coords", "crop_box"):
            assert x[k] == y[k] and type(x[k]) is type(y[k]), k
        for k in ("predicted_iou", "stability_score"):
            assert type(x[k]) is float and abs(x[k] - y[k]) < 1e-4


BASE = dict(points_per_side=6, points_per_batch=10, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1)


@pytest.mark.parametrize(
    "mode,nms", [("binary_mask", 0.7), ("uncompressed_rle", 0.7), ("coco_rle", 0.7), ("uncompressed_rle", 1.0)]
)
def test_generate_parity(models, mode, nms):
    ours, orig = models
    img = _blocks(1)
    kw = dict(BASE, min_mask_region_area=20, output_mode=mode, box_nms_thresh=nms, crop_nms_thresh=nms)
    a = SamAutomaticMaskGenerator(ours, **kw).generate(img)
    _same_records(a, OrigAMG(orig, **kw).generate(img), mode)
    assert len(a) >= (5 if nms == 0.7 else 50)
    assert any(r["crop_box"] != [0, 0, 150, 100] for r in a)  # crop-layer masks survive


@pytest.mark.parametrize(
    "kw",
    [
        dict(points_per_side=4, crop_n_layers=0, pred_iou_thresh=0.0, stability_score_thresh=0.5),
        dict(points_per_side=8, crop_n_layers=1, crop_n_points_downscale_factor=2, pred_iou_thresh=0.0,
             stability_score_thresh=0.0, stability_score_offset=0.5, box_nms_thresh=0.9),
        dict(points_per_side=None, point_grids=[np.random.RandomState(0).rand(7, 2), np.array([[0.5, 0.5]])],
             crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_overlap_ratio=0.1),
        dict(points_per_side=4, pred_iou_thresh=0.99, stability_score_thresh=0.99, min_mask_region_area=5),
    ],
)
def test_generate_parity_options(models, kw):
    ours, orig = models
    img = _blocks(2, 90, 70)
    _same_records(SamAutomaticMaskGenerator(ours, **kw).generate(img), OrigAMG(orig, **kw).generate(img), "binary_mask")


def test_binary_masks_skip_the_rle_round_trip(models, monkeypatch):
    """binary_mask output without small-region cleanup copies the masks to the host directly
    (no RLE encode/decode), with the original's output."""
    ours, orig = models
    img = _blocks(1)
    kw = dict(BASE, box_nms_thresh=0.7)
    want = OrigAMG(orig, **kw).generate(img)

    def no_rle(*a, **k):
        raise AssertionError("RLE used for binary_mask output")

    monkeypatch.setattr(amg_mod, "mask_to_rle_pytorch", no_rle)
    monkeypatch.setattr(amg_mod, "rle_to_mask", no_rle)
    got = SamAutomaticMaskGenerator(ours, **kw).generate(img)
    _same_records(got, want, "binary_mask")
    assert len(got) >= 5
    for r in got:
        assert r["segmentation"].shape == img.shape[:2] and r["area"] == int(r["segmentation"].sum())
    with pytest.raises(AssertionError, match="RLE used"):  # the cleanup still works on RLEs
        SamAutomaticMaskGenerator(ours, **dict(kw, min_mask_region_area=20)).generate(img)


@pytest.mark.parametrize("compiled,compact_every", [(False, None), (True, None), (True, 40)])
def test_iou_prefilter_scores_only_passing_candidates(models, monkeypatch, compiled, compact_every):
    """The decoder runs on every batch of a crop before one IoU filter (or every
    _COMPACT_EVERY candidates); only candidates passing pred_iou_thresh are scored, in chunks
    of 3 * points_per_batch rows (the last padded when the scoring is compiled). The output
    is the unfiltered path's minus the failing candidates, and the original's."""
    ours, orig = models
    img = _blocks(1)
    base = dict(BASE, points_per_batch=4, crop_n_layers=0, box_nms_thresh=1.0)  # 36 points, 9 batches
    every = SamAutomaticMaskGenerator(ours, **base).generate(img)
    assert len(every) == 3 * 36
    t = float(np.float32(np.quantile([r["predicted_iou"] for r in every], 0.75)))  # exact in float32
    if compact_every:
        monkeypatch.setattr(amg_mod, "_COMPACT_EVERY", compact_every)
    kw = dict(base, pred_iou_thresh=t)
    gen = SamAutomaticMaskGenerator(ours, postprocess_compile_mode="default" if compiled else None, **kw)
    flushes, score_step = [], gen._score_pending  # per filter-and-score step: [batches, passing, rows per call]

    def counted_score_step(pending, *a):
        flushes.append([len(pending), sum(int((iou > t).sum()) for _, iou, _ in pending), []])
        return score_step(pending, *a)

    def counted_scores(model, low_res, *a):
        flushes[-1][2].append(len(low_res))
        return amg_mod._mask_scores(model, low_res, *a)

    gen._score_pending, gen._scores = counted_score_step, counted_scores
    got = gen.generate(img)
    want = [r for r in every if r["predicted_iou"] > t]
    assert 0 < len(got) == len(want) < len(every)
    _same_records(got, want, "binary_mask")
    _same_records(got, OrigAMG(orig, **kw).generate(img), "binary_mask")

    assert [b for b, _, _ in flushes] == ([4, 4, 1] if compact_every else [9])  # batches of 12 candidates
    assert sum(p for _, p, _ in flushes) == len(want)
    for _, passing, rows in flushes:
        assert rows[:-1] == [12] * (len(rows) - 1) and 0 < rows[-1] <= 12
        assert sum(rows) == (-(-passing // 12) * 12 if compiled else passing)
    assert compact_every or len(flushes[0][2]) == 3  # 27 candidates pass: 12 + 12 + 3 (padded to 12)


_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _OOMOnBigBatches(SamAutomaticMaskGenerator):
    def _process_batch(self, points, *args):
        if len(points) > 3:
            raise _OOM
        return super()._process_batch(points, *args)


def _oom_on_big_chunks(model, low_res, *args):
    if len(low_res) > 6:
        raise _OOM
    return amg_mod._mask_scores(model, low_res, *args)


@pytest.mark.parametrize("where", ["decoder", "scoring"])
def test_oom_halves_points_per_batch(models, where):
    ours, _ = models
    img = _blocks(1)
    kw = dict(BASE, points_per_batch=16, output_mode="uncompressed_rle")
    ref = SamAutomaticMaskGenerator(ours, **kw).generate(img)
    gen = (_OOMOnBigBatches if where == "decoder" else SamAutomaticMaskGenerator)(ours, **kw)
    if where == "scoring":  # 48, 24 and 12 rows fail, 6 rows (points_per_batch=2) pass
        gen._scores = _oom_on_big_chunks
    with pytest.warns(UserWarning, match="points_per_batch=8"):
        out = gen.generate(img)
    assert gen.points_per_batch == 2
    _same_records(out, ref, "uncompressed_rle")


def _close_records(a, b):
    """Same masks up to float noise of a batched encoder call."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        mx, my = amg.rle_to_mask(x["segmentation"]), amg.rle_to_mask(y["segmentation"])
        assert (mx & my).sum() >= 0.99 * (mx | my).sum()
        assert abs(x["predicted_iou"] - y["predicted_iou"]) < 1e-3 and x["crop_box"] == y["crop_box"]


@pytest.mark.parametrize("layers,enc_bs", [(0, 4), (1, 3)])
def test_generate_batch(models, layers, enc_bs):
    ours, _ = models
    gen = SamAutomaticMaskGenerator(ours, **dict(BASE, crop_n_layers=layers, output_mode="uncompressed_rle"))
    imgs = [_blocks(1), _blocks(3, 64, 64), _blocks(4, 30, 90)]
    out = gen.generate_batch(imgs, encoder_batch_size=enc_bs)
    assert len(out) == 3 and sum(map(len, out)) > 3
    for o, im in zip(out, imgs):
        _close_records(o, gen.generate(im))
    with pytest.raises(ValueError, match=r"images\[1\].*RGBA"):
        gen.generate_batch([imgs[0], np.zeros((5, 5, 4), np.uint8)])
    with pytest.raises(ValueError, match="encoder_batch_size must be >= 1"):
        gen.generate_batch(imgs, encoder_batch_size=0)


def test_compiled_postprocess_gives_the_same_records(models):
    """postprocess_compile_mode: the inductor-fused scoring keeps the original's output."""
    ours, orig = models
    img = _blocks(3)
    kw = dict(BASE, crop_n_layers=0)
    fast = SamAutomaticMaskGenerator(ours, postprocess_compile_mode="default", **kw)
    assert fast._scores is not SamAutomaticMaskGenerator(ours, **kw)._scores
    a = fast.generate(img)
    _same_records(a, OrigAMG(orig, **kw).generate(img), "binary_mask")
    assert len(a) >= 3
    for h, w in ((90, 70), (64, 100)):  # other sizes: automatic dynamic shapes, same output
        other = _blocks(4, h, w)
        _same_records(fast.generate(other), OrigAMG(orig, **kw).generate(other), "binary_mask")
    with pytest.raises(ValueError, match="compile mode"):
        SamAutomaticMaskGenerator(ours, postprocess_compile_mode="fastest")


def test_default_postprocess_follows_the_model_device(models, monkeypatch):
    """postprocess=None: the torch ops for a CPU model, our Triton scoring for a CUDA model
    unless postprocess_compile_mode asks for inductor's."""
    from segment_anything_fast import fused_postprocess
    from segment_anything_fast.modeling.sam import Sam

    ours, _ = models
    assert SamAutomaticMaskGenerator(ours, **BASE)._scores is amg_mod._mask_scores
    monkeypatch.setattr(Sam, "device", property(lambda self: torch.device("cuda")))
    assert SamAutomaticMaskGenerator(ours, **BASE)._scores is fused_postprocess.mask_scores
    compiled = SamAutomaticMaskGenerator(ours, postprocess_compile_mode="default", **BASE)
    assert compiled._scores is not fused_postprocess.mask_scores
    assert compiled._scores is not amg_mod._mask_scores


def test_compiled_rendering_matches_eager(models):
    """postprocess_compile_mode also renders the survivors (upscale, threshold, area) through a
    compiled _render_masks on chunks of one padded shape: the masks and areas equal the eager
    function's bit for bit, and the records the eager generator's."""
    ours, _ = models
    img = _blocks(1)
    kw = dict(BASE, points_per_batch=4, crop_n_layers=0, box_nms_thresh=1.0)  # 108 survivors
    fast = SamAutomaticMaskGenerator(ours, postprocess_compile_mode="default", **kw)
    assert fast._render is not amg_mod._render_masks
    compiled, chunks = fast._render, []

    def checked(model, low_res, input_size, image_size, count):
        masks, areas = compiled(model, low_res, input_size, image_size, count)
        want = amg_mod._render_masks(model, low_res, input_size, image_size, count)[0]
        assert masks.dtype == torch.bool and torch.equal(masks, want)
        chunks.append((low_res.clone(), input_size, image_size))
        return masks, areas

    fast._render = checked
    got = fast.generate(img)
    _same_records(got, SamAutomaticMaskGenerator(ours, **kw).generate(img), "binary_mask")
    assert len(got) == 108 and [len(c[0]) for c in chunks] == [12] * 9  # 3 * points_per_batch rows
    for low_res, input_size, image_size in chunks[:2]:  # with the areas (the CUDA path's)
        masks, areas = compiled(ours, low_res, input_size, image_size, True)
        want, want_areas = amg_mod._render_masks(ours, low_res, input_size, image_size, True)
        assert torch.equal(masks, want) and areas.dtype == torch.int64 and torch.equal(areas, want_areas)
        assert areas.tolist() == [int(m.sum()) for m in want]


def test_to_device_and_filter_on_the_host():
    """to_device: same values and dtype (non-blocking through pinned memory on CUDA);
    MaskData.filter moves the index once per device."""
    for a in (np.arange(5, dtype=np.int64), np.linspace(0, 1, 6).reshape(3, 2), torch.tensor([1.5, 2.5])):
        t = amg.to_device(a, "cpu")
        assert t.dtype == torch.as_tensor(a).dtype and torch.equal(t, torch.as_tensor(a))
    d = amg.MaskData(a=torch.arange(4), b=torch.arange(4) * 2, c=np.arange(4))
    d.filter(torch.tensor([2, 0]))
    assert d["a"].tolist() == [2, 0] and d["b"].tolist() == [4, 0] and d["c"].tolist() == [2, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layers", [0, 1])
def test_cuda_binary_masks_match_the_original(models, layers):
    """On CUDA the masks come back through one page-locked block and one synchronize at the
    end (non-blocking copies): the records equal the original's on the same GPU."""
    ours, orig = (m.cuda() for m in models)
    try:
        img = _blocks(1)
        kw = dict(BASE, crop_n_layers=layers, box_nms_thresh=0.7 if layers else 1.0)
        got = SamAutomaticMaskGenerator(ours, **kw).generate(img)
        _same_records(got, OrigAMG(orig, **kw).generate(img), "binary_mask")
        assert len(got) >= 5 and all(r["area"] == int(r["segmentation"].sum()) for r in got)
    finally:
        ours.cpu(), orig.cpu()
