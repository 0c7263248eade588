#!/usr/bin/env python
"""Automatic mask generation ("segment everything") for an image or a folder of images.

Output is the original segment_anything scripts/amg.py format: per image a folder
<output>/<name>/ with one PNG per mask (0.png, 1.png, ...) and metadata.csv, or with
--convert-to-rle one <output>/<name>.json holding the masks as COCO RLE. Folders are searched
recursively and the sub-folder layout is kept. Every file is written to a temporary name and
renamed, so an interrupted run leaves no partial output; --resume skips images whose output
is complete. Unreadable images are reported and skipped; the exit status is 1 if any failed.

Under torchrun each rank (one per GPU, cuda:LOCAL_RANK) processes a disjoint shard of the
images and writes their outputs itself; rank 0 prints the summary and the failures of all ranks.

Example (no download): the bundled demo model (a small SAM trained on generated shapes) on
the bundled generated scene; without --checkpoint the model has random weights:
  python scripts/amg.py --checkpoint demo --output out/ --overlay
  torchrun --nproc-per-node 2 scripts/amg.py --input images/ --output out/ --checkpoint sam.pth
"""
import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from typing import List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import segment_anything_fast  # noqa: E402
from segment_anything_fast.distributed import (  # noqa: E402
    DEFAULT_TIMEOUT_S, DistContext, RankFailedError, finish, init_distributed, print_failure,
    shard,
)
from segment_anything_fast.build_sam import DEMO_AMG_SETTINGS, DEMO_CHECKPOINT  # noqa: E402
from segment_anything_fast.validation import (  # noqa: E402
    check_checkpoint_arg, check_output_path, explain_os_error,
)

# A generated scene of the demo model's training kind (data.synthetic_coco.write_sample_image with noise=True).
SAMPLE_IMAGE = os.path.join(os.path.dirname(segment_anything_fast.__file__), "assets",
                            "demo_scene.jpg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm",
              ".pgm", ".ppm")
# tiny: SAM_CONFIGS["tiny"]; auto: the config stored in --checkpoint, else its official type
MODEL_TYPES = ("default", "vit_h", "vit_l", "vit_b", "tiny", "auto")
TMP_TAG = ".amg-tmp-"
METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
                   "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
AMG_FLAGS = (
    ("points-per-side", int, "points sampled along one side of the image (grid is n x n)"),
    ("points-per-batch", int, "points the model runs at once; higher is faster, uses more memory"),
    ("pred-iou-thresh", float, "drop masks whose predicted IoU is below this (0-1)"),
    ("stability-score-thresh", float, "drop masks whose stability score is below this (0-1)"),
    ("stability-score-offset", float, "logit offset used when computing the stability score"),
    ("box-nms-thresh", float, "box IoU above which duplicate masks are removed"),
    ("crop-n-layers", int, "extra layers of image crops to run on (0 = whole image only)"),
    ("crop-nms-thresh", float, "box IoU above which duplicates across crops are removed"),
    ("crop-overlap-ratio", float, "overlap of neighbouring crops, as a fraction of crop size"),
    ("crop-n-points-downscale-factor", int, "points-per-side divisor per crop layer"),
    ("min-mask-region-area", int, "remove islands/holes smaller than this many pixels (OpenCV)"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=SAMPLE_IMAGE,
                   help="an image, or a folder searched recursively for "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTS[:7])}... images "
                        "(default: the bundled generated scene assets/demo_scene.jpg)")
    p.add_argument("--output", required=True,
                   help="folder for the results (created if missing)")
    p.add_argument("--model-type", default=None,
                   help=f"one of {', '.join(MODEL_TYPES)}; default: auto with --checkpoint (the "
                        "architecture stored in the file, e.g. by scripts/train_demo.py, else the "
                        "official type its weights match), vit_b without (quick demo); tiny is the "
                        "test-sized model")
    p.add_argument("--checkpoint", default=None,
                   help="SAM checkpoint file, or 'demo': the bundled demo model (3.8M "
                        "parameters, trained on generated shapes only); without it the model has "
                        "RANDOM weights and the masks are meaningless (the run only demonstrates "
                        "the pipeline)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--fast", action="store_true",
                   help="CUDA only: build with build_sam_fast (bf16, fused attention, "
                        "torch.compile); the first image includes compile time. On CUDA the "
                        "mask scoring runs as our Triton kernels with or without it")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights when there is no --checkpoint (default 0)")
    p.add_argument("--convert-to-rle", action="store_true",
                   help="write one <name>.json per image with COCO RLE masks instead of a "
                        "folder of PNG masks")
    p.add_argument("--overlay", action="store_true",
                   help="also write <name>_overlay.png: the image with coloured masks")
    p.add_argument("--batch-images", type=int, default=1,
                   help="images per generate_batch call (image encoder batched over images and "
                        "crops; faster on GPUs, more memory; default 1)")
    p.add_argument("--resume", action="store_true",
                   help="skip images whose output (and overlay, with --overlay) already exists")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others (model setup, the "
                        "final summary) before the run fails; must cover the spread of the "
                        f"ranks' finishing times (default {DEFAULT_TIMEOUT_S:.0f})")
    g = p.add_argument_group("AMG settings (defaults: SamAutomaticMaskGenerator's)")
    for name, typ, text in AMG_FLAGS:
        g.add_argument(f"--{name}", type=typ, default=None, help=text)
    return p


def amg_kwargs(args, defaults=None) -> dict:
    """The AMG settings given on the command line, over ``defaults`` (else the generator's)."""
    out = dict(defaults or {})
    for name, _, _ in AMG_FLAGS:
        v = getattr(args, name.replace("-", "_"))
        if v is not None:
            out[name.replace("-", "_")] = v
    return out


def find_images(path: str) -> List[Tuple[str, str]]:
    """(image path, output name relative to --output without extension), sorted."""
    if os.path.isfile(path):
        return [(path, os.path.splitext(os.path.basename(path))[0])]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder.")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."):
                full = os.path.join(dirpath, f)
                found.append((full, os.path.splitext(os.path.relpath(full, path))[0]))
    if not found:
        raise FileNotFoundError(
            f"No images ({', '.join(IMAGE_EXTS)}) found under {path!r}.")
    names = {}
    for full, name in found:
        names.setdefault(name, []).append(full)
    clashes = [v for v in names.values() if len(v) > 1]
    if clashes:
        raise ValueError(
            "These inputs would write the same output name (same path without extension): "
            + "; ".join(" vs ".join(c) for c in clashes[:5]) + ". Rename or move them.")
    return found


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); gray, RGBA and 16-bit files are converted. Raises ValueError."""
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError("could not be decoded as an image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def output_paths(output: str, name: str, rle: bool) -> Tuple[str, str]:
    base = os.path.join(output, name)
    return (base + ".json" if rle else base), base + "_overlay.png"


def is_complete(output: str, name: str, rle: bool, overlay: bool) -> bool:
    main, ov = output_paths(output, name, rle)
    done = os.path.isfile(main) if rle else os.path.isfile(os.path.join(main, "metadata.csv"))
    return done and (not overlay or os.path.isfile(ov))


def _tmp_name(final: str, suffix: str = "") -> str:
    d, b = os.path.split(final)
    return os.path.join(d, f".{b}{TMP_TAG}{os.getpid()}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(output: str, own_only: bool = False) -> int:
    """Remove temporary files/folders left by killed runs (not those of running ones).

    ``own_only``: remove only this process's (other ranks may run on other hosts, where a
    pid check says nothing).
    """
    removed = 0
    for dirpath, dirnames, filenames in os.walk(output):
        for entry in list(dirnames) + filenames:
            if TMP_TAG not in entry:
                continue
            pid_text = entry.split(TMP_TAG, 1)[1].split(".", 1)[0]
            mine = pid_text == str(os.getpid())
            if own_only and not mine:
                continue
            if pid_text.isdigit() and not mine and _pid_alive(int(pid_text)):
                continue
            full = os.path.join(dirpath, entry)
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
                dirnames.remove(entry)
            else:
                os.remove(full)
            removed += 1
    return removed


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("ascii")
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _write_png(path: str, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    buf.tofile(path)


def write_masks_folder(masks: List[dict], final_dir: str) -> None:
    """The original format (0.png, 1.png, ..., metadata.csv), written to a temp folder + rename."""
    tmp = _tmp_name(final_dir)
    try:
        os.makedirs(tmp)
        rows = [METADATA_HEADER]
        for i, m in enumerate(masks):
            _write_png(os.path.join(tmp, f"{i}.png"), m["segmentation"].astype(np.uint8) * 255)
            meta = [str(i), str(m["area"]), *[str(x) for x in m["bbox"]],
                    *[str(x) for x in m["point_coords"][0]], str(m["predicted_iou"]),
                    str(m["stability_score"]), *[str(x) for x in m["crop_box"]]]
            rows.append(",".join(meta))
        with open(os.path.join(tmp, "metadata.csv"), "w") as f:
            f.write("\n".join(rows))
    except BaseException as e:  # e.g. disk full: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise explain_os_error(e, final_dir) from e
        raise
    old = None
    if os.path.exists(final_dir):
        old = _tmp_name(final_dir, ".old")
        os.rename(final_dir, old)
    os.rename(tmp, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(final: str, data: bytes) -> None:
    tmp = _tmp_name(final, os.path.splitext(final)[1])
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:  # e.g. disk full: leave no half-written file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise explain_os_error(e, final) from e
        raise


def overlay_image(image: np.ndarray, masks: List[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """BGR uint8 image with each mask in its own colour (largest first) and its outline."""
    out = np.ascontiguousarray(image[..., ::-1], dtype=np.float32)  # cv2 needs C order
    rng = np.random.default_rng(0)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    colors = rng.integers(40, 256, size=(max(len(masks), 1), 3))
    for rank, i in enumerate(order):
        m = masks[i].astype(bool)
        out[m] = out[m] * (1 - alpha) + colors[rank] * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for rank, i in enumerate(order):
        contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, [int(c) for c in colors[rank]], 1)
    return out


def _binary(masks: List[dict]) -> List[np.ndarray]:
    from pycocotools import mask as mask_utils

    out = []
    for m in masks:
        seg = m["segmentation"]
        if isinstance(seg, dict):
            counts = seg["counts"]
            seg = mask_utils.decode({"size": seg["size"],
                                     "counts": counts.encode() if isinstance(counts, str) else counts})
        out.append(np.asarray(seg, dtype=bool))
    return out


def build_model(args, verbose: bool = True):
    from segment_anything_fast.build_sam import build_sam

    model_type = args.model_type or ("auto" if args.checkpoint else "vit_b")
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
    if args.checkpoint is None and verbose:
        print(f"NOTE: no --checkpoint: using {model_type} with RANDOM weights (seed {args.seed}); "
              "the masks show the pipeline, not real segmentations. Pass --checkpoint demo (the "
              "bundled demo model, generated shapes only) or a downloaded SAM checkpoint for "
              "meaningful masks.", file=sys.stderr)
    if args.fast:
        from segment_anything_fast.build_sam_fast import build_sam_fast

        return build_sam_fast(model_type, args.checkpoint, device=args.device), model_type
    return build_sam(model_type, args.checkpoint).to(args.device), model_type


def _write_outputs(args, name: str, image: np.ndarray, masks: List[dict]) -> Tuple[str, str]:
    main_path, overlay_path = output_paths(args.output, name, args.convert_to_rle)
    os.makedirs(os.path.dirname(main_path) or ".", exist_ok=True)
    if args.overlay:
        ok, buf = cv2.imencode(".png", overlay_image(image, _binary(masks)))
        if not ok:
            raise RuntimeError("PNG encoding of the overlay failed")
        write_file_atomic(overlay_path, buf.tobytes())
    if args.convert_to_rle:
        write_file_atomic(main_path, json.dumps(masks, default=_json_default).encode())
    else:
        write_masks_folder(masks, main_path)
    return main_path, overlay_path


def _generate(generator, images: List[np.ndarray]) -> List:
    """Masks per image (generate_batch for several); an exception is returned in its slot."""
    if len(images) > 1:
        try:
            return generator.generate_batch(images, encoder_batch_size=len(images))
        except Exception:  # isolate the image that fails by running them one by one
            pass
    out = []
    for im in images:
        try:
            out.append(generator.generate(im))
        except Exception as e:
            out.append(e)
    return out


def _run_all(args, generator, targets, failures, show_progress: bool = True,
             print_each: Optional[bool] = None) -> Tuple[int, int, int]:
    """Process every target; append (path, reason) to ``failures``; return counts.

    ``print_each``: print a line per written image (default: when there is one target).
    """
    if print_each is None:
        print_each = len(targets) == 1
    from tqdm import tqdm

    skipped = written = n_masks = 0
    todo = []
    for path, name in targets:
        if args.resume and is_complete(args.output, name, args.convert_to_rle, args.overlay):
            skipped += 1
        else:
            todo.append((path, name))
    bar = tqdm(total=len(todo), desc="AMG", unit="img", file=sys.stderr,
               disable=len(todo) < 2 or not show_progress)

    def fail(path, e):
        failures.append((path, f"{type(e).__name__}: {e}"))
        tqdm.write(f"skipping {path}: {e}", file=sys.stderr)

    for start in range(0, len(todo), args.batch_images):
        chunk, images = [], []
        for path, name in todo[start:start + args.batch_images]:
            try:
                images.append(read_image(path))
                chunk.append((path, name))
            except Exception as e:
                fail(path, e)
                bar.update(1)
        for (path, name), image, masks in zip(chunk, images, _generate(generator, images)):
            bar.update(1)
            if isinstance(masks, Exception):
                fail(path, masks)
                continue
            try:
                main_path, overlay_path = _write_outputs(args, name, image, masks)
            except Exception as e:  # e.g. disk full: report, go on with the others
                fail(path, e)
                continue
            written += 1
            n_masks += len(masks)
            if print_each:
                print(f"{path}: {len(masks)} masks -> {main_path}"
                      + (f" (+ {overlay_path})" if args.overlay else ""))
    bar.close()
    return written, skipped, n_masks


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_type is not None and args.model_type not in MODEL_TYPES:
        parser.error(f"--model-type {args.model_type!r} is not valid; choose one of: "
                     f"{', '.join(MODEL_TYPES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        parser.error(f"--device {args.device!r} is not a torch device (use cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if args.fast and device.type != "cuda":
        parser.error("--fast needs a CUDA device (bf16 + compiled kernels); drop --fast on CPU")
    if args.batch_images < 1:
        parser.error(f"--batch-images must be >= 1, got {args.batch_images}")
    try:
        args.checkpoint = check_checkpoint_arg(args.checkpoint, args.model_type)
    except ValueError as e:
        parser.error(str(e))
    if not args.dist_timeout > 0:
        parser.error(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    try:
        ctx = init_distributed("cuda" if device.type == "cuda" else "cpu", args.dist_timeout)
        args.device = str(ctx.resolve_device(args.device))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ctx:
        try:
            code = _main(args, ctx)
        except RankFailedError as e:
            print_failure(ctx, e)
            code = 2
        return code if code == 130 else finish(ctx, code)


def _main(args, ctx: DistContext) -> int:
    try:
        targets = find_images(args.input)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # the same on every rank: no rank waits for another

    from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator

    setup_error = None
    try:
        sam, model_type = build_model(args, verbose=ctx.is_main)
        demo = args.checkpoint == DEMO_CHECKPOINT
        settings = amg_kwargs(args, DEMO_AMG_SETTINGS if demo else None)
        if demo and ctx.is_main:
            print("demo model: AMG settings " + ", ".join(f"{k}={v}" for k, v in settings.items())
                  + " (its defaults; pass the flags to change them)", file=sys.stderr)
        generator = SamAutomaticMaskGenerator(
            sam, output_mode="coco_rle" if args.convert_to_rle else "binary_mask", **settings)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        setup_error = str(e)
    if setup_error is None:
        try:
            check_output_path(args.output, "--output")
            os.makedirs(args.output, exist_ok=True)
            if ctx.is_main:  # before the others start writing (they wait at the check below)
                clean_stale_temps(args.output)
        except (ValueError, OSError) as e:
            setup_error = str(explain_os_error(e, args.output) if isinstance(e, OSError) else e)
    if not ctx.is_distributed and setup_error is not None:
        print(f"error: {setup_error}", file=sys.stderr)
        return 2
    if ctx.is_distributed:
        ctx.check(setup_error, "model setup")

    mine = shard(targets, ctx.rank, ctx.world_size)
    failures: List[Tuple[str, str]] = []
    t0 = time.perf_counter()
    try:
        written, skipped, n_masks = _run_all(args, generator, mine, failures,
                                             show_progress=ctx.is_main,
                                             print_each=len(targets) == 1)
    except KeyboardInterrupt:
        clean_stale_temps(args.output, own_only=ctx.is_distributed)  # our half-written temps
        print("\nInterrupted: finished images are kept; rerun with --resume to continue.",
              file=sys.stderr)
        return 130
    parts = ctx.all_gather_object(dict(rank=ctx.rank, host=ctx.host, written=written,
                                       skipped=skipped, n_masks=n_masks, failures=failures,
                                       seconds=time.perf_counter() - t0))
    failed = [(p["rank"], path, why) for p in parts for path, why in p["failures"]]
    if not ctx.is_main:
        return 1 if failed else 0
    written = sum(p["written"] for p in parts)
    n_masks = sum(p["n_masks"] for p in parts)
    skipped = sum(p["skipped"] for p in parts)
    wall = max(p["seconds"] for p in parts)
    ranks = f" on {ctx.world_size} ranks" if ctx.is_distributed else ""
    print(f"Done: {written} image(s) written ({n_masks} masks), {skipped} already complete, "
          f"{len(failed)} failed, in {wall:.1f} s{ranks}. "
          f"Output: {args.output}")
    if ctx.is_distributed:
        if wall > 0:
            print(f"throughput: {written / wall:.3f} img/s over all ranks")
        for p in parts:
            print(f"  rank {p['rank']} ({p['host']}): {p['written']} written, {p['skipped']} "
                  f"already complete, {len(p['failures'])} failed, {p['seconds']:.1f} s")
    if written and n_masks == 0:
        hint = " (expected with random weights)" if args.checkpoint is None else ""
        print("NOTE: no mask passed the filters" + hint + "; lower --pred-iou-thresh and "
              "--stability-score-thresh (with random weights: both 0) to keep more.", file=sys.stderr)
    if failed:
        print(f"{len(failed)} image(s) failed:", file=sys.stderr)
        for rank, path, why in failed:
            tag = f"[rank {rank}] " if ctx.is_distributed else ""
            print(f"  {tag}{path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
