"""int8_triton's matmul (``int8_linear.int8_matmul``: int8 x int8 -> int32, scales and bias in
the epilogue, bf16 out) on the GPU at the encoder's linear shapes (batch 8: 32768 tokens),
against, in the same process: the bf16 linear (cuBLAS), torchao's int8 arithmetic
(``torch._int_mm`` then the scales and bias, compiled by inductor) and the fp8 row-scaled
``torch._scaled_mm`` of fp8_triton. Milliseconds (median of CUDA-event timed samples of 10
back-to-back calls), TFLOP/s, and the largest difference from the ``_int_mm`` result.

    python experiments/bench_int8_matmul.py --sweep --out experiments/results/int8_matmul.json
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segment_anything_fast.int8_linear import _matmul_config, _tma_possible, int8_matmul  # noqa: E402
from bench_attention import bench  # noqa: E402  (experiments/ is on sys.path when run as a script)

# (model, linear, N, K) at M = 32768 tokens
SHAPES = [("vit_h", "qkv", 3840, 1280), ("vit_h", "proj", 1280, 1280), ("vit_h", "lin1", 5120, 1280),
          ("vit_h", "lin2", 1280, 5120), ("vit_b", "qkv", 2304, 768), ("vit_b", "proj", 768, 768),
          ("vit_b", "lin1", 3072, 768), ("vit_b", "lin2", 768, 3072)]
# tile configurations timed with --sweep (each a column cfg_<BMxBNxBK>_w<warps>_s<stages>[_tma]_ms)
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, TMA=tma)
         for tma in (False, True)
         for bm, bn, bk, w, st in ((128, 128, 64, 4, 5), (128, 128, 64, 8, 5), (128, 128, 128, 4, 4),
                                   (128, 256, 64, 8, 4), (128, 256, 128, 8, 4), (256, 128, 64, 8, 4),
                                   (256, 128, 128, 8, 3))]
REPEAT = 10


def int_mm_reference(a, s_a, w, s_w, bias):
    """torchao's int8 dynamic arithmetic: int32 product, then scales and bias (bf16 out)."""
    return (torch._int_mm(a, w.t()).float() * s_a * s_w + bias.float()).to(torch.bfloat16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32768, help="M: tokens (32768 = batch 8 of 64x64)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["vit_h", "vit_b"], choices=["vit_h", "vit_b"],
                    help="whose linear shapes to time")
    ap.add_argument("--sweep", action="store_true", help="also time every tile configuration of SWEEP")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.iters < 1:
        ap.error(f"--rows and --iters must be positive, got {args.rows} / {args.iters}")
    if not torch.cuda.is_available():
        ap.error("bench_int8_matmul needs a CUDA GPU (tests/test_fp8_triton.py checks the kernel on the CPU).")
    m = args.rows
    reference = torch.compile(int_mm_reference, dynamic=False)
    rows = []
    for model, name, n, k in (shape for shape in SHAPES if shape[0] in args.models):
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
        s_a = torch.rand(m, 1, device="cuda", generator=g) * 1e-3
        s_w = torch.rand(1, n, device="cuda", generator=g) * 1e-3
        bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        x16, w16 = a.to(torch.bfloat16), w.to(torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        ours = int8_matmul(a, s_a, w, s_w, bias)
        want = reference(a, s_a, w, s_w, bias)
        err = ((ours.float() - want.float()).abs().max() / want.float().abs().max()).item()
        tflop = 2 * m * n * k / 1e12
        t = dict(ours_ms=bench(lambda: int8_matmul(a, s_a, w, s_w, bias), args.iters, repeat=REPEAT),
                 int_mm_ms=bench(lambda: reference(a, s_a, w, s_w, bias), args.iters, repeat=REPEAT),
                 bf16_ms=bench(lambda: torch.nn.functional.linear(x16, w16, bias), args.iters, repeat=REPEAT),
                 fp8_ms=bench(lambda: torch._scaled_mm(a8, w8.t(), scale_a=s_a, scale_b=s_w, bias=bias,
                                                      out_dtype=torch.bfloat16, use_fast_accum=True),
                              args.iters, repeat=REPEAT))
        if args.sweep:
            for cfg in SWEEP:
                key = (f"cfg_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}_w{cfg['num_warps']}_s{cfg['num_stages']}"
                       f"{'_tma' if cfg['TMA'] else ''}_ms")
                try:
                    t[key] = bench(lambda: int8_matmul(a, s_a, w, s_w, bias, config=cfg), args.iters, repeat=REPEAT)
                except Exception as e:  # e.g. out of shared memory: record, keep sweeping
                    t[key] = f"error: {type(e).__name__}: {str(e)[:120]}"
        row = dict(model=model, linear=name, m=m, n=n, k=k, config=_matmul_config(m, n, k, _tma_possible(a, k)),
                   max_rel_diff=err, **t,
                   **{f"{key[:-3]}_tflops": tflop / v * 1e3 for key, v in t.items() if isinstance(v, float)})
        rows.append(row)
        print(f"{model} {name} {m}x{n}x{k}: ours {t['ours_ms']:.3f} ms ({tflop / t['ours_ms'] * 1e3:.0f} TFLOP/s), "
              f"_int_mm+scales {t['int_mm_ms']:.3f}, bf16 {t['bf16_ms']:.3f}, fp8 {t['fp8_ms']:.3f}; "
              f"ours / bf16 = {t['bf16_ms'] / t['ours_ms']:.2f}x; max rel diff {err:.1e}"
              + "".join(f"; {key[4:-3]} {v:.3f}" if isinstance(v, float) else f"; {key[4:-3]} {v}"
                        for key, v in t.items() if key.startswith("cfg_")), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__), rows=rows), f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
