"""The fp8_triton activation quantization (``fp8_linear.quantize_rows``) on the GPU, at the
encoder's shapes (batch 8: 32768 tokens), against the same per-row quantization written in
PyTorch and compiled by inductor (what torchao's fp8 linears leave to inductor): milliseconds
(median of CUDA-event timed samples of 20 back-to-back calls), GB/s of the bytes that must move
(bf16 in, fp8 out) and whether both give the same fp8 values. Rows with a layer norm (the qkv / lin1 inputs) also time
the unfused pair: inductor's layer norm (bf16 out), then our kernel.

    python experiments/bench_fp8_quant.py --out experiments/results/fp8_quant.json
"""
import argparse
import itertools
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segment_anything_fast.fp8_linear import FP8, quantize_rows  # noqa: E402
from bench_attention import bench  # noqa: E402  (experiments/ is on sys.path when run as a script)

# (rows, width, act, layer norm first): vit_h's qkv / lin1 inputs, its proj input, its lin2
# input (GELU fused), then vit_b's
SHAPES = [(32768, 1280, "none", True), (32768, 1280, "none", False), (32768, 5120, "gelu", False),
          (32768, 768, "none", True), (32768, 768, "none", False), (32768, 3072, "gelu", False)]


REPEAT = 20  # calls per timed sample: the GPU, not the host's launches, sets the time


def reference(x: torch.Tensor, act: str, norm=None):
    """The per-row fp8 quantization in PyTorch (layer norm in float32 first if ``norm`` =
    (weight, bias, eps); GELU in its tanh form, as the kernel)."""
    x = x.float()
    if norm is not None:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], norm[0].float(), norm[1].float(), norm[2])
    if act == "gelu":
        x = torch.nn.functional.gelu(x, approximate="tanh")
    s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
    return (x * (1.0 / s)).clamp(-448, 448).to(FP8), s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--row-elements", type=int, nargs="*", default=[],
                    help="also time the kernel with these tile sizes (elements per program; the "
                         "default: fp8_linear._launch_config), each with every --num-warps: columns "
                         "ours_<elements>x<warps>_ms")
    ap.add_argument("--num-warps", type=int, nargs="*", default=[4, 8],
                    help="warps per program for the --row-elements sweep")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.row_elements) or any(w not in (1, 2, 4, 8, 16) for w in args.num_warps):
        ap.error(f"--row-elements must be positive and --num-warps powers of two up to 16, got "
                 f"{args.row_elements} / {args.num_warps}")
    if not torch.cuda.is_available():
        ap.error("bench_fp8_quant needs a CUDA GPU (tests/test_fp8_triton.py checks the kernel on the CPU).")
    compiled = torch.compile(reference, dynamic=False)
    layer_norm = torch.compile(torch.nn.functional.layer_norm, dynamic=False)
    rows = []
    for m, k, act, with_norm in SHAPES:
        x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
        norm = None
        if with_norm:
            w, b = torch.randn(k, device="cuda") * 0.2 + 1, torch.randn(k, device="cuda") * 0.2
            norm = (w.to(torch.bfloat16), b.to(torch.bfloat16), 1e-6)
        q, s = quantize_rows(x, act, norm)
        rq, rs = compiled(x, act, norm)
        agree = (q.float() == rq.float()).float().mean().item()
        gb = m * k * 3 / 1e9  # 2 bytes in, 1 byte out per element
        ours = bench(lambda: quantize_rows(x, act, norm), args.iters, repeat=REPEAT)
        ind = bench(lambda: compiled(x, act, norm), args.iters, repeat=REPEAT)
        extra = {}
        if norm is not None:
            extra["unfused_ms"] = bench(lambda: quantize_rows(layer_norm(x, (k,), *norm), act), args.iters, repeat=REPEAT)
        for n, nw in itertools.product(args.row_elements, args.num_warps):
            cfg = dict(row_elements=n, num_warps=nw)
            extra[f"ours_{n}x{nw}_ms"] = bench(lambda: quantize_rows(x, act, norm, config=cfg), args.iters, repeat=REPEAT)
        rows.append(dict(rows=m, width=k, act=act, layer_norm=with_norm, ours_ms=ours, inductor_ms=ind,
                         ours_gb_s=gb / ours * 1e3, inductor_gb_s=gb / ind * 1e3, same_fp8_fraction=agree, **extra))
        print(f"{m}x{k} {act:4s}{' +norm' if with_norm else ''}: ours {ours:.3f} ms ({gb / ours * 1e3:.0f} GB/s), "
              f"inductor {ind:.3f} ms ({gb / ind * 1e3:.0f} GB/s), same fp8 values {agree:.4f}"
              + "".join(f"; {c[:-3]} {v:.3f} ms" for c, v in extra.items()), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
