#!/usr/bin/env python
"""Export SAM's image encoder as an AOTInductor package (.pt2) for fast process start-up.

Build the package on the machine (GPU model, torch version) that will run it, e.g.

    python scripts/export_package.py --model-type vit_h --checkpoint sam_vit_h_4b8939.pth \\
        --batch-size 1 --dtype bfloat16 --device cuda --output sam_vit_h_b1_bf16.pt2

then load it with ``segment_anything_fast.aot.attach_compiled_package(sam, path)``.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _load_config(path):
    from segment_anything_fast.build_sam import SamConfig

    if not os.path.isfile(path):
        raise SystemExit(f"error: --config-json {path!r} does not exist.")
    try:
        with open(path) as f:
            fields = json.load(f)
        return SamConfig(**fields)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise SystemExit(f"error: --config-json {path!r} is not a valid SamConfig JSON object: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "default"],
                   help="official SAM architecture (default vit_h)")
    p.add_argument("--config-json", help="JSON file of SamConfig fields for a custom (e.g. tiny) "
                   "architecture; replaces --model-type")
    p.add_argument("--checkpoint", help="state-dict file; without it the weights are random")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="static batch size; smaller batches are padded to it (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--device", default="cuda", help="cuda (default, the current GPU) or cpu")
    p.add_argument("--attention", default=None,
                   help="encoder attention backend: flex (default on cuda), sdpa, triton, math "
                        "(default on cpu)")
    p.add_argument("--mlp-epilogue", action="store_true",
                   help="run each encoder MLP's lin1 + GELU as one GEMM with a bias + GELU epilogue "
                        "(segment_anything_fast.mlp_epilogue; the tanh GELU on CUDA), as "
                        "build_sam_fast does on CUDA")
    p.add_argument("--no-max-autotune", action="store_true",
                   help="skip kernel autotuning while compiling (faster export, slower package)")
    p.add_argument("--with-mask-decoder", action="store_true",
                   help="also compile the mask decoder (any prompt count up to --max-prompts)")
    p.add_argument("--max-prompts", type=_positive_int, default=1024,
                   help="largest number of prompts per decoder call (default 1024; more run in chunks)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=64,
                   help="largest number of points (+1) or box corners per prompt (default 64)")
    p.add_argument("--output", required=True, help="package file to write, ending in .pt2")
    args = p.parse_args(argv)

    import torch

    from segment_anything_fast.aot import export_image_encoder, parse_dtype
    from segment_anything_fast.build_sam import build_sam

    if not args.output.endswith(".pt2"):
        p.error(f"--output must end in .pt2, got {args.output!r}")
    try:
        dtype = parse_dtype(args.dtype)
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available here; build the package on the GPU "
                "machine that will run it (or pass --device cpu).")
    attention = args.attention or ("flex" if device.type == "cuda" else "math")
    config = _load_config(args.config_json) if args.config_json else args.model_type
    name = args.config_json or args.model_type

    t0 = time.perf_counter()
    if args.checkpoint is None:
        print(f"No --checkpoint given: exporting {name} with RANDOM weights (masks will be "
              "meaningless; use this only for tests and timing).", flush=True)
    sam = build_sam(config, args.checkpoint, attention=attention)
    sam.image_encoder.to(device=device, dtype=dtype)  # export then needs no copy
    if args.mlp_epilogue:
        from segment_anything_fast.mlp_epilogue import set_mlp_epilogue

        set_mlp_epilogue(sam.image_encoder, True)
    if args.with_mask_decoder:
        sam.mask_decoder.to(device=device, dtype=dtype)
    t1 = time.perf_counter()
    print(f"built {name} ({'random weights' if args.checkpoint is None else args.checkpoint}) "
          f"in {t1 - t0:.1f} s; exporting batch {args.batch_size}, {dtype}, {device}, "
          f"attention={attention}{', MLP epilogue' if args.mlp_epilogue else ''} ...", flush=True)
    meta = export_image_encoder(sam, args.output, batch_size=args.batch_size, dtype=dtype,
                                device=device, max_autotune=not args.no_max_autotune,
                                include_mask_decoder=args.with_mask_decoder,
                                max_prompts=args.max_prompts, max_prompt_tokens=args.max_prompt_tokens)
    t2 = time.perf_counter()
    size_mb = os.path.getsize(args.output) / 2**20
    where = meta["gpu_name"] or f"CPU ({meta['cpu_capability']})"
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {t2 - t1:.1f} s: {meta['model_type']}, "
          f"batch {meta['batch_size']}, {meta['dtype']}, torch {meta['torch_version']}, {where}"
          f"{', with mask decoder' if 'decoder' in meta else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
