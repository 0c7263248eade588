"""The fused mask post-processing (``postprocess="triton"``) against ``Sam.postprocess_masks``.

The Triton interpreter must be on before the kernel is defined, so the comparisons run in a
child process (fp32 and fp16: the interpreter mishandles bfloat16)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_CHILD = textwrap.dedent(
    """
    import numpy as np
    import torch
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.compile import set_postprocess
    from segment_anything_fast.fused_postprocess import masks_from_logits
    from segment_anything_fast.predictor import SamPredictor

    import segment_anything_fast.fused_postprocess as fp
    fp._TILE = (32, 128)  # partial tiles at these sizes; few programs (the interpreter's cost)
    torch.manual_seed(5)  # fixed random weights whose AMG keeps 3 masks (checked below)
    sam = build_sam("tiny").eval()  # 128 px input, 32x32 low-res masks (scale 4)
    g = torch.Generator().manual_seed(0)
    cases = [  # low-res (h, w), input size, original size, dtype
        ((32, 32), (96, 128), (96, 128), torch.float32),   # no final resize
        ((32, 32), (96, 128), (60, 80), torch.float32),    # shrink
        ((32, 32), (128, 80), (200, 125), torch.float16),  # enlarge, fp16 logits
        ((32, 32), (77, 128), (53, 91), torch.float32),    # odd sizes
        ((24, 24), (128, 96), (33, 25), torch.float32),    # not an integer scale: (size, size) path
    ]
    for i, (hw, ins, orig, dt) in enumerate(cases):
        x = (torch.randn(1, 4, *hw, generator=g) * 3).to(dt)[:, 2:]  # multimask slice: not contiguous
        ref = sam.postprocess_masks(x, ins, orig)
        got = masks_from_logits(sam, x, ins, orig, return_logits=True)
        assert got.shape == ref.shape == (1, 2, *orig) and got.dtype == torch.float32, (i, got.shape)
        err = (got - ref).abs().max().item()
        assert err < 1e-5 * max(1.0, ref.abs().max().item()), (i, err)
        b = masks_from_logits(sam, x, ins, orig)
        assert b.dtype == torch.bool and b.shape == ref.shape
        # the same masks, except pixels within float noise of the threshold
        assert not ((b != (ref > sam.mask_threshold)) & (ref.abs() > 1e-4)).any(), i
    empty = masks_from_logits(sam, torch.zeros(0, 3, 32, 32), (96, 128), (60, 80))
    assert empty.shape == (0, 3, 60, 80)
    # more masks than one launch's second grid axis takes: chunked launches
    import segment_anything_fast.fused_postprocess as fp
    fp._MAX_GRID_Y = 2
    x = torch.randn(5, 32, 32, generator=g)
    assert torch.equal(masks_from_logits(sam, x, (96, 128), (12, 16)),
                       sam.postprocess_masks(x[:, None], (96, 128), (12, 16))[:, 0] > 0)
    s1, b1 = fp.mask_scores(sam, x, (96, 128), (12, 16), 1.0)
    fp._MAX_GRID_Y = 65535
    s2, b2 = fp.mask_scores(sam, x, (96, 128), (12, 16), 1.0)
    assert torch.equal(b1, b2) and torch.equal(s1.nan_to_num(-1), s2.nan_to_num(-1))

    # the packed launch: masks of several images of different sizes back to back, each the
    # per-image kernel's (resized or not, a mask larger than the others, an image without masks)
    fp._BLOCK = 1024  # several programs per mask at these sizes (5-25)
    sizes = [((96, 128), (60, 80), 2), ((128, 80), (200, 125), 1), ((77, 128), (77, 128), 0),
             ((77, 128), (77, 128), 3)]
    table, scales, offsets, total, max_px = fp.packed_layout(
        [a for a, _, _ in sizes], [b for _, b, _ in sizes], [k for _, _, k in sizes], 128)
    assert max_px == 200 * 125 and total == 2 * 4800 + 25000 + 3 * 77 * 128 and offsets[2] == offsets[3]
    x = (torch.randn(6, 4, 32, 32, generator=g) * 3)[:, 1:2]  # the best-mask slice: not contiguous
    flat = fp.packed_masks_from_logits(sam, x, torch.from_numpy(table), torch.from_numpy(scales),
                                       total, max_px)
    row = 0
    for (ins, orig, k), off in zip(sizes, offsets):
        ref = masks_from_logits(sam, x[row:row + k, 0], ins, orig)
        assert torch.equal(flat[off:off + ref.numel()].view(ref.shape), ref), (ins, orig)
        row += k
    fp._BLOCK = 1024

    # through the predictor: the same masks as the torch post-processing
    img = np.random.RandomState(0).randint(0, 256, (100, 150, 3), dtype=np.uint8)
    pts, lab = np.array([[30.0, 40.0], [100.0, 60.0]]), np.array([1, 0])
    with torch.no_grad():
        outs = {}
        for backend in ("torch", "triton"):
            set_postprocess(sam, backend)
            p = SamPredictor(sam)
            p.set_image(img)
            outs[backend] = (p.predict(pts, lab, multimask_output=True),
                             p.predict(pts, lab, multimask_output=False, return_logits=True))
    (m1, s1, l1), (g1, _, _) = outs["torch"]
    (m2, s2, l2), (g2, _, _) = outs["triton"]
    assert m1.dtype == m2.dtype == bool and m1.shape == m2.shape == (3, 100, 150)
    assert (m1 != m2).mean() <= 1e-4 and np.array_equal(s1, s2) and np.array_equal(l1, l2)
    assert g2.dtype == np.float32 and np.abs(g1 - g2).max() < 1e-4

    # the AMG's candidate scoring: stability scores and boxes without writing the masks
    from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator, _mask_scores
    from segment_anything_fast.fused_postprocess import mask_scores
    for i, (hw, ins, orig, dt) in enumerate(cases):
        x = (torch.randn(3, *hw, generator=g) * 3).to(dt)
        x[0] = -5.0  # an empty mask: box [0, 0, 0, 0], stability 0 / 0
        s_ref, b_ref = _mask_scores(sam, x, ins, orig, 1.0)
        s_got, b_got = mask_scores(sam, x, ins, orig, 1.0)
        assert b_got.dtype == torch.int64 and s_got.dtype == torch.float32, (b_got.dtype, s_got.dtype)
        assert torch.equal(b_got, b_ref), (i, b_got, b_ref)
        assert torch.allclose(s_got, s_ref, atol=1e-3, equal_nan=True), (i, s_got, s_ref)

    # generate() with the fused post-processing gives the torch post-processing's masks (a
    # small image and grid: the interpreter runs every program in Python)
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9)
    small = img[:60, :90]
    with torch.no_grad():
        a = SamAutomaticMaskGenerator(sam, **kw).generate(small)
        b = SamAutomaticMaskGenerator(sam, postprocess="triton", **kw).generate(small)
    assert len(a) == len(b) >= 2, (len(a), len(b))
    for ra, rb in zip(a, b):
        inter = (ra["segmentation"] & rb["segmentation"]).sum()
        union = (ra["segmentation"] | rb["segmentation"]).sum()
        assert union == 0 or inter / union > 0.99
        assert ra["bbox"] == rb["bbox"] and abs(ra["stability_score"] - rb["stability_score"]) < 1e-3
    print("OK")
    """
)


def test_fused_postprocess_matches_torch_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.bad_input
def test_bad_postprocess_choices():
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.build_sam_fast import build_sam_fast
    from segment_anything_fast.compile import set_postprocess
    from segment_anything_fast.fused_postprocess import masks_from_logits

    sam = build_sam("tiny").eval()
    with pytest.raises(ValueError, match="postprocess must be one of"):
        set_postprocess(sam, "cuda")
    with pytest.raises(ValueError, match="postprocess must be one of"):
        build_sam_fast("tiny", device="cpu", postprocess="fused")
    with pytest.raises(ValueError, match="postprocess='triton' needs device='cuda'"):
        build_sam_fast("tiny", device="cpu", postprocess="triton")
    from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator

    with pytest.raises(ValueError, match="postprocess must be 'torch' or 'triton'"):
        SamAutomaticMaskGenerator(sam, postprocess="cuda")
    with pytest.raises(ValueError, match="postprocess_compile_mode=None"):
        SamAutomaticMaskGenerator(sam, postprocess="triton", postprocess_compile_mode="default")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="needs a model on CUDA"):
            SamAutomaticMaskGenerator(sam, postprocess="triton")
    with pytest.raises(ValueError, match="input_size"):
        masks_from_logits(sam, torch.zeros(1, 3, 32, 32), (0, 128), (96, 128))
    from segment_anything_fast.fused_postprocess import packed_layout, packed_masks_from_logits

    with pytest.raises(ValueError, match="must lie within the model's 128x128 input"):
        packed_layout([(96, 200)], [(60, 80)], [1], 128)
    with pytest.raises(ValueError, match="differ in length"):
        packed_layout([(96, 128)], [], [1], 128)
    t, sc, _, total, mx = packed_layout([(96, 128)], [(60, 80)], [2], 128)
    with pytest.raises(ValueError, match=r"\(P, 5\) table"):
        packed_masks_from_logits(sam, torch.zeros(3, 32, 32), torch.from_numpy(t),
                                 torch.from_numpy(sc), total, mx)
    with pytest.raises(ValueError, match="float logits"):
        masks_from_logits(sam, torch.zeros(1, 3, 32, 32, dtype=torch.long), (96, 128), (96, 128))
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            masks_from_logits(sam, torch.zeros(1, 3, 32, 32), (96, 128), (96, 128))
