"""The DataLoader worker side of eval_combo's nested mode, timed on this machine's CPU.

Per image: the dataset item (decode, ground-truth masks from the annotations, cached center
points, resize with ``--preprocess host``) and its share of ``NestedCollate`` (packing the
batch and its ground-truth bits), in one process with one thread, as one DataLoader worker
runs them. Center points are computed once before the timing (a repeated eval run reads them
from its cache). Without ``--coco-root`` a synthetic COCO set of ``--images`` images is
generated in a temporary folder. Prints a table; ``--output`` writes it as JSON.

    python experiments/bench_loader.py --output experiments/results/loader_cpu.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import eval_combo as ec  # noqa: E402
from segment_anything_fast.data.coco_prompts import (  # noqa: E402
    CocoPointPromptDataset, load_coco, select_annotations,
)
from segment_anything_fast.validation import check_output_path  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco-root", default=None,
                   help="COCO-format root (annotations/instances_<split>.json + <split>/); default: "
                        "a generated set of --images images")
    p.add_argument("--split", default="val2017", help="split name (default val2017)")
    p.add_argument("--images", type=int, default=64, help="images to time (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="images per collated batch (default 8)")
    p.add_argument("--preprocess", choices=("triton", "host"), default="triton",
                   help="triton: items keep the decoded image (resized on the GPU); host: resized here")
    p.add_argument("--repeat", type=int, default=3, help="timed passes over the images (default 3)")
    p.add_argument("--image-size", type=int, default=1024, help="model input size (default 1024)")
    p.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    return p


def _time_pass(ds, collate, n: int, batch: int):
    """Seconds spent in dataset items and in the collate over one pass of n images."""
    t_item = t_collate = 0.0
    for b in range(0, n, batch):
        t0 = time.perf_counter()
        items = [ds[i] for i in range(b, min(n, b + batch))]
        t1 = time.perf_counter()
        collate(items)
        t_item, t_collate = t_item + t1 - t0, t_collate + time.perf_counter() - t1
    return t_item, t_collate


def run(args, root: str) -> dict:
    ann_path = os.path.join(root, "annotations", f"instances_{args.split}.json")
    coco = load_coco(ann_path)
    ids = sorted(coco.getImgIds())[:args.images]
    if not ids:
        raise SystemExit(f"bench_loader: no images in {ann_path}")
    anns = select_annotations(coco, ids)
    image_dir = os.path.join(root, args.split)
    cold = CocoPointPromptDataset(coco, image_dir, ids, anns, args.image_size, resize=False)
    # a warm cache, as in a repeated run: the points the dataset computes on its cache misses
    points = {k: v for i in range(len(ids)) for k, v in cold[i]["new_points"].items()}
    ds = CocoPointPromptDataset(coco, image_dir, ids, anns, args.image_size,
                                cached_points=points, resize=args.preprocess == "host")
    collate = ec.NestedCollate(args.image_size, args.batch_size, args.preprocess)
    n = len(ids)
    _time_pass(ds, collate, n, args.batch_size)  # warm-up: file cache, lazy imports
    passes = [_time_pass(ds, collate, n, args.batch_size) for _ in range(args.repeat)]
    item = statistics.median(p[0] for p in passes) / n * 1e3
    coll = statistics.median(p[1] for p in passes) / n * 1e3
    return {
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "opencv": cv2.__version__, "commit": ec.git_commit(), "dataset": root if args.coco_root else "generated",
        "images": n, "annotations": sum(len(anns[i]) for i in ids), "batch_size": args.batch_size,
        "preprocess": args.preprocess, "repeat": args.repeat,
        "item_ms_per_image": round(item, 3), "collate_ms_per_image": round(coll, 3),
        "worker_ms_per_image": round(item + coll, 3),
        "img_per_s_per_worker": round(1e3 / (item + coll), 1),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.repeat < 1:
        raise SystemExit("bench_loader: --images, --batch-size and --repeat must be >= 1")
    if args.output:
        check_output_path(args.output, "--output", directory=False)
    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    if args.coco_root:
        row = run(args, args.coco_root)
    else:
        from segment_anything_fast.data.synthetic_coco import write_coco_dataset

        with tempfile.TemporaryDirectory() as tmp:
            write_coco_dataset(tmp, args.images, seed=0, split=args.split)
            row = run(args, tmp)
    width = max(map(len, row))
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    if args.output:
        tmp_out = args.output + ".tmp"
        with open(tmp_out, "w") as f:
            json.dump(row, f, indent=1)
        os.replace(tmp_out, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
