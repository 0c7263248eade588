"""Rel-pos attention kernels on the GPU: accuracy vs a float32 reference and speed.

Shapes are SAM's at a given image batch: global layers (64x64 grid) and windowed layers
(25 windows of 14x14 per image), for vit_b (12 heads x 64) and vit_h (16 heads x 80).
Backends: "sdpa" (dense bias as attn_mask), "flex" (score_mod), "triton" (ours, with the
table config and a sweep of launch configs, so kernel_config can be set from measurements).
``--grid-shapes``: the form the encoder runs, ``triton_grid_attention`` on a (B, 64, 64, 3C)
qkv tensor (windows read in place, padded edge windows), with the same config sweep, and the
time of the layer's rel-logit matmul (``Attention._rel_logits``).

    python experiments/bench_attention.py --batch 8 --out experiments/results/attention.json
"""
import argparse
import json
import os
import time

import torch
import triton

from segment_anything_fast.attention import dense_bias, rel_pos_attention
from segment_anything_fast.triton_attention import kernel_config, triton_rel_pos_attention

SHAPES = {  # name: (images -> batch multiplier, heads, grid, head dim)
    "vit_b_global": (1, 12, 64, 64),
    "vit_b_window": (25, 12, 14, 64),
    "vit_h_global": (1, 16, 64, 80),
    "vit_h_window": (25, 16, 14, 80),
}


def make_inputs(batch, mult, nh, grid, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, N = batch * mult, grid * grid
    # q, k, v as views of one qkv tensor, as the encoder produces them
    qkv = torch.randn(B, N, 3, nh, d, device="cuda", generator=g, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rh = torch.randn(B, nh, N, grid, device="cuda", generator=g, dtype=dtype)
    rw = torch.randn(B, nh, N, grid, device="cuda", generator=g, dtype=dtype)
    return q, k, v, rh, rw


def reference(q, k, v, rh, rw):
    """float32 math in chunks of (batch) to bound memory."""
    outs = []
    for i in range(q.shape[0]):
        qi, ki, vi = (t[i : i + 1].float() for t in (q, k, v))
        s = qi @ ki.transpose(-2, -1) * qi.shape[-1] ** -0.5
        s = s + dense_bias(rh[i : i + 1].float(), rw[i : i + 1].float())
        outs.append(s.softmax(-1) @ vi)
    return torch.cat(outs)


def bench(fn, iters=20, warmup=3, repeat=1):
    """Median milliseconds per ``fn()`` call over ``iters`` CUDA-event timed samples of
    ``repeat`` back-to-back calls each (``repeat`` > 1 keeps the GPU busy while the host
    launches, so short kernels are not timed at the host's launch speed)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeat):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / repeat)
    times.sort()
    return times[len(times) // 2]


def sweep_configs(name):
    wp = 64 if "global" in name else 16
    rows_opts = [1, 2] if wp == 64 else [2, 4]
    out = []
    for bm in (64, 128):
        for rows in rows_opts:
            for nw in (4, 8):
                for ns in (2, 3, 4):
                    if bm == 64 and nw == 8:
                        continue
                    out.append(dict(BLOCK_M=bm, ROWS=rows, num_warps=nw, num_stages=ns))
    return out


def time_variant(fn, ref, label):
    """(ms, relative error vs ``ref`` (nan without one), first-call seconds) of ``fn``, or None
    after printing why it failed (a config that does not fit, e.g. in shared memory)."""
    t0 = time.time()
    try:
        out = fn()
        torch.cuda.synchronize()
        first = time.time() - t0
        err = ((out.float() - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
        return bench(fn), err, first
    except Exception as e:
        print(f"{label} FAILED {type(e).__name__}: {str(e)[:120]}")
        return None


GRID_SHAPES = {  # name: (embed dim, heads, window size; 0 = global), on a 64x64 token grid
    "vit_b_grid_global": (768, 12, 0),
    "vit_b_grid_window": (768, 12, 14),
    "vit_h_grid_global": (1280, 16, 0),
    "vit_h_grid_window": (1280, 16, 14),
}


def grid_rows(name, batch, sweep, cap, grid=64, device="cuda", dtype=torch.bfloat16):
    """The encoder's form: triton_grid_attention on a (B, 64, 64, 3C) qkv tensor (windows read in
    place, padded to 70x70 with qkv's bias), with rel logits from ``Attention._rel_logits``;
    reference: the same Attention in float32 through the math backend (window partition)."""
    from segment_anything_fast.modeling.image_encoder import Attention
    from segment_anything_fast.triton_attention import triton_grid_attention

    dim, nh, ws = GRID_SHAPES[name]
    size = ws or grid
    torch.manual_seed(0)
    attn = Attention(dim, nh, use_rel_pos=True, rel_pos_zero_init=False, input_size=(size, size),
                     attention="math").to(device)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        qkv = torch.randn(batch, grid, grid, 3 * dim, device=device)
        ref = attn.attend(qkv, ws, attn.qkv.bias)
        attn.to(dtype)
        qkv = qkv.to(dtype)
        rel = attn._rel_logits(qkv, ws)
    pad = attn.qkv.bias.detach()
    n_win = triton.cdiv(grid, ws) ** 2 if ws else 1
    flops = 4 * batch * n_win * nh * (size * size) ** 2 * (dim // nh)
    cfgs = {"table": kernel_config(size * size, size, dim // nh, cap)}
    if sweep:
        cfgs.update({"[{BLOCK_M},{ROWS},{num_warps},{num_stages}]".format(**c): c
                     for c in sweep_configs("global" if ws == 0 else "window")})
    rows = []
    for key, cfg in cfgs.items():
        fn = (lambda c: lambda: triton_grid_attention(qkv, nh, ws, rel, pad, config=c))(cfg)
        timed = time_variant(fn, ref, f"{name:18s} grid{key:24s}")
        if timed is None:
            continue
        ms, err, first = timed
        rows.append(dict(shape=name, batch=batch, variant=f"grid{key}", config=cfg, ms=ms,
                         tflops=flops / ms / 1e9, rel_err=err, first_s=first))
        print(f"{name:18s} grid{key:24s} {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s err {err:.2e}",
              flush=True)
    with torch.no_grad():  # the bias input of the layer: one matmul per layer
        ms = bench(lambda: attn._rel_logits(qkv, ws))
    rows.append(dict(shape=name, batch=batch, variant="rel_logits", ms=ms))
    print(f"{name:18s} rel_logits (bias input matmul) {ms:8.3f} ms", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--grid-shapes", nargs="*", default=list(GRID_SHAPES), choices=list(GRID_SHAPES),
                    help="the encoder's form (triton_grid_attention on the token grid)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench_attention needs a CUDA GPU (it times the kernels); on the CPU, "
                 "tests/test_fast_triton.py checks them in the Triton interpreter")
    import segment_anything_fast.flex_attention  # noqa: F401  (registers "flex")

    cap = torch.cuda.get_device_capability()
    rows = []
    for name in args.shapes:
        mult, nh, grid, d = SHAPES[name]
        q, k, v, rh, rw = make_inputs(args.batch, mult, nh, grid, d)
        ref = reference(q, k, v, rh, rw)
        flops = 4 * q.shape[0] * nh * (grid * grid) ** 2 * d
        variants = {
            "sdpa_dense_bias": lambda: rel_pos_attention(q, k, v, rh, rw, "sdpa"),
            "flex": lambda: rel_pos_attention(q, k, v, rh, rw, "flex"),
            "triton": lambda: rel_pos_attention(q, k, v, rh, rw, "triton"),
            # calibration: plain attention without the bias (FlashAttention through SDPA, ours)
            "sdpa_nobias": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "triton_nobias": lambda: rel_pos_attention(q, k, v, None, None, "triton"),
        }
        if not args.no_sweep:
            for cfg in sweep_configs(name):
                key = "triton[{BLOCK_M},{ROWS},{num_warps},{num_stages}]".format(**cfg)
                variants[key] = (lambda c: lambda: triton_rel_pos_attention(q, k, v, rh, rw, config=c))(cfg)
        for vname, fn in variants.items():
            timed = time_variant(fn, None if "nobias" in vname else ref, f"{name:14s} {vname:28s}")
            if timed is None:
                continue
            ms, err, first = timed
            row = dict(shape=name, batch=args.batch, variant=vname, ms=ms,
                       tflops=flops / ms / 1e9, rel_err=err, first_s=first)
            rows.append(row)
            print(f"{name:14s} {vname:28s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"err {err:.2e} first {first:.1f}s", flush=True)
        print(f"{name}: table config {kernel_config(grid * grid, grid, d, cap)}")
        best = min((r for r in rows if r["shape"] == name and r["variant"].startswith("triton")),
                   key=lambda r: r["ms"], default=None)
        if best:
            print(f"{name}: best triton {best['variant']} {best['ms']:.3f} ms")
        del q, k, v, rh, rw, ref
        torch.cuda.empty_cache()
        save(args.out, rows)
    for name in args.grid_shapes:
        rows += grid_rows(name, args.batch, not args.no_sweep, cap)
        torch.cuda.empty_cache()
        save(args.out, rows)


def save(path, rows):
    """Write the rows so far (after every shape: a run cut short keeps what it measured)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
