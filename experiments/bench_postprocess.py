"""The fused mask post-processing kernels (``segment_anything_fast.fused_postprocess``) on the GPU:
``masks_from_logits`` (the predictor's full-resolution masks) and ``mask_scores`` (the automatic
mask generator's stability scores and boxes), per case milliseconds (median of CUDA-event timed
calls), optionally next to an earlier version of the module in the same process, and whether
both give identical outputs (the same per-pixel formulas; the compiler may contract them into
different fused multiply-adds, so a pixel within float noise of the threshold can flip).

    python experiments/bench_postprocess.py --baseline old_fused_postprocess.py --out pp.json
"""
import argparse
import importlib.util
import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import segment_anything_fast  # noqa: E402
from segment_anything_fast import fused_postprocess  # noqa: E402
from bench_attention import bench  # noqa: E402  (experiments/ is on sys.path when run as a script)

# (prompts, masks per prompt, input size, original size) of 256x256 low-res logits: the
# predictor's 64 prompts x 3 multimask outputs (a slice of the decoder's 4) of a 768x1024 image
# (no final resize) and of a 480x640 one (resized back); AMG's 1024 candidates of one output
CASES = [(64, 3, (768, 1024), (768, 1024)), (64, 3, (768, 1024), (480, 640)),
         (1024, 1, (768, 1024), (480, 640))]


def load_baseline(path: str):
    """An earlier fused_postprocess.py, imported as a sibling of the package's modules."""
    name = "segment_anything_fast._fused_postprocess_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "segment_anything_fast"
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="an earlier fused_postprocess.py to time and compare with")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tiles", nargs="+", default=None,
                    help="tile shapes ROWSxCOLS of the current module's 2-D kernels to time, e.g. 8x128 1x1024 "
                         "(default: its own fused_postprocess._TILE)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if args.baseline and not os.path.isfile(args.baseline):
        ap.error(f"--baseline {args.baseline!r} is not a file.")
    try:
        tiles = [tuple(int(v) for v in t.split("x")) for t in (args.tiles or [])]
    except ValueError:
        ap.error(f"--tiles takes ROWSxCOLS shapes such as 8x128, got {args.tiles}")
    if any(len(t) != 2 or min(t) < 1 or any(v & (v - 1) for v in t) for t in tiles):
        ap.error(f"--tiles: each shape needs two powers of two, got {args.tiles}")
    if not torch.cuda.is_available():
        ap.error("bench_postprocess needs a CUDA GPU (the CPU tests check the kernels under TRITON_INTERPRET=1).")
    mods = {"current": fused_postprocess}
    if args.baseline:
        mods["baseline"] = load_baseline(args.baseline)
    sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024), mask_threshold=0.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    lr = 256
    for n, k, input_size, original_size in CASES:
        low = (torch.randn(n, 4, lr, lr, device="cuda", generator=g) * 4).to(torch.bfloat16)[:, 4 - k:]
        outs = {}
        runs = [(name, mod, None) for name, mod in mods.items()]
        runs += [(f"tile{t[0]}x{t[1]}", fused_postprocess, t) for t in tiles]
        for name, mod, tile in runs:
            default_tile = fused_postprocess._TILE
            if tile is not None:
                fused_postprocess._TILE = tile
            masks = lambda: mod.masks_from_logits(sam, low, input_size, original_size)  # noqa: E731
            scores = lambda: mod.mask_scores(sam, low.reshape(-1, lr, lr), input_size, original_size, 1.0)  # noqa: E731
            outs[name] = (masks(), scores())
            row = dict(impl=name, masks=int(low.reshape(-1, lr, lr).shape[0]), input_size=list(input_size),
                       original_size=list(original_size), masks_ms=bench(masks, args.iters),
                       scores_ms=bench(scores, args.iters))
            px = row["masks"] * original_size[0] * original_size[1]
            row["masks_gpx_per_s"] = px / row["masks_ms"] / 1e6
            rows.append(row)
            fused_postprocess._TILE = default_tile
            print(f"{name:9s} {row['masks']:5d} masks {input_size} -> {original_size}: masks_from_logits "
                  f"{row['masks_ms']:.3f} ms ({row['masks_gpx_per_s']:.0f} Gpx/s), mask_scores {row['scores_ms']:.3f} ms",
                  flush=True)
        if "baseline" in outs:
            (m1, (s1, b1)), (m0, (s0, b0)) = outs["current"], outs["baseline"]
            same = bool(torch.equal(m1, m0) and torch.equal(b1, b0) and torch.equal(s1.nan_to_num(-1), s0.nan_to_num(-1)))
            for r in rows[-len(runs):]:
                r["identical_to_baseline"] = same
            print(f"          outputs identical to the baseline: {same}", flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, package=segment_anything_fast.__file__)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
