"""Mask-decoder upscaling on the GPU: the fused kernel (``upscaling="triton"``) vs the module
chain (eager and torch.compile'd), accuracy vs float32 and speed, at SAM's decoder shapes
(64x64 tokens of 256 channels per prompt, 4 mask tokens).

    python experiments/bench_upscale.py --prompts 64 256 1024 --out experiments/results/upscale.json
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bench  # noqa: E402

from segment_anything_fast.fused_upscale import fused_upscale_masks  # noqa: E402
from segment_anything_fast.modeling.mask_decoder import MaskDecoder  # noqa: E402
from segment_anything_fast.modeling.transformer import TwoWayTransformer  # noqa: E402

CONFIGS = [dict(BLOCK=b, num_warps=w, num_stages=s) for b in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
           if not (b == 32 and w == 8)]


def make_decoder(dim=256, seed=0):
    torch.manual_seed(seed)
    dec = MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(
        depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8))
    ln = dec.output_upscaling[1]  # LayerNorm2d starts at ones/zeros: give it trained-like spread
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_(0, 0.1)
    return dec.cuda().eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--grid", type=int, default=64, help="token grid side (SAM: 64)")
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch config")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd module chain")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench_upscale needs a CUDA GPU (the CPU tests check the kernel's accuracy).")
    dec32 = make_decoder()
    dec = make_decoder().to(torch.bfloat16)
    up = dec.output_upscaling
    conv = lambda s, h: dec.upscale_masks(s, h, args.grid)  # noqa: E731  (dec.upscaling is "conv")
    compiled = None if args.no_compile else torch.compile(conv)
    rows = []
    n = args.grid * args.grid
    for p in args.prompts:
        g = torch.Generator(device="cuda").manual_seed(p)
        src32 = torch.randn(p, n, 256, device="cuda", generator=g)
        tok32 = torch.randn(p, 4, 256, device="cuda", generator=g)
        with torch.no_grad():
            ref = dec32.upscale_masks(src32, tok32, args.grid).float()
            src, tok = src32.bfloat16(), tok32.bfloat16()
            hyper = torch.stack([m(tok[:, i]) for i, m in enumerate(dec.output_hypernetworks_mlps)], 1)
            variants = {"conv_eager": lambda: conv(src, tok)}
            if compiled is not None:
                variants["conv_compiled"] = lambda: compiled(src, tok)
            variants["triton"] = lambda: fused_upscale_masks(up, src, hyper, args.grid)
            if not args.no_sweep:
                for c in CONFIGS:
                    key = "triton[{BLOCK},{num_warps},{num_stages}]".format(**c)
                    variants[key] = (lambda c: lambda: fused_upscale_masks(up, src, hyper, args.grid, c))(c)
            for name, fn in variants.items():
                t0 = time.time()
                try:
                    out = fn().float()
                    torch.cuda.synchronize()
                    first = time.time() - t0
                    ms = bench(fn, iters=10)
                except Exception as e:  # a launch config that does not fit is skipped
                    print(f"{p:5d} {name:22s} FAILED {type(e).__name__}: {str(e)[:100]}")
                    continue
                row = dict(prompts=p, variant=name, ms=ms, first_s=first,
                           rel_err=((out - ref).norm() / ref.norm()).item(),
                           sign_agree=((out > 0) == (ref > 0)).float().mean().item())
                rows.append(row)
                print(f"{p:5d} {name:22s} {ms:8.3f} ms  rel err {row['rel_err']:.2e}  sign agree "
                      f"{row['sign_agree']:.5f}  first {first:.1f}s", flush=True)
        del src32, tok32, ref, src, tok, out
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
