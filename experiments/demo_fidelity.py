#!/usr/bin/env python
"""Fidelity of dtypes and compression modes on trained weights: masks vs the fp32 model's.

For a scripts/train_demo.py checkpoint (default: the bundled demo model) and its held-out
scenes (the ones whose mIoU the checkpoint records), every object is prompted with its center
point (eval_combo's protocol). For each setting the script reports the mIoU against the ground
truth and the IoU of each predicted mask with the fp32 model's mask for the same prompt (mean
and min over objects). Settings that cannot run here (fp8 and 2:4 need CUDA) are listed as
skipped with the reason. Eager models (no compile), TF32 off. Appends rows to --output (CSV).

    python experiments/demo_fidelity.py --device cpu --output experiments/results/demo_fidelity_cpu.csv
"""
import argparse
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from segment_anything_fast.build_sam import AUTO, build_sam, resolve_checkpoint  # noqa: E402
from segment_anything_fast.build_sam_fast import build_sam_fast  # noqa: E402
from segment_anything_fast.data.coco_prompts import mask_iou  # noqa: E402
from segment_anything_fast.data.demo_scenes import (  # noqa: E402
    heldout_of_checkpoint, heldout_scenes, point_prompt_masks,
)
from segment_anything_fast.quantize import COMPRESS_MODES  # noqa: E402
from segment_anything_fast.validation import check_output_path  # noqa: E402

SETTINGS = ["bfloat16"] + [f"bfloat16+{m}" for m in COMPRESS_MODES if m != "none"]
FIELDS = ["setting", "status", "n_objects", "miou_gt", "iou_vs_fp32_mean", "iou_vs_fp32_min",
          "seconds", "checkpoint", "scenes", "device", "gpu", "torch", "commit"]


def build(setting: str, checkpoint: str, device: torch.device):
    dtype_name, _, compress = setting.partition("+")
    return build_sam_fast(AUTO, checkpoint, dtype=getattr(torch, dtype_name), attention="sdpa",
                          compile_mode=None, decoder_compile_mode=None, device=device,
                          compress=compress or "none")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo", help="train_demo checkpoint (default: the bundled demo)")
    ap.add_argument("--scenes", type=int, default=None,
                    help="use the first N held-out scenes (default: all the checkpoint records)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--commit", default="", help="git commit of the code (when .git is absent)")
    ap.add_argument("--output", required=True, help="CSV to append rows to")
    args = ap.parse_args(argv)
    from bench_encoder import git_commit

    try:
        check_output_path(args.output, "--output", directory=False)
    except ValueError as e:
        ap.error(str(e))
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        n, long_side, seed = heldout_of_checkpoint(ckpt)
    except (FileNotFoundError, ValueError) as e:
        ap.error(f"--checkpoint: {e}")
    if args.scenes is not None:
        if args.scenes < 1:
            ap.error("--scenes must be >= 1.")
        n = min(n, args.scenes)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    scenes = heldout_scenes(n, long_side, seed)
    ref = point_prompt_masks(build_sam(AUTO, ckpt).to(device), scenes)
    gt_iou = lambda pairs: torch.cat([mask_iou(p, g) for p, g in pairs])  # noqa: E731
    meta = dict(checkpoint=os.path.basename(ckpt), scenes=n, device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, commit=git_commit(args.commit))
    rows = [dict(meta, setting="float32", status="ok", n_objects=sum(len(g) for _, g in ref),
                 miou_gt=float(gt_iou(ref).mean()), iou_vs_fp32_mean=1.0, iou_vs_fp32_min=1.0)]
    for setting in args.settings:
        t = time.time()
        try:
            pairs = point_prompt_masks(build(setting, ckpt, device), scenes)
        except (RuntimeError, ValueError, ImportError) as e:  # e.g. fp8 / 2:4 need CUDA
            rows.append(dict(meta, setting=setting, status=f"skipped: {str(e).splitlines()[0][:200]}"))
            continue
        agree = torch.cat([mask_iou(p, r) for (p, _), (r, _) in zip(pairs, ref)])
        rows.append(dict(meta, setting=setting, status="ok", n_objects=len(agree),
                         miou_gt=float(gt_iou(pairs).mean()), iou_vs_fp32_mean=float(agree.mean()),
                         iou_vs_fp32_min=float(agree.min()), seconds=round(time.time() - t, 1)))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    new = not os.path.exists(args.output)
    with open(args.output, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"{'setting':28s} {'mIoU (GT)':>9s} {'IoU vs fp32 mean':>16s} {'min':>7s}  status")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['setting']:28s} {r['miou_gt']:9.4f} {r['iou_vs_fp32_mean']:16.4f} "
                  f"{r['iou_vs_fp32_min']:7.4f}  ok")
        else:
            print(f"{r['setting']:28s} {'':9s} {'':16s} {'':7s}  {r['status']}")
    print(f"appended {len(rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
