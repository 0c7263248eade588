#!/usr/bin/env python
"""Write a generated COCO-format dataset (images + instances_<split>.json).

Example: python scripts/make_synthetic_coco.py --output datasets/synth --num-images 500

--heldout-of CHECKPOINT writes instead the held-out scenes whose mIoU a scripts/train_demo.py
checkpoint reports (same images and masks, PNG + RLE, lossless), so that
  python experiments/eval_combo.py --coco-root DIR --checkpoint CHECKPOINT
prints the training script's held-out mIoU.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from segment_anything_fast.data.synthetic_coco import IMAGE_FORMATS, write_coco_dataset  # noqa: E402


def _size(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}")
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return w, h


def _objects(text):
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"objects must look like 4-12, got {text!r}")
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"objects must satisfy 1 <= min <= max, got {text!r}")
    return lo, hi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True,
                   help="dataset root; writes <output>/<split>/ and <output>/annotations/instances_<split>.json")
    p.add_argument("--heldout-of", metavar="CHECKPOINT", default=None,
                   help="write the held-out scenes of this scripts/train_demo.py checkpoint ("
                        "'demo': the bundled one; its "
                        "meta's count and seed, its config's image size) instead of random ones; "
                        "excludes --num-images, --seed, --format, --size, --objects")
    p.add_argument("--num-images", type=int, default=None, help="number of images (default 100)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; image i depends only on (seed, i) (default 0)")
    p.add_argument("--split", default="val2017", help="split / image folder name (default val2017)")
    p.add_argument("--format", choices=IMAGE_FORMATS, default=None, help="image file format (default jpg)")
    p.add_argument("--size", type=_size, default=None,
                   help="fixed image size WxH, e.g. 640x480 (default: a mix of COCO-like sizes)")
    p.add_argument("--objects", type=_objects, default=None,
                   help="range of shapes drawn per image before occlusion, e.g. 4-12 (default)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes generating images in parallel; the output does not depend on "
                        "it (default min(8, CPUs))")
    args = p.parse_args(argv)
    random_flags = ("num_images", "seed", "format", "size", "objects")
    t0 = time.perf_counter()
    if args.heldout_of is not None:
        given = [f"--{f.replace('_', '-')}" for f in random_flags if getattr(args, f) is not None]
        if given:
            p.error(f"--heldout-of takes the scenes from the checkpoint; drop {', '.join(given)}")
        from segment_anything_fast.build_sam import resolve_checkpoint
        from segment_anything_fast.data.demo_scenes import heldout_of_checkpoint, write_heldout_coco

        try:
            n, long_side, seed = heldout_of_checkpoint(resolve_checkpoint(args.heldout_of))
            path = write_heldout_coco(args.output, n, long_side, seed, split=args.split)
        except (ValueError, FileNotFoundError) as e:
            p.error(f"--heldout-of: {e}")
    else:
        args.num_images = 100 if args.num_images is None else args.num_images
        if args.num_images < 1:
            p.error(f"--num-images must be >= 1, got {args.num_images}")
        if args.workers < 1:
            p.error(f"--workers must be >= 1, got {args.workers}")
        path = write_coco_dataset(args.output, args.num_images, seed=args.seed or 0,
                                  split=args.split, image_format=args.format or "jpg",
                                  size=args.size, num_objects=args.objects or (4, 12),
                                  workers=args.workers)
    from pycocotools.coco import COCO
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(path)
    n_rle = sum(isinstance(a["segmentation"], dict) for a in coco.dataset["annotations"])
    print(f"Wrote {len(coco.getImgIds())} images and {len(coco.getAnnIds())} annotations "
          f"({n_rle} RLE, {len(coco.getAnnIds()) - n_rle} polygon) in {time.perf_counter() - t0:.1f} s")
    print(f"  images:      {os.path.join(args.output, args.split)}")
    print(f"  annotations: {path}")


if __name__ == "__main__":
    main()
