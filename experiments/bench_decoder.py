r"""The whole mask decoder on the GPU, as the predictor and the AMG call it (one image embedding,
P single-point prompts, multimask): decoder attention "sdpa" vs "triton"
(``segment_anything_fast.decoder_attention``), eager and torch.compile'd, bf16 with the fused
upscaling; accuracy vs the float32 SDPA decoder (relative error of the logits, sign agreement).
SAM's decoder is the same for vit_b/l/h (256 channels, 64x64 tokens).

With ``--images K`` (K > 1) the prompts belong to K images in one call, as in eval_combo's packed
batches, and each setting runs in two forms: ``gathered`` (one embedding copy per prompt) and
``indexed`` (``predict_masks_per_prompt(image_index=)``: one row per image, layer 0's image side
projected once per image); ``--layout`` also times channels-last embeddings.

    python experiments/bench_decoder.py --prompts 64 256 --out experiments/results/decoder.json
    python experiments/bench_decoder.py --prompts 64 --images 8 --attention triton --compile default \
        --layout contiguous channels_last
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bench  # noqa: E402
from bench_encoder import profile  # noqa: E402
from bench_upscale import make_decoder  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--attention", nargs="+", default=["sdpa", "triton"], choices=["sdpa", "triton"])
    ap.add_argument("--compile", nargs="+", default=["none", "default"], choices=["none", "default", "max-autotune-no-cudagraphs"])
    ap.add_argument("--images", type=int, default=1, help="images the prompts belong to (default 1)")
    ap.add_argument("--layout", nargs="+", default=["contiguous"], choices=["contiguous", "channels_last"],
                    help="memory layout of the image embeddings (default contiguous)")
    ap.add_argument("--profile", action="store_true", help="profile the last variant at the last prompt count")
    ap.add_argument("--out", default=None, help="JSON file for the rows (and <out>_profile.txt)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench_decoder needs a CUDA GPU (the CPU tests check the kernel's accuracy).")
    if args.images < 1:
        ap.error("--images must be >= 1")
    dec32 = make_decoder()
    dec = make_decoder().to(torch.bfloat16)
    dec.set_upscaling("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    emb32 = torch.randn(args.images, 256, 64, 64, device="cuda", generator=g)
    pe32 = torch.randn(1, 256, 64, 64, device="cuda", generator=g)
    dense32 = torch.randn(1, 256, 1, 1, device="cuda", generator=g).expand(1, 256, 64, 64)
    forms = ["single"] if args.images == 1 else ["gathered", "indexed"]
    rows, last = [], None
    for p in args.prompts:
        sparse32 = torch.randn(p, 2, 256, device="cuda", generator=g)
        idx = torch.arange(p, device="cuda") * args.images // p  # prompts of each image together
        dense_p = dense32.expand(p, -1, -1, -1)
        with torch.no_grad():
            ref, _ = dec32.predict_masks_per_prompt(emb32[idx], pe32, sparse32, dense_p)
        for layout in args.layout:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            emb, pe, sparse, dense = (t.bfloat16() for t in (emb32, pe32, sparse32, dense_p))
            emb = emb.contiguous(memory_format=fmt)
            for form in forms:
                for attn in args.attention:
                    for mode in args.compile:
                        dec.transformer.set_attention(attn)  # compiled variants guard on it (recompile)
                        if form == "indexed":
                            run = lambda: dec.predict_masks_per_prompt(emb, pe, sparse, dense, image_index=idx)  # noqa: E731
                        elif form == "gathered":
                            run = lambda: dec.predict_masks_per_prompt(emb[idx], pe, sparse, dense)  # noqa: E731
                        else:
                            run = lambda: dec.predict_masks_per_prompt(emb, pe, sparse, dense)  # noqa: E731
                        fn = run if mode == "none" else torch.compile(run, mode=mode, fullgraph=True, dynamic=False)
                        t0 = time.time()
                        with torch.no_grad():
                            out = fn()[0].float()
                            torch.cuda.synchronize()
                            first = time.time() - t0
                            ms = bench(lambda: fn(), iters=20)
                        row = dict(prompts=p, images=args.images, form=form, layout=layout, attention=attn,
                                   compile=mode, ms=ms, first_s=first,
                                   rel_err=((out - ref).norm() / ref.norm()).item(),
                                   sign_agree=((out > 0) == (ref > 0)).float().mean().item())
                        rows.append(row)
                        print(f"{p:5d} {form:8s} {layout:13s} {attn:6s} {mode:28s} {ms:8.3f} ms  rel err "
                              f"{row['rel_err']:.2e}  sign agree {row['sign_agree']:.5f}  first {first:.1f}s",
                              flush=True)
                        last = fn
    text = profile(lambda: last(), f"decoder {rows[-1]['attention']} {rows[-1]['compile']} "
                   f"{rows[-1]['prompts']} prompts") if args.profile and last else None
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        if text:
            with open(os.path.splitext(args.out)[0] + "_profile.txt", "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
