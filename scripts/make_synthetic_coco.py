#!/usr/bin/env python
"""Write a generated COCO-format dataset (images + instances_<split>.json).

Example: python scripts/make_synthetic_coco.py --output datasets/synth --num-images 500
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
    p.add_argument("--num-images", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; image i depends only on (seed, i) (default 0)")
    p.add_argument("--split", default="val2017", help="split / image folder name (default val2017)")
    p.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image file format (default jpg)")
    p.add_argument("--size", type=_size, default=None,
                   help="fixed image size WxH, e.g. 640x480 (default: a mix of COCO-like sizes)")
    p.add_argument("--objects", type=_objects, default=(4, 12),
                   help="range of shapes drawn per image before occlusion, e.g. 4-12 (default)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes generating images in parallel; the output does not depend on "
                        "it (default min(8, CPUs))")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error(f"--num-images must be >= 1, got {args.num_images}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    t0 = time.perf_counter()
    path = write_coco_dataset(args.output, args.num_images, seed=args.seed, split=args.split,
                              image_format=args.format, size=args.size, num_objects=args.objects,
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
