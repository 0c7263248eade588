"""Waterfall sweep of eval_combo: each step adds one technique to the previous ones.

    fp32 -> bf16 -> compile -> fused_attention -> batched_prompts -> fused_upscale -> fused_decoder_attention
    -> fused_postprocess -> fused_preprocess -> mlp_epilogue -> int8 -> fp8 -> fp8_triton -> int8_triton
    -> sparse_2_4 (-> fp8_sparse_2_4)

The compression steps each replace the previous compression (int8, then fp8, then 2:4 ...)
on top of everything before them. Every step runs ``experiments/eval_combo.py``'s ``run`` in
this process over the same dataset (generated with the synthetic COCO writer unless
--coco-root is given) and model weights. Writes, under --out-dir, after every step:
waterfall.csv (one row per model and step, eval_combo's columns plus step/status),
waterfall.md (a table) and waterfall.svg (img/s bars and mIoU line per step).

    python experiments/run_experiments.py --models vit_b vit_h --limit 64 --out-dir OUT   # GPU
    python experiments/run_experiments.py --device cpu --models tiny --steps fp32,bf16 \\
        --limit 2 --out-dir /tmp/wf                                                      # CPU smoke
"""
import argparse
import csv
import gc
import os
import sys
import time
from typing import Dict, List
from xml.sax.saxutils import escape

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import eval_combo  # noqa: E402

# (step, what it changes); settings accumulate in this order.
STEPS = (
    ("fp32", {}),
    ("bf16", {"dtype": "bfloat16"}),
    ("compile", {"compile": "<compile>"}),
    ("fused_attention", {"attention": "<fused>"}),
    ("batched_prompts", {"prompt_batching": "nested"}),
    ("fused_upscale", {"upscaling": "<upscale>"}),
    ("fused_decoder_attention", {"decoder_attention": "<dec_attn>"}),
    ("fused_postprocess", {"postprocess": "<post>"}),
    ("fused_preprocess", {"preprocess": "<pre>"}),
    ("mlp_epilogue", {"mlp_epilogue": "on"}),
    # compression quantizes lin1 too, which the fused epilogue cannot take
    ("int8", {"compress": "int8_dynamic", "mlp_epilogue": "off"}),
    ("fp8", {"compress": "fp8"}),
    ("fp8_triton", {"compress": "fp8_triton"}),  # fp8 with our activation quantization
    ("int8_triton", {"compress": "int8_triton"}),  # int8 with our quantization and matmul
    ("sparse_2_4", {"compress": "sparse_2_4"}),
    ("fp8_sparse_2_4", {"compress": "fp8_sparse_2_4"}),
)
BASE = {"dtype": "float32", "compile": "none", "attention": "math", "upscaling": "conv",
        "decoder_attention": "sdpa", "postprocess": "torch", "preprocess": "host", "prompt_batching": "padded",
        "compress": "none", "mlp_epilogue": "off"}
DEFAULT_STEPS = ",".join(s for s, _ in STEPS[:-1])
EXTRA_FIELDS = ("model", "step", "status", "seconds")
FIELDS = EXTRA_FIELDS + tuple(f for f in eval_combo.CSV_FIELDS if f not in EXTRA_FIELDS)


def step_settings(compile_mode: str, fused: str, upscale: str, dec_attn: str = "triton",
                  post: str = "triton", pre: str = "triton") -> Dict[str, Dict[str, str]]:
    """Cumulative eval_combo settings of every step (``fused``: the fused step's attention
    backend, ``upscale``: the fused_upscale step's decoder upscaling, ``dec_attn``: the
    fused_decoder_attention step's decoder attention, ``post``: the fused_postprocess step's
    mask post-processing, ``pre``: the fused_preprocess step's image pre-processing)."""
    out, cur = {}, dict(BASE)
    for name, change in STEPS:
        for k, v in change.items():
            cur[k] = {"<compile>": compile_mode, "<fused>": fused, "<upscale>": upscale,
                      "<dec_attn>": dec_attn, "<post>": post,
                      "<pre>": pre}.get(v, v)
        out[name] = dict(cur)
    return out


def settings_argv(settings: Dict[str, str]) -> List[str]:
    """eval_combo flags for every setting of a step (``prompt_batching`` -> ``--prompt-batching``)."""
    out = []
    for key in BASE:
        out += ["--" + key.replace("_", "-"), settings[key]]
    return out


# ----------------------------------------------------------------------------- outputs


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def write_markdown(rows: List[dict], path: str) -> None:
    lines = ["| model | step | dtype | compile | attention | upscaling | decoder attention | post-processing | pre-processing | "
             "prompts | compress | MLP epilogue | img/s model | img/s e2e | encoder alone | e2e / encoder | x fp32 | mIoU | "
             "peak MiB | status |",
             "|" + "---|" * 20]
    base = {}
    for r in rows:
        ips = _num(r.get("img_per_s_model"))
        if r["step"] == "fp32" and ips:
            base[r["model"]] = ips
    for r in rows:
        ips = _num(r.get("img_per_s_model"))
        b = base.get(r["model"])
        cells = [r["model"], r["step"], r.get("dtype", ""), r.get("compile", ""), r.get("attention", ""),
                 r.get("upscaling", ""), r.get("decoder_attention", ""), r.get("postprocess", ""),
                 r.get("preprocess", ""), r.get("prompt_batching", ""),
                 r.get("compress", ""), r.get("mlp_epilogue", ""),
                 f"{ips:.1f}" if ips else "-",
                 f"{_num(r.get('img_per_s_end_to_end')):.1f}" if _num(r.get("img_per_s_end_to_end")) else "-",
                 f"{_num(r.get('img_per_s_encoder_only')):.1f}" if _num(r.get("img_per_s_encoder_only")) else "-",
                 f"{_num(r.get('end_to_end_vs_encoder')):.2f}" if _num(r.get("end_to_end_vs_encoder")) else "-",
                 f"{ips / b:.2f}" if ips and b else "-",
                 f"{_num(r.get('miou')):.4f}" if _num(r.get("miou")) is not None else "-",
                 str(r.get("peak_gpu_memory_mib", "") or "-"), r["status"].replace("|", "/")[:120]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    meta = next((r for r in rows if r.get("gpu_name")), None)
    if meta:
        lines.append("")
        lines.append(f"{meta['gpu_name']}, torch {meta['torch_version']}, commit {meta['git_commit']}, "
                     f"{meta.get('n_images', '?')} images, batch {meta.get('batch_size', '?')}, "
                     f"weights {meta.get('checkpoint', '?')}.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_svg(rows: List[dict], path: str, title: str = "") -> None:
    """One panel per model: bars = images/s (model part), line = mIoU (right axis, 0..1)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    bar_w, gap, pw, ph, left, top = 56, 24, 0, 220, 70, 40
    steps_per = {m: [r for r in rows if r["model"] == m] for m in models}
    pw = max(len(v) for v in steps_per.values()) * (bar_w + gap) + gap if models else 200
    width = left + pw + 70
    height = top + len(models) * (ph + 90) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(title or "SAM waterfall: images/s (bars) and mIoU (line)")}</text>']
    for pi, m in enumerate(models):
        y0 = top + pi * (ph + 90)
        rs = steps_per[m]
        vals = [_num(r.get("img_per_s_model")) or 0.0 for r in rs]
        vmax = max(vals + [1e-9]) * 1.15
        out.append(f'<text x="{left}" y="{y0 - 6}" font-size="13" font-weight="bold">{escape(m)}</text>')
        out.append(f'<line x1="{left}" y1="{y0 + ph}" x2="{left + pw}" y2="{y0 + ph}" stroke="black"/>')
        out.append(f'<line x1="{left}" y1="{y0}" x2="{left}" y2="{y0 + ph}" stroke="black"/>')
        out.append(f'<line x1="{left + pw}" y1="{y0}" x2="{left + pw}" y2="{y0 + ph}" stroke="#c33"/>')
        for k in range(5):  # left axis (img/s) and right axis (mIoU) ticks
            fy = y0 + ph - k * ph / 4
            out.append(f'<text x="{left - 6}" y="{fy + 4}" text-anchor="end">{vmax * k / 4:.3g}</text>')
            out.append(f'<text x="{left + pw + 6}" y="{fy + 4}" fill="#c33">{k / 4:.2f}</text>')
            out.append(f'<line x1="{left}" y1="{fy}" x2="{left + pw}" y2="{fy}" stroke="#eee"/>')
        out.append(f'<text x="14" y="{y0 + ph / 2}" transform="rotate(-90 14 {y0 + ph / 2})" '
                   f'text-anchor="middle">images/s</text>')
        out.append(f'<text x="{width - 12}" y="{y0 + ph / 2}" transform="rotate(90 {width - 12} {y0 + ph / 2})" '
                   f'text-anchor="middle" fill="#c33">mIoU</text>')
        pts = []
        for i, (r, v) in enumerate(zip(rs, vals)):
            x = left + gap + i * (bar_w + gap)
            h = v / vmax * ph
            ok = r["status"] == "ok"
            out.append(f'<rect x="{x}" y="{y0 + ph - h}" width="{bar_w}" height="{h}" '
                       f'fill="{"#4a7fb5" if ok else "#ccc"}"><title>{escape(r["status"])}</title></rect>')
            out.append(f'<text x="{x + bar_w / 2}" y="{y0 + ph - h - 4}" text-anchor="middle">'
                       f'{f"{v:.1f}" if ok else ("skipped" if "skip" in r["status"] else "failed")}</text>')
            out.append(f'<text x="{x + bar_w / 2}" y="{y0 + ph + 14}" text-anchor="end" '
                       f'transform="rotate(-35 {x + bar_w / 2} {y0 + ph + 14})">{escape(r["step"])}</text>')
            miou = _num(r.get("miou"))
            if ok and miou is not None:
                pts.append((x + bar_w / 2, y0 + ph - miou * ph, miou))
        if len(pts) > 1:
            out.append('<polyline fill="none" stroke="#c33" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts) + '"/>')
        for x, y, v in pts:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#c33"><title>mIoU {v:.4f}</title></circle>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ----------------------------------------------------------------------------- main


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_h"],
                    help="model types (eval_combo's: vit_b, vit_l, vit_h, tiny)")
    ap.add_argument("--steps", default=DEFAULT_STEPS,
                    help=f"comma list of steps to run, from {','.join(s for s, _ in STEPS)} "
                         f"(default all but fp8_sparse_2_4); settings still accumulate over all earlier steps")
    ap.add_argument("--coco-root", default=None,
                    help="dataset root (default: generate a synthetic COCO set under --out-dir)")
    ap.add_argument("--split", default="val2017")
    ap.add_argument("--synth-size", default=None,
                    help="WxH of generated images (default COCO-like mixed sizes)")
    ap.add_argument("--limit", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of the compile step onwards (default: default, which "
                         "compiles in a fraction of max-autotune's time)")
    ap.add_argument("--fused-attention", default=None,
                    help="attention backend of the fused step (default triton on CUDA, sdpa on CPU)")
    ap.add_argument("--checkpoint", default=None, help="state dict (default: random weights, seed 0)")
    ap.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--warmup-batches", type=int, default=None, help="passed to eval_combo")
    ap.add_argument("--encoder-iters", type=int, default=None,
                    help="passed to eval_combo: timed calls of the image encoder alone (0: skip)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="steps that would start after this many seconds are recorded as skipped")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results", "waterfall"))
    ap.add_argument("--commit", default="", help="passed to eval_combo: the code's git commit "
                                                  "(for a copy without .git)")
    return ap


def dataset(args) -> str:
    if args.coco_root:
        return args.coco_root
    from segment_anything_fast.data.synthetic_coco import write_coco_dataset

    size = None
    if args.synth_size:
        w, h = (int(v) for v in args.synth_size.lower().split("x"))
        size = (w, h)
    root = os.path.join(args.out_dir, f"synth_{args.limit}" + (f"_{args.synth_size}" if size else ""))
    if not os.path.isfile(os.path.join(root, "annotations", f"instances_{args.split}.json")):
        t = time.time()
        write_coco_dataset(root, args.limit, seed=0, split=args.split, size=size,
                           workers=max(1, min(8, os.cpu_count() or 1)))
        print(f"generated {args.limit} images under {root} in {time.time() - t:.1f}s", flush=True)
    return root


def main(argv=None) -> List[dict]:
    ap = build_parser()
    args = ap.parse_args(argv)
    names = [s for s, _ in STEPS]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in names]
    if bad or not steps:
        ap.error(f"--steps: unknown {bad}; choose from {','.join(names)}")
    steps = [s for s in names if s in steps]  # waterfall order
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    fused = args.fused_attention or ("triton" if args.device.startswith("cuda") else "sdpa")
    # the fused decoder kernels need CUDA; on the CPU those steps keep the modules / SDPA
    cuda = args.device.startswith("cuda")
    settings = step_settings(args.compile_mode, fused, "triton" if cuda else "conv", "triton" if cuda else "sdpa",
                             "triton" if cuda else "torch", "triton" if cuda else "host")
    os.makedirs(args.out_dir, exist_ok=True)
    root = dataset(args)
    ec_csv = os.path.join(args.out_dir, "eval_combo_rows.csv")
    if os.path.exists(ec_csv):  # eval_combo appends and refuses a file with other columns
        os.remove(ec_csv)
    t0 = time.time()
    rows: List[dict] = []
    paths = {k: os.path.join(args.out_dir, f"waterfall.{k}") for k in ("csv", "md", "svg")}

    def save():
        write_csv(rows, paths["csv"])
        write_markdown(rows, paths["md"])
        write_svg(rows, paths["svg"])

    for model in args.models:
        for step in steps:
            s = settings[step]
            row = dict(model=model, step=step, status="ok", model_type=model, **s)
            if time.time() - t0 > args.budget_s:
                row["status"] = "skipped (time budget)"
                rows.append(row)
                save()
                continue
            argv_ec = ["--coco-root", root, "--split", args.split, "--limit", str(args.limit),
                       "--batch-size", str(args.batch_size), "--model-type", model,
                       "--device", args.device, "--num-workers", str(args.num_workers),
                       "--cache-dir", os.path.join(args.out_dir, "cache"),
                       "--output", ec_csv] + settings_argv(s)
            if args.checkpoint:
                argv_ec += ["--checkpoint", args.checkpoint]
            if args.warmup_batches is not None:
                argv_ec += ["--warmup-batches", str(args.warmup_batches)]
            if args.encoder_iters is not None:
                argv_ec += ["--encoder-iters", str(args.encoder_iters)]
            if args.commit:
                argv_ec += ["--commit", args.commit]
            t = time.time()
            print(f"[{t - t0:6.0f}s] {model} {step}: {s}", flush=True)
            try:
                parser = eval_combo.build_parser()
                ec_args = parser.parse_args(argv_ec)
                eval_combo.validate_args(ec_args, parser)
                row.update(eval_combo.run(ec_args))
            except SystemExit as e:  # parser.error: a setting this machine cannot run
                row["status"] = f"invalid setting (exit {e.code}); see the log"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as e:  # one failing step must not lose the others
                row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            row["seconds"] = round(time.time() - t, 1)
            rows.append(row)
            print(f"[{time.time() - t0:6.0f}s] {model} {step}: {row['status']} "
                  f"img/s {row.get('img_per_s_model', '-')} mIoU {row.get('miou', '-')}", flush=True)
            save()
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    save()
    with open(paths["md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return rows


if __name__ == "__main__":
    main()
