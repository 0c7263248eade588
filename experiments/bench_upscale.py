"""Mask-decoder upscaling on the GPU: the fused kernel (``upscaling="triton"``) vs the module
chain (eager and torch.compile'd), accuracy vs float32 and speed, at SAM's decoder shapes
(64x64 tokens of 256 channels per prompt, 4 mask tokens).

    python experiments/bench_upscale.py --prompts 64 256 1024 --out experiments/results/upscale.json
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bench  # noqa: E402

from segment_anything_fast.fused_upscale import fused_upscale_masks  # noqa: E402
from segment_anything_fast.modeling.mask_decoder import MaskDecoder  # noqa: E402
from segment_anything_fast.modeling.transformer import TwoWayTransformer  # noqa: E402

# launch configs of the fused kernel (keys: fused_upscale.DEFAULT_CONFIG), each flag spelled out
# (off unless named, ROUND on) so the names stay valid whatever the default is.
# BLOCK 32/64 divides SAM's 64-wide grid, so ROW_STORE writes one contiguous run per output row
def _C(b=64, w=4, s=2, ROUND=True, ROW_STORE=False, WIDE=False, HOIST_W=False, BLOCKS_PER_PROG=1):
    return dict(BLOCK=b, num_warps=w, num_stages=s, ROUND=ROUND, ROW_STORE=ROW_STORE, WIDE=WIDE,
                HOIST_W=HOIST_W, BLOCKS_PER_PROG=BLOCKS_PER_PROG)


CONFIGS = [
    _C(), _C(128, 8), _C(s=3), _C(ROUND=False),
    _C(ROW_STORE=True), _C(w=8, ROW_STORE=True), _C(ROW_STORE=True, HOIST_W=True),
    _C(ROW_STORE=True, BLOCKS_PER_PROG=4, HOIST_W=True),
    _C(WIDE=True), _C(WIDE=True, ROW_STORE=True), _C(w=8, WIDE=True, ROW_STORE=True),
    _C(32, WIDE=True, ROW_STORE=True), _C(128, 8, WIDE=True, ROW_STORE=True),
    _C(WIDE=True, ROW_STORE=True, HOIST_W=True), _C(WIDE=True, ROW_STORE=True, ROUND=False),
    _C(WIDE=True, ROW_STORE=True, HOIST_W=True, BLOCKS_PER_PROG=4),
    _C(128, 8, WIDE=True, ROW_STORE=True, ROUND=False),
]
_FLAGS = dict(ROUND=("", "R0"), ROW_STORE=("RS", ""), WIDE=("WIDE", ""), HOIST_W=("HW", ""))


def config_name(c):
    """``triton[BLOCK,warps,stages flags]``, e.g. ``triton[64,4,2 RS WIDE BPP4]``."""
    flags = [on if c[k] else off for k, (on, off) in _FLAGS.items() if k in c]
    if c.get("BLOCKS_PER_PROG", 1) > 1:
        flags.append(f"BPP{c['BLOCKS_PER_PROG']}")
    flags = " ".join(f for f in flags if f)
    return "triton[{BLOCK},{num_warps},{num_stages}".format(**c) + (f" {flags}]" if flags else "]")


def make_decoder(dim=256, seed=0):
    torch.manual_seed(seed)
    dec = MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(
        depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8))
    ln = dec.output_upscaling[1]  # LayerNorm2d starts at ones/zeros: give it trained-like spread
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_(0, 0.1)
    return dec.cuda().eval()


def check_config(cfg, grid):
    """One small bf16 launch of ``cfg`` (None: the default); raises on a CUDA error."""
    dec = make_decoder().to(torch.bfloat16)
    src = torch.randn(2, grid * grid, 256, device="cuda", dtype=torch.bfloat16)
    hyper = torch.randn(2, 4, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = fused_upscale_masks(dec.output_upscaling, src, hyper, grid, cfg)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def launchable(configs, grid):
    """The configs that launch cleanly, each tried in a child process (8 at a time; the
    compiles land in Triton's cache): a kernel fault such as an illegal address would spoil
    this process's CUDA context for every later row."""
    def ok(cfg):
        try:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--grid", str(grid),
                                  "--check-config", json.dumps(cfg)], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return False, "timed out"
        return res.returncode == 0, (res.stderr.strip().splitlines() or ["?"])[-1][:120]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(ok, configs))
    for cfg, (good, why) in zip(configs, results):
        if not good:
            print(f"skipping {'triton' if cfg is None else config_name(cfg)}: {why}", flush=True)
    return [cfg for cfg, (good, _) in zip(configs, results) if good]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--grid", type=int, default=64, help="token grid side (SAM: 64)")
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch config")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd module chain")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--check-config", default=None, help=argparse.SUPPRESS)  # launchable()'s child
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench_upscale needs a CUDA GPU (the CPU tests check the kernel's accuracy).")
    if args.check_config is not None:
        return check_config(json.loads(args.check_config), args.grid)
    configs = launchable([None] + ([] if args.no_sweep else CONFIGS), args.grid)
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
            for c in configs:
                variants["triton" if c is None else config_name(c)] = (
                    lambda c: lambda: fused_upscale_masks(up, src, hyper, args.grid, c))(c)
            for name, fn in variants.items():
                t0 = time.time()
                try:
                    out = fn().float()
                    torch.cuda.synchronize()
                    first = time.time() - t0
                    ms = bench(fn, iters=10)
                except Exception as e:  # a launch config that does not fit is skipped
                    print(f"{p:5d} {name:34s} FAILED {type(e).__name__}: {str(e)[:100]}")
                    continue
                row = dict(prompts=p, variant=name, ms=ms, first_s=first,
                           rel_err=((out - ref).norm() / ref.norm()).item(),
                           sign_agree=((out > 0) == (ref > 0)).float().mean().item())
                rows.append(row)
                print(f"{p:5d} {name:34s} {ms:8.3f} ms  rel err {row['rel_err']:.2e}  sign agree "
                      f"{row['sign_agree']:.5f}  first {first:.1f}s", flush=True)
        del src32, tok32, ref, src, tok, out
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
