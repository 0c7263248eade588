"""Automatic mask generation ("segment everything") benchmark, one process, one image.

Seconds per image of ``SamAutomaticMaskGenerator.generate`` for the original segment_anything
(fp32, eager), the competitor sam_fast_peer (bf16 + torch.compile of its image encoder) and
ours (bf16, build_sam_fast: fused attention + compiled encoder/decoder), all holding the same
state dict (random unless --checkpoint), same image, same grid of points. Our masks (and the
competitor's) are matched one-to-one with the original's (Hungarian on mask IoU) and the
matched IoU is reported. Writes amg_<model>.csv/.json after every measurement and
amg_<model>_overlay.png (our masks), under --out-dir.

Random weights give few confident masks, so unless --pred-iou-thresh/--stability-thresh are
given (or --checkpoint, which keeps the original defaults 0.88/0.95) both thresholds are set
to the same quantile q of the original's candidate scores, q chosen so that about
--target-masks masks survive box NMS; the output says which thresholds and why.

    python experiments/bench_amg.py --model-type vit_h --out-dir OUT            # GPU
    python experiments/bench_amg.py --device cpu --model-type tiny --impls orig,ours \\
        --resize-long 160 --iters 1 --warmup 0 --out-dir /tmp/amg                 # CPU smoke
"""
import argparse
import csv
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_encoder  # noqa: E402  (shared helpers: git_commit, random_state_dict, free, log)

IMPLS = ("orig", "peer", "ours")
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny", "demo")
SMALL_TYPES = ("tiny", "demo")  # our SamConfigs; the original is built from its modules

OURS_COMPILE = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PEER_COMPILE = ("none", "default", "reduce-overhead", "max-autotune")
CSV_FIELDS = (
    "model", "impl", "dtype", "compile", "points_per_batch", "status", "s_per_image",
    "encoder_s", "first_call_s", "n_masks", "n_orig_masks", "n_matched", "matched_iou_mean", "matched_iou_min",
    "set_iou", "speedup_vs_orig", "speedup_vs_peer", "pred_iou_thresh", "stability_thresh",
    "box_nms_thresh", "threshold_source", "points_per_side", "image", "image_hw", "weights", "device", "gpu",
    "torch", "commit",
)


# ----------------------------------------------------------------------------- mask matching


def iou_matrix(a: Sequence[np.ndarray], b: Sequence[np.ndarray], device="cpu") -> torch.Tensor:
    """(len(a), len(b)) IoU of boolean HxW masks (empty vs empty counts as IoU 1)."""
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b))
    fa = torch.as_tensor(np.stack([np.asarray(m, bool).ravel() for m in a]), device=device).float()
    fb = torch.as_tensor(np.stack([np.asarray(m, bool).ravel() for m in b]), device=device).float()
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"mask sizes differ: {np.asarray(a[0]).shape} vs {np.asarray(b[0]).shape}")
    inter = fa @ fb.T  # exact in float32 up to 2**24 pixels
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).cpu()


def _assign(cost: np.ndarray):
    """Row/col indices maximising total IoU: Hungarian (scipy) or greedy without scipy."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        rows, cols, used_r, used_c = [], [], set(), set()
        for flat in np.argsort(-cost, axis=None):
            r, c = divmod(int(flat), cost.shape[1])
            if r not in used_r and c not in used_c:
                rows.append(r), cols.append(c), used_r.add(r), used_c.add(c)
        return np.array(rows, int), np.array(cols, int)
    return linear_sum_assignment(cost, maximize=True)


def match_masks(ref: Sequence[np.ndarray], other: Sequence[np.ndarray], min_iou: float = 0.5,
                device="cpu") -> Dict[str, float]:
    """One-to-one matching of ``other``'s masks to ``ref``'s by IoU.

    Returns n_ref, n_other, n_matched (pairs with IoU >= min_iou), matched_iou_mean / _min
    over those pairs (0 when none), and set_iou = sum of matched IoUs / max(n_ref, n_other),
    which is 1 only for identical sets. Two empty sets count as identical.
    """
    n_a, n_b = len(ref), len(other)
    if n_a == 0 and n_b == 0:
        return dict(n_ref=0, n_other=0, n_matched=0, matched_iou_mean=1.0, matched_iou_min=1.0,
                    set_iou=1.0)
    m = iou_matrix(ref, other, device).numpy()
    ious = np.zeros(0)
    if m.size:
        r, c = _assign(m)
        ious = m[r, c]
        ious = ious[ious >= min_iou]
    return dict(n_ref=n_a, n_other=n_b, n_matched=int(len(ious)),
                matched_iou_mean=float(ious.mean()) if len(ious) else 0.0,
                matched_iou_min=float(ious.min()) if len(ious) else 0.0,
                set_iou=float(ious.sum() / max(n_a, n_b)))


# ----------------------------------------------------------------------------- models


def build_original(model_type: str, device):
    """The original package's Sam (fp32, eval) with its default init, on ``device``."""
    if model_type in SMALL_TYPES:
        from segment_anything_fast.build_sam import SAM_CONFIGS
        from tests.oracle import build_original as build_small_original

        return build_small_original(SAM_CONFIGS[model_type]).to(device)
    from segment_anything import sam_model_registry

    with torch.device(device):
        sam = sam_model_registry[model_type]()
    return sam.to(device).eval()  # pixel_mean/std ignore the device context


def weights_file(model_type: str, checkpoint=None):
    """--checkpoint (a bundled name such as "demo" resolved to its file); for the demo model by
    default its bundled trained checkpoint; else None (random weights)."""
    from segment_anything_fast.build_sam import resolve_checkpoint

    if model_type == "demo" and not checkpoint:
        checkpoint = "demo"
    return resolve_checkpoint(checkpoint) if checkpoint else None


def weights_label(path, seed: int) -> str:
    """How a results row names the weights: the file (relative to the repo when inside it)."""
    if not path:
        return f"random(seed={seed})"
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def make_state_dict(model_type: str, device, seed: int, checkpoint=None):
    """The weights every implementation loads: the ``checkpoint`` file (:func:`weights_file`),
    else random (no zero tables)."""
    if checkpoint:
        from segment_anything_fast.build_sam import load_state_dict_file

        return {k: v.to(device) for k, v in load_state_dict_file(checkpoint).items()}
    if torch.device(device).type == "cuda" and model_type not in SMALL_TYPES:
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            skeleton = sam_model_registry[model_type]()
        return bench_encoder.random_state_dict(skeleton.to_empty(device="cuda"), seed)
    from tests.oracle import random_state_dict

    return {k: v.to(device) for k, v in random_state_dict(build_original(model_type, "cpu"), seed).items()}


def ours_config(model_type: str):
    from segment_anything_fast.build_sam import SAM_CONFIGS

    return SAM_CONFIGS[model_type]


# ----------------------------------------------------------------------------- thresholds


@torch.no_grad()
def candidate_scores(sam, image: np.ndarray, points_per_side: int, batch: int = 64):
    """Predicted IoU, stability score and box of every candidate mask (3 per grid point) of the
    original model (on its device), computed with the original package's AMG functions."""
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import (batched_mask_to_box, build_all_layer_point_grids,
                                            calculate_stability_score)

    pred = SamPredictor(sam)
    pred.set_image(image)
    h, w = image.shape[:2]
    pts = build_all_layer_point_grids(points_per_side, 0, 1)[0] * np.array([[w, h]])
    ious, stabs, boxes = [], [], []
    for i in range(0, len(pts), batch):
        p = pred.transform.apply_coords(pts[i : i + batch], (h, w))
        c = torch.as_tensor(p, dtype=torch.float, device=pred.device)[:, None]
        lab = torch.ones(c.shape[0], 1, dtype=torch.int, device=pred.device)
        masks, iou, _ = pred.predict_torch(c, lab, multimask_output=True, return_logits=True)
        masks, iou = masks.flatten(0, 1), iou.flatten(0, 1)
        stabs.append(calculate_stability_score(masks, sam.mask_threshold, 1.0))
        boxes.append(batched_mask_to_box(masks > sam.mask_threshold))
        ious.append(iou.float())
    pred.reset_image()
    return torch.cat(ious), torch.cat(stabs), torch.cat(boxes)


def passes(iou, stab, t_iou, t_stab) -> torch.Tensor:
    """The AMG's score filters (a threshold of 0 disables its filter)."""
    keep = torch.ones_like(iou, dtype=torch.bool)
    if t_iou > 0:
        keep &= iou > t_iou
    if t_stab > 0:
        keep &= stab >= t_stab
    return keep


def survivors(iou, stab, boxes, t_iou, t_stab, nms_thresh=0.7) -> int:
    """Masks left by the AMG's score filters and box NMS (single crop layer)."""
    from segment_anything_fast.utils.amg import batched_nms

    keep = passes(iou, stab, t_iou, t_stab)
    if not keep.any():
        return 0
    k = batched_nms(boxes[keep].float(), iou[keep],
                    torch.zeros(int(keep.sum()), dtype=torch.int64, device=boxes.device), nms_thresh)
    return int(len(k))


def below_gap(scores: torch.Tensor, t: float) -> float:
    """``t`` moved down to the middle of the gap between it and the next lower distinct score,
    so no candidate sits at the threshold: bf16 rounding of a score (random weights saturate
    predicted IoU and stability at ~1.0) then does not decide whether it passes."""
    lower = scores[scores < t]
    return t if lower.numel() == 0 else (t + float(lower.max())) / 2


def choose_thresholds(iou, stab, boxes, target: int, target_candidates: int, nms_thresh: float = 0.7):
    """Both thresholds the q-quantile of the candidates' scores (the IoU one clipped to [0, 1]),
    each then moved into the gap below it (:func:`below_gap`).

    q gives the survivor count (after NMS) closest to ``target`` (ties: the larger q). When no
    q leaves even half of ``target`` (random weights: masks cover most of the image, so box
    NMS merges them), q instead makes about ``target_candidates`` candidates pass the score
    filters, the per-mask work of the AMG. Returns (t_iou, t_stab, q, survivors, passing, how).
    """
    grid = np.concatenate([np.arange(0.0, 0.95, 0.025), np.arange(0.95, 0.999, 0.005)])
    cands = []
    for q in grid:
        t_iou = max(below_gap(iou, float(np.clip(torch.quantile(iou, float(q)).item(), 0.0, 1.0))), 0.0)
        t_stab = below_gap(stab, float(torch.quantile(stab, float(q)).item()))
        passing = int(passes(iou, stab, t_iou, t_stab).sum())
        cands.append((t_iou, t_stab, float(q), survivors(iou, stab, boxes, t_iou, t_stab, nms_thresh), passing))
    best_n = max(c[3] for c in cands)
    if best_n * 2 >= target:
        best = min(reversed(cands), key=lambda c: abs(c[3] - target))
        return best + (f"~{best[3]} masks expected after NMS (target {target})",)
    best = min(reversed(cands), key=lambda c: abs(c[4] - target_candidates))
    return best + (f"at most {best_n} masks survive NMS at any threshold (random weights: masks "
                   f"cover most of the image), so ~{best[4]} candidates pass the score filters "
                   f"(target {target_candidates}) and {best[3]} survive NMS",)


# ----------------------------------------------------------------------------- timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    """(seconds, result) of one synchronised call of ``fn()``."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def _median(times):
    return sorted(times)[len(times) // 2]


def time_generate(gen, image, device, warmup: int, iters: int):
    """(first-call s, median s over ``iters`` calls after ``warmup`` more, masks of the last)."""
    first, out = _timed(lambda: gen.generate(image), device)
    for _ in range(warmup):
        gen.generate(image)
    times = []
    for _ in range(iters):
        t, out = _timed(lambda: gen.generate(image), device)
        times.append(t)
    return first, (_median(times) if times else first), out


def time_set_image(gen, image, device, iters: int) -> float:
    """Median seconds of the generator's ``predictor.set_image`` alone (the image encoder and
    its preprocessing): the rest of ``generate`` is prompts, decoder and post-processing."""
    times = [_timed(lambda: gen.predictor.set_image(image), device)[0] for _ in range(max(1, iters))]
    gen.predictor.reset_image()
    return _median(times)


def binary_masks(records) -> List[np.ndarray]:
    return [np.asarray(r["segmentation"], dtype=bool) for r in records]


def load_image(path: str, resize_long: int) -> np.ndarray:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path!r}; pass --image with a PNG/JPEG file.")
    img = np.ascontiguousarray(bgr[..., ::-1])
    if resize_long:
        h, w = img.shape[:2]
        s = resize_long / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


# ----------------------------------------------------------------------------- main


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", nargs="+", default=["vit_h"], choices=MODEL_TYPES,
                    help="one or more; tiny = the test-sized model (CPU smoke); demo = the bundled "
                         "trained demo model (its checkpoint and AMG thresholds unless given)")
    ap.add_argument("--impls", default="orig,ours,peer",
                    help="comma list of orig, peer, ours, in run order (default orig,ours,peer)")
    ap.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    ap.add_argument("--image", default=None,
                    help="default: assets/sample.png, or assets/demo_scene.jpg when only the demo "
                         "model runs (a scene of its training kind)")
    ap.add_argument("--resize-long", type=int, default=0, help="resize the image to this long side (0: as is)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--checkpoint", default=None, help="state dict for all three (default: random weights)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--pred-iou-thresh", type=float, default=None)
    ap.add_argument("--stability-thresh", type=float, default=None)
    ap.add_argument("--target-masks", type=int, default=100,
                    help="masks to keep when thresholds are chosen automatically (default 100)")
    ap.add_argument("--target-candidates", type=int, default=400,
                    help="when no threshold leaves half of --target-masks after NMS: candidates "
                         "that should pass the score filters instead (default 400)")
    ap.add_argument("--box-nms-thresh", type=float, default=0.7,
                    help="box NMS IoU threshold of all three generators (AMG default 0.7). Random "
                         "weights give near full-image boxes that NMS merges into one mask; 1.0 "
                         "turns that merging off, so the thresholds can leave --target-masks masks")
    ap.add_argument("--iters", type=int, default=3, help="timed generate() calls (median)")
    ap.add_argument("--orig-iters", type=int, default=None, help="timed calls of the original (default --iters)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (default 2)")
    ap.add_argument("--ours-compile", default=None, choices=OURS_COMPILE,
                    help="our image-encoder torch.compile mode (default reduce-overhead on CUDA, none on CPU)")
    ap.add_argument("--ours-decoder-compile", default=None, choices=OURS_COMPILE,
                    help="our mask-decoder torch.compile mode (default 'default' on CUDA, none on CPU)")
    ap.add_argument("--ours-attention", default=None,
                    help="our encoder attention backend (default triton on CUDA, sdpa on CPU)")
    ap.add_argument("--ours-regional", action="store_true", help="compile one block per kind (faster compile)")
    ap.add_argument("--ours-upscaling", default=None, choices=("conv", "triton"),
                    help="our mask-decoder upscaling (default triton on CUDA, conv on CPU)")
    ap.add_argument("--ours-decoder-attention", default=None, choices=("sdpa", "triton"),
                    help="ours' mask-decoder attention (default: the builder's, triton on CUDA)")
    ap.add_argument("--ours-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--ours-postprocess-compile", default=None, choices=OURS_COMPILE,
                    help="compile mode of ours' mask scoring (default: 'default' on CUDA, none on CPU)")
    ap.add_argument("--ours-postprocess", default="torch", choices=("torch", "triton"),
                    help="ours' mask scoring and rendering: torch (its ops, compiled per "
                         "--ours-postprocess-compile) or triton (fused_postprocess kernels, CUDA only)")
    ap.add_argument("--ours-points-per-batch", type=int, default=256)
    ap.add_argument("--peer-compile", default="default", choices=PEER_COMPILE,
                    help="the competitor's image-encoder compile mode (its builder uses max-autotune)")
    ap.add_argument("--peer-path", default=None,
                    help="folder holding sam_fast_peer (default: .peer/ in the repo, else /work/shared/peer)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing ours, profile one generate() call (GPU kernels when on CUDA, "
                         "host ops) into amg_<model>_profile_ours.txt")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip implementations that would start after this many seconds")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--commit", default="", help="git commit of the code (when .git is absent)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        ap.error(f"--impls {args.impls!r}: choose from {','.join(IMPLS)}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU; use --device cpu --model-type tiny")
    if "peer" in impls and dev.type != "cuda":
        ap.error("the competitor (peer) needs CUDA (Triton kernels, pinned nested tensors); drop it from --impls")
    if (args.pred_iou_thresh is None) != (args.stability_thresh is None):
        ap.error("give both --pred-iou-thresh and --stability-thresh, or neither")
    if not 0.0 < args.box_nms_thresh <= 1.0:
        ap.error("--box-nms-thresh must be in (0, 1]")
    for name in ("iters", "warmup"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0")
    os.makedirs(args.out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.image is None:
        name = "demo_scene.jpg" if args.model_type == ["demo"] else "sample.png"
        args.image = os.path.join(ROOT, "segment_anything_fast", "assets", name)
    image = load_image(args.image, args.resize_long)
    peer_path = args.peer_path or next(
        (p for p in (os.path.join(ROOT, ".peer"), "/work/shared/peer")
         if os.path.isdir(os.path.join(p, "sam_fast_peer"))), None)
    if "peer" in impls and peer_path and peer_path not in sys.path:
        sys.path.insert(0, peer_path)
    attention = args.ours_attention or ("triton" if dev.type == "cuda" else "sdpa")
    if args.ours_compile is None:
        args.ours_compile = "reduce-overhead" if dev.type == "cuda" else "none"
    if args.ours_decoder_compile is None:
        args.ours_decoder_compile = "default" if dev.type == "cuda" else "none"
    if args.ours_postprocess == "triton":
        if dev.type != "cuda":
            ap.error("--ours-postprocess triton needs --device cuda.")
        if args.ours_postprocess_compile not in (None, "none"):
            ap.error("--ours-postprocess triton runs uncompiled kernels; drop --ours-postprocess-compile.")
        args.ours_postprocess_compile = "none"
    if args.ours_postprocess_compile is None:
        args.ours_postprocess_compile = "default" if dev.type == "cuda" else "none"
    meta = dict(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                torch=torch.__version__, commit=bench_encoder.git_commit(args.commit),
                device=str(dev), image=os.path.basename(args.image),
                image_hw=f"{image.shape[0]}x{image.shape[1]}", points_per_side=args.points_per_side,
                argv=sys.argv[1:] if argv is None else argv)
    bench_encoder.log(meta)
    summary = {}
    for model_type in args.model_type:
        summary[model_type] = run_model(args, model_type, impls, image, dev, attention, meta)
    return summary


def run_model(args, model_type, impls, image, dev, attention, meta):
    log = bench_encoder.log
    stem = os.path.join(args.out_dir, f"amg_{model_type}")
    rows: List[dict] = []
    ckpt = weights_file(model_type, args.checkpoint)
    info = dict(meta, model=model_type, weights=weights_label(ckpt, args.seed))

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=info, rows=rows), f, indent=1)
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**info, **r})

    sd = make_state_dict(model_type, dev, args.seed, ckpt)
    orig = build_original(model_type, dev)
    orig.load_state_dict(sd)

    # thresholds
    if args.pred_iou_thresh is not None:
        t_iou, t_stab, source = args.pred_iou_thresh, args.stability_thresh, "flags"
    elif model_type == "demo":
        from segment_anything_fast.build_sam import DEMO_AMG_SETTINGS as demo

        t_iou, t_stab = demo["pred_iou_thresh"], demo["stability_score_thresh"]
        source = "the demo model's AMG settings (build_sam.DEMO_AMG_SETTINGS)"
    elif args.checkpoint:
        t_iou, t_stab, source = 0.88, 0.95, "original defaults (checkpoint given)"
    else:
        t = time.time()
        iou, stab, boxes = candidate_scores(orig, image, args.points_per_side)
        t_iou, t_stab, q, _, _, how = choose_thresholds(iou, stab, boxes, args.target_masks,
                                                        args.target_candidates, args.box_nms_thresh)
        source = f"auto: q={q:.3f} quantile of the original's {len(iou)} candidate scores; {how}"
        log(f"candidate predicted IoU: min {iou.min():.3f} median {iou.median():.3f} max {iou.max():.3f}; "
            f"stability: min {stab.min():.3f} median {stab.median():.3f} max {stab.max():.3f} "
            f"({time.time() - t:.1f}s)")
    info.update(pred_iou_thresh=t_iou, stability_thresh=t_stab, threshold_source=source,
                box_nms_thresh=args.box_nms_thresh)
    log(f"{model_type}: pred_iou_thresh={t_iou:.4f} stability_score_thresh={t_stab:.4f} [{source}]")
    amg_kw = dict(points_per_side=args.points_per_side, pred_iou_thresh=t_iou,
                  stability_score_thresh=t_stab, box_nms_thresh=args.box_nms_thresh,
                  output_mode="binary_mask")

    if "orig" not in impls:
        del orig
        orig = None
    results = {}  # impl -> masks
    timing = {}

    def record(impl, dtype, compile_mode, ppb, status, **kw):
        rows.append(dict(model=model_type, impl=impl, dtype=dtype, compile=compile_mode,
                         points_per_batch=ppb, status=status, **kw))
        save()
        log(f"{model_type} {impl:5s} {status} " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()))

    for impl in impls:
        if impl == "orig":
            dtype, mode, ppb = "float32", "none", 64
        elif impl == "peer":
            dtype, mode, ppb = "bfloat16", args.peer_compile, 64
        else:
            dtype, mode = args.ours_dtype, f"{args.ours_compile}/{attention}" + ("/regional" if args.ours_regional else "")
            if args.ours_postprocess == "triton":
                mode += "/scoring-triton"
            elif args.ours_postprocess_compile != "none":
                mode += f"/scoring-{args.ours_postprocess_compile}"
            mode += f"/upscaling-{args.ours_upscaling or ('triton' if dev.type == 'cuda' else 'conv')}"
            mode += f"/dec-attn-{args.ours_decoder_attention or ('triton' if dev.type == 'cuda' else 'sdpa')}"
            ppb = args.ours_points_per_batch
        if time.time() - bench_encoder.T0 > args.budget_s:
            record(impl, dtype, mode, ppb, "skipped (time budget)")
            continue
        if impl == "peer" and model_type in SMALL_TYPES:
            record(impl, dtype, mode, ppb, "skipped (the competitor builds only vit_b/vit_l/vit_h)")
            continue
        sam = gen = None
        try:
            t = time.time()
            if impl == "orig":
                from segment_anything import SamAutomaticMaskGenerator as Gen

                sam, orig = orig, None  # the reference model is used once, then freed
            elif impl == "peer":
                from sam_fast_peer import SamAutomaticMaskGenerator as Gen
                from sam_fast_peer import sam_model_registry as peer_registry

                with torch.device(dev):
                    sam = peer_registry[model_type]()
                sam.to(dev).load_state_dict(sd)
                sam = sam.to(torch.bfloat16).eval()
                if mode != "none":
                    sam.image_encoder = torch.compile(sam.image_encoder, mode=mode)
            else:
                from segment_anything_fast import SamAutomaticMaskGenerator as Gen
                from segment_anything_fast.build_sam_fast import build_sam_fast

                none = lambda m: None if m == "none" else m  # noqa: E731
                with torch.device(dev):  # initialise on the device (vit_h on the CPU takes long)
                    sam = build_sam_fast(
                        ours_config(model_type), None, dtype=getattr(torch, args.ours_dtype),
                        attention=attention, compile_mode=none(args.ours_compile), batch_size=1,
                        device=dev, regional=args.ours_regional,
                        decoder_compile_mode=none(args.ours_decoder_compile), decoder_buckets=(ppb,),
                        upscaling=args.ours_upscaling, decoder_attention=args.ours_decoder_attention)
                sam.load_state_dict(sd)
            extra = {}
            if impl == "ours" and args.ours_postprocess_compile != "none":
                extra["postprocess_compile_mode"] = args.ours_postprocess_compile
            if impl == "ours" and args.ours_postprocess == "triton":
                extra["postprocess"] = "triton"
            gen = Gen(sam, points_per_batch=ppb, **amg_kw, **extra)
            iters = args.orig_iters if (impl == "orig" and args.orig_iters is not None) else args.iters
            first, s, out = time_generate(gen, image, dev, args.warmup, iters)
            results[impl] = binary_masks(out)
            timing[impl] = s
            build_s = time.time() - t - first
            enc_s = time_set_image(gen, image, dev, iters)
            record(impl, dtype, mode, ppb, "ok", s_per_image=s, encoder_s=enc_s, first_call_s=first,
                   n_masks=len(out), build_s=build_s)
            if impl == "ours" and args.profile:
                text = bench_encoder.profile(lambda: gen.generate(image), f"ours AMG {model_type}",
                                             calls=1, top=30, cpu=True)
                with open(stem + "_profile_ours.txt", "w") as f:
                    f.write(text + "\n")
        except torch.cuda.OutOfMemoryError:
            record(impl, dtype, mode, ppb, "OOM")
        except Exception as e:  # one failing implementation must not lose the others
            record(impl, dtype, mode, ppb, f"error: {type(e).__name__}: {str(e)[:300]}")
        finally:
            del sam, gen
            if dev.type == "cuda":
                torch._dynamo.reset()
                bench_encoder.free()

    # fidelity and speedups, filled into the rows
    for r in rows:
        if r["status"] != "ok":
            continue
        impl = r["impl"]
        if "orig" in timing:
            r["speedup_vs_orig"] = timing["orig"] / timing[impl]
        if "peer" in timing:
            r["speedup_vs_peer"] = timing["peer"] / timing[impl]
        if "orig" in results and impl != "orig":
            m = match_masks(results["orig"], results[impl], device=dev)
            r.update(n_orig_masks=m["n_ref"], n_matched=m["n_matched"],
                     matched_iou_mean=m["matched_iou_mean"], matched_iou_min=m["matched_iou_min"],
                     set_iou=m["set_iou"])
    save()
    if "ours" in results:
        import cv2
        from scripts.amg import overlay_image

        cv2.imwrite(stem + "_overlay.png", overlay_image(image, results["ours"]))

    print(f"\n{model_type}: {info['image_hw']} image, {args.points_per_side}x{args.points_per_side} points, "
          f"pred_iou_thresh {t_iou:.4f}, stability {t_stab:.4f}, box NMS {args.box_nms_thresh} ({source})")
    print(f"{'impl':6s} {'dtype':9s} {'compile':32s} {'s/img':>8s} {'encoder':>8s} {'first s':>8s} {'masks':>6s} "
          f"{'x orig':>7s} {'x peer':>7s} {'matched IoU':>12s} {'matched':>8s}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']:6s} {r['status']}")
            continue

        def f(k, fmt):
            return format(r[k], fmt) if k in r else "-".rjust(int(fmt.split(".")[0]))

        print(f"{r['impl']:6s} {r['dtype']:9s} {r['compile']:32s} {r['s_per_image']:8.3f} {r['encoder_s']:8.3f} "
              f"{r['first_call_s']:8.1f} {r['n_masks']:6d} {f('speedup_vs_orig', '7.2f')} "
              f"{f('speedup_vs_peer', '7.2f')} {f('matched_iou_mean', '12.4f')} "
              f"{str(r.get('n_matched', '-')) + '/' + str(r.get('n_orig_masks', '-')):>8s}")
    print(f"wrote {stem}.csv, {stem}.json" + (f", {stem}_overlay.png" if "ours" in results else ""))
    return rows


if __name__ == "__main__":
    main()
