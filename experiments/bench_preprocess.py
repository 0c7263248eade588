"""fused_preprocess on the GPU: its encoder input against PIL's resize + the normalisation of
eval_combo (fp32 difference, bf16 equality) for 8 images of COCO-like sizes (one grows along one
axis only, one shrinks, one keeps its size), its kernel time per batch, and the host time of
pack_images. Prints the results (CUDA only).

    python experiments/bench_preprocess.py
"""
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import eval_combo as ec  # noqa: E402
from segment_anything_fast.build_sam import build_sam  # noqa: E402
from segment_anything_fast.fused_preprocess import pack_images, preprocess_packed  # noqa: E402
from segment_anything_fast.utils.transforms import ResizeLongestSide  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_preprocess needs a CUDA GPU (the CPU check is tests/test_fused_preprocess.py)")
    sam = build_sam("vit_b").cuda().eval()
    rng = np.random.default_rng(0)
    shapes = [(480, 640), (640, 480), (427, 640), (1024, 768), (333, 500), (1500, 900), (500, 375), (20, 1000)]
    imgs = [(rng.random(hw + (3,)) * 255).astype(np.uint8) for hw in shapes]
    t = ResizeLongestSide(1024)
    p = pack_images(imgs, 1024, 8)
    ref = torch.zeros(8, 3, 1024, 1024, dtype=torch.uint8)
    for i, im in enumerate(imgs):
        r = torch.from_numpy(t.apply_image(im)).permute(2, 0, 1)
        ref[i, :, :r.shape[1], :r.shape[2]] = r
    refx = ec.normalize_batch(sam, ref.cuda(), p["sizes"].cuda(), torch.float32)
    dev = [p[k].cuda() for k in ("pixels", "geometry", "x_coef", "y_coef")]
    d = (preprocess_packed(sam, *dev, torch.float32) - refx).abs()
    print("fp32 max abs diff", d.max().item(), "n differing", int((d > 0).sum()))
    out = preprocess_packed(sam, *dev, torch.bfloat16)
    print("bf16 n differing from ref.bf16()", int((out != refx.bfloat16()).sum()))
    for _ in range(3):
        preprocess_packed(sam, *dev, torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        preprocess_packed(sam, *dev, torch.bfloat16)
    torch.cuda.synchronize()
    print("kernel ms per batch of 8", (time.perf_counter() - t0) / 50 * 1e3)
    t0 = time.perf_counter()
    for _ in range(20):
        pack_images(imgs, 1024, 8)
    print("pack_images ms per batch of 8 (host)", (time.perf_counter() - t0) / 20 * 1e3)


if __name__ == "__main__":
    main()
