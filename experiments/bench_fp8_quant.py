"""The fp8_triton activation quantization (``fp8_linear.quantize_rows``) on the GPU, at the
encoder's shapes (batch 8: 32768 tokens), against the same per-row quantization written in
PyTorch and compiled by inductor (what torchao's fp8 linears leave to inductor): milliseconds
(median of CUDA-event timed calls), GB/s of the bytes that must move (bf16 in, fp8 out) and
whether both give the same fp8 values.

    python experiments/bench_fp8_quant.py --out experiments/results/fp8_quant.json
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segment_anything_fast.fp8_linear import FP8, quantize_rows  # noqa: E402
from bench_attention import bench  # noqa: E402  (experiments/ is on sys.path when run as a script)

# (rows, width, act): vit_h's qkv / proj / lin1 inputs, its lin2 input (GELU fused), vit_b's
SHAPES = [(32768, 1280, "none"), (32768, 5120, "gelu"), (32768, 5120, "none"), (32768, 768, "none"),
          (32768, 3072, "gelu")]


def reference(x: torch.Tensor, act: str):
    """The per-row fp8 quantization in PyTorch (GELU in its tanh form, as the kernel)."""
    x = x.float()
    if act == "gelu":
        x = torch.nn.functional.gelu(x, approximate="tanh")
    s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
    return (x * (1.0 / s)).clamp(-448, 448).to(FP8), s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--row-elements", type=int, nargs="*", default=[],
                    help="also time the kernel with these tile sizes (elements per program; the "
                         "default is fp8_linear._ROW_ELEMENTS), each a column ours_<n>_ms")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.row_elements):
        ap.error(f"--row-elements must be positive, got {args.row_elements}")
    if not torch.cuda.is_available():
        ap.error("bench_fp8_quant needs a CUDA GPU (tests/test_fp8_triton.py checks the kernel on the CPU).")
    compiled = torch.compile(reference, dynamic=False)
    rows = []
    for m, k, act in SHAPES:
        x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
        q, s = quantize_rows(x, act)
        rq, rs = compiled(x, act)
        agree = (q.float() == rq.float()).float().mean().item()
        gb = m * k * 3 / 1e9  # 2 bytes in, 1 byte out per element
        ours = bench(lambda: quantize_rows(x, act), args.iters)
        ind = bench(lambda: compiled(x, act), args.iters)
        sweep = {f"ours_{n}_ms": bench(lambda: quantize_rows(x, act, row_elements=n), args.iters)
                 for n in args.row_elements}
        rows.append(dict(rows=m, width=k, act=act, ours_ms=ours, inductor_ms=ind, ours_gb_s=gb / ours * 1e3,
                         inductor_gb_s=gb / ind * 1e3, same_fp8_fraction=agree, **sweep))
        print(f"{m}x{k} {act:4s}: ours {ours:.3f} ms ({gb / ours * 1e3:.0f} GB/s), inductor {ind:.3f} ms "
              f"({gb / ind * 1e3:.0f} GB/s), same fp8 values {agree:.4f}"
              + "".join(f"; {n} elements {v:.3f} ms" for n, v in zip(args.row_elements, sweep.values())), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
