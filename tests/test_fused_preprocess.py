"""fused_preprocess (one Triton kernel: PIL resize + normalise + pad of a packed batch) against PIL +
Sam.preprocess, and eval_combo's --preprocess triton packing, on CPU via TRITON_INTERPRET=1 (in a
child process: the interpreter must be on before the kernel is defined; fp32 and fp16 outputs,
as it mishandles bfloat16)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import torch
    sys.path.insert(0, os.path.join(%(root)r, "experiments"))
    import eval_combo as ec
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.data.coco_prompts import CocoPointPromptDataset, load_coco, select_annotations
    from segment_anything_fast.data.synthetic_coco import write_coco_dataset
    from segment_anything_fast.fused_preprocess import pack_images, preprocess_packed
    from segment_anything_fast.utils.transforms import ResizeLongestSide

    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    S = sam.image_encoder.img_size
    rng = np.random.default_rng(0)
    # grows (both ways, one axis long), unchanged, shrinks (PIL on the host), a 1-px-wide strip
    shapes = [(30, 40), (128, 128), (200, 90), (17, 128), (64, 5), (3, 1)]
    imgs = [(rng.random(hw + (3,)) * 255).astype(np.uint8) for hw in shapes]
    imgs[0][:10] = 255  # saturated rows: the clipping of both passes
    imgs[2][:, :7] = 0
    t = ResizeLongestSide(S)
    p = pack_images(imgs, S, batch=8)
    ref_u8 = torch.zeros(8, 3, S, S, dtype=torch.uint8)
    for i, im in enumerate(imgs):
        r = torch.from_numpy(t.apply_image(im)).permute(2, 0, 1)
        ref_u8[i, :, :r.shape[1], :r.shape[2]] = r
        assert tuple(p["sizes"][i].tolist()) == tuple(r.shape[1:]), (i, p["sizes"][i], r.shape)
    assert (p["sizes"][len(imgs):] == 0).all()
    ref = ec.normalize_batch(sam, ref_u8, p["sizes"], torch.float32)
    out = preprocess_packed(sam, p["pixels"], p["geometry"], p["x_coef"], p["y_coef"], torch.float32)
    assert out.shape == (8, 3, S, S) and out.dtype == torch.float32
    assert torch.equal(out, ref), (out - ref).abs().max()  # PIL's pixels, exactly
    half = preprocess_packed(sam, p["pixels"], p["geometry"], p["x_coef"], p["y_coef"], torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, ref.half())

    # eval_combo: --preprocess triton (images as decoded, resized by the kernel) gives the
    # host path's encoder input and predictions
    root = %(tmp)r
    write_coco_dataset(root, 3, seed=2, size=(100, 70))  # these grow to 128 px
    coco = load_coco(os.path.join(root, "annotations", "instances_val2017.json"))
    ids = sorted(coco.getImgIds())
    anns = select_annotations(coco, ids)
    host = CocoPointPromptDataset(coco, os.path.join(root, "val2017"), ids, anns, S)
    raw = CocoPointPromptDataset(coco, os.path.join(root, "val2017"), ids, anns, S, resize=False)
    a, b = [host[i] for i in range(3)], [raw[i] for i in range(3)]
    for x, y in zip(a, b):
        assert tuple(y["image"].shape[1:]) == y["original_size"] and x["input_size"] == y["input_size"]
        assert torch.equal(x["points"], y["points"])
    pa, pb = ec.pack_nested(a, S, 4), ec.pack_nested(b, S, 4, preprocess="triton")
    cpu = torch.device("cpu")
    assert torch.equal(ec.encoder_input(sam, pb, cpu, torch.float32),
                       ec.encoder_input(sam, pa, cpu, torch.float32))
    out_a = ec.predict_batch(sam, a, "nested", cpu, torch.float32, 4, pa)
    out_b = ec.predict_batch(sam, b, "nested", cpu, torch.float32, 4, pb)
    assert all(torch.equal(u, v) for u, v in zip(out_a, out_b))
    print("OK")
    """
)


def test_fused_preprocess_matches_pil_in_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _CHILD % {"root": ROOT, "tmp": str(tmp_path / "synth")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.bad_input
def test_bad_preprocess_input():
    from experiments import eval_combo as ec
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.fused_preprocess import pack_images, preprocess_packed

    with pytest.raises(ValueError, match=r"image 1 must be a non-empty \(H, W, 3\) uint8"):
        pack_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)], 128)
    with pytest.raises(ValueError, match="uint8"):
        pack_images([np.zeros((4, 4, 3), np.float32)], 128)
    sam = build_sam("tiny").eval()
    p = pack_images([np.zeros((4, 4, 3), np.uint8)], 128)
    with pytest.raises(ValueError, match=r"\(B, 128, 4\) coefficient tables"):
        preprocess_packed(sam, p["pixels"], p["geometry"], p["x_coef"][:, :64], p["y_coef"], torch.float32)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            preprocess_packed(sam, p["pixels"], p["geometry"], p["x_coef"], p["y_coef"], torch.float32)
    item = {"image": torch.zeros(3, 10, 20, dtype=torch.uint8), "input_size": (64, 128),
            "original_size": (10, 20), "points": torch.zeros(0, 2)}
    with pytest.raises(ValueError, match="not resized to its input size"):
        ec.pack_nested([item], 128)
    with pytest.raises(ValueError, match="preprocess must be one of"):
        ec.pack_nested([item], 128, preprocess="gpu")
    parser = ec.build_parser()
    for extra in (["--preprocess", "gpu"], ["--preprocess", "triton"],
                  ["--preprocess", "triton", "--prompt-batching", "padded"]):
        args = parser.parse_args(["--coco-root", "x", "--device", "cpu", *extra])
        with pytest.raises(SystemExit):
            ec.validate_args(args, parser)
