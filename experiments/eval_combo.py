#!/usr/bin/env python
"""COCO point-prompt evaluation: mIoU, throughput and peak memory of one model setting.

For every (non-crowd) annotation the prompt is one positive point, the point farthest from the
object boundary; the model runs with multimask_output=True and the mask with the highest
predicted IoU is compared with the ground truth. mIoU is the mean over annotations. Appends
one row per run to --output (CSV). Works on real COCO (--coco-root datasets/coco) and on
the generated dataset of scripts/make_synthetic_coco.py.

Under torchrun each rank (one per GPU, cuda:LOCAL_RANK) evaluates a disjoint shard of the
images; rank 0 gathers the per-annotation IoUs (same mIoU as one process), counts and timings
and writes the row. A rank that fails stops every rank with a message naming it and the image.

Example:
  python scripts/make_synthetic_coco.py --output datasets/synth --num-images 64
  python experiments/eval_combo.py --coco-root datasets/synth --model-type vit_b --limit 64
  torchrun --nproc-per-node 2 experiments/eval_combo.py --coco-root datasets/synth
A scripts/train_demo.py checkpoint on its own held-out scenes (prints its held-out mIoU; the
architecture comes from the file):
  python scripts/make_synthetic_coco.py --output datasets/demo_heldout --heldout-of sam_demo.pt
  python experiments/eval_combo.py --coco-root datasets/demo_heldout --checkpoint sam_demo.pt
(--heldout-of demo / --checkpoint demo: the bundled demo checkpoint, mIoU 0.867.)
"""
import argparse
import csv
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_encoder  # noqa: E402  (shared helper: profile)

from segment_anything_fast.data.coco_prompts import (  # noqa: E402
    CenterPointCache, CocoPointPromptDataset, load_coco, mask_iou, pack_masks,
    select_annotations, unpack_mask_groups,
)
from segment_anything_fast.compile import DEFAULT_DECODER_BUCKETS, POSTPROCESS_BACKENDS, compile_function  # noqa: E402
from segment_anything_fast.utils.amg import to_device  # noqa: E402
from segment_anything_fast.utils.transforms import ResizeLongestSide  # noqa: E402
from segment_anything_fast.validation import check_checkpoint_arg, check_output_path  # noqa: E402
from segment_anything_fast.distributed import (  # noqa: E402
    DEFAULT_TIMEOUT_S, DistContext, RankFailedError, finish, init_distributed, print_failure,
    shard, shard_size,
)

# tiny: SAM_CONFIGS["tiny"]; auto: the config stored in --checkpoint, else its official type
MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "default", "tiny", "auto")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
PROMPT_BATCHING = ("nested", "padded", "none")
PREPROCESS_BACKENDS = ("host", "triton")
CSV_FIELDS = (
    "timestamp", "model_type", "checkpoint", "device", "dtype", "compile", "attention",
    "upscaling", "decoder_attention", "postprocess", "preprocess", "prompt_batching", "compress", "mlp_epilogue", "batch_size", "num_workers", "limit", "n_images",
    "n_annotations", "n_skipped_images", "warmup_batches", "timed_images", "miou",
    "img_per_s_model", "img_per_s_end_to_end", "img_per_s_encoder_only", "end_to_end_vs_encoder",
    "loader_wait_fraction",
    "peak_gpu_memory_mib", "gpu_name",
    "torch_version", "git_commit", "annotations", "world_size", "per_rank_img_per_s",
)


def compress_modes() -> tuple:
    try:
        from segment_anything_fast.quantize import COMPRESS_MODES
    except ImportError:
        return ("none",)
    return tuple(COMPRESS_MODES)


def attention_backends() -> list:
    from segment_anything_fast import attention

    attention._load_optional_backends()
    return attention.available_backends()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--coco-root", required=True,
                   help="dataset root holding <split>/ (images) and annotations/")
    d.add_argument("--split", default="val2017",
                   help="image folder under --coco-root (default val2017)")
    d.add_argument("--annotations", default=None,
                   help="COCO instances JSON (default <coco-root>/annotations/instances_<split>.json)")
    d.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N images (by image id); default all")
    d.add_argument("--batch-size", type=int, default=1, help="images per encoder batch (default 1)")
    d.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes for decode/resize/GT masks/center points "
                        "(default min(4, CPUs); 0 loads in the main process)")
    d.add_argument("--cache-dir", default=os.path.join("~", ".cache", "segment_anything_fast"),
                   help="where center points are cached by annotation id ('none' disables; "
                        "default ~/.cache/segment_anything_fast)")
    m = p.add_argument_group("model")
    m.add_argument("--model-type", default=None,
                   help=f"one of {', '.join(MODEL_TYPES)} (tiny: the 128 px test model; auto: the "
                        "architecture stored in --checkpoint, e.g. by scripts/train_demo.py, else "
                        "the official type its weights match). Default: auto with --checkpoint, "
                        "vit_b without")
    m.add_argument("--config-json", default=None,
                   help="a SamConfig as JSON (inline or a file path); overrides --model-type's "
                        "architecture, e.g. '{\"encoder_embed_dim\": 64, ...}'")
    m.add_argument("--checkpoint", default=None,
                   help="state-dict file, or 'demo' (the bundled demo model); without it the "
                        "model has RANDOM weights (mIoU is then meaningless, throughput is still "
                        "valid)")
    m.add_argument("--seed", type=int, default=0,
                   help="torch seed for the random weights when there is no --checkpoint, so runs "
                        "with different settings compare the same model (default 0)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda when available)")
    m.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    m.add_argument("--compile", default="none",
                   help=f"torch.compile the image encoder and mask decoder: {', '.join(COMPILE_MODES)} "
                        "(default none; reduce-overhead: CUDA graphs for the encoder and the decoders, "
                        "max-autotune: for the encoder only)")
    m.add_argument("--attention", default="math",
                   help="image-encoder attention backend: any registered one (math, sdpa, and flex/"
                        "triton when available; default math)")
    m.add_argument("--upscaling", default="conv",
                   help="mask-decoder upscaling: conv (the original ConvTranspose modules) or "
                        "triton (segment_anything_fast.fused_upscale: one fused kernel, CUDA only; "
                        "default conv)")
    m.add_argument("--decoder-attention", default="sdpa",
                   help="mask-decoder attention: sdpa (scaled_dot_product_attention) or triton "
                        "(segment_anything_fast.decoder_attention: one kernel with tiles sized to "
                        "the prompt tokens, CUDA only; default sdpa)")
    m.add_argument("--postprocess", default="torch",
                   help="the best masks' upscale + threshold: torch (the ops of Sam.postprocess_masks; "
                        "compiled with any --compile) or triton (segment_anything_fast.fused_postprocess: "
                        "one kernel from low-res logits to full-resolution masks, CUDA only; default torch)")
    m.add_argument("--preprocess", default="host",
                   help="the images' resize + normalisation + padding: host (the data workers resize "
                        "with PIL, as the original predictor does) or triton "
                        "(segment_anything_fast.fused_preprocess: the workers send the decoded images "
                        "as they are and one kernel resizes them with PIL's arithmetic, normalises "
                        "and pads the batch; CUDA and --prompt-batching nested only; default host)")
    m.add_argument("--prompt-batching", default="padded",
                   help="how the decoder sees the prompts of a batch. "
                        "padded: encoder on the whole batch, then one decoder call per image with "
                        "the prompt count padded to the next power of two (>= 8) so shapes repeat; "
                        "padding prompts are dropped before the metric. "
                        "nested: encoder on the whole batch, then ONE decoder call for all prompts "
                        "of all images (ragged: each prompt gathers its own image's embedding; "
                        "implemented with index-gathered dense tensors, not torch.nested, whose "
                        "ops the decoder needs are not all supported). "
                        "none: image by image, encoder batch 1, exact prompt count. (default padded)")
    m.add_argument("--compress", default="none",
                   help="image-encoder compression (segment_anything_fast.quantize): "
                        + ", ".join(compress_modes()) + " (default none)")
    m.add_argument("--mlp-epilogue", default="off",
                   help="on: each image-encoder MLP runs lin1 + GELU as one GEMM with cuBLASLt's bias + "
                        "GELU epilogue (segment_anything_fast.mlp_epilogue; on CUDA the tanh GELU); "
                        "not with --compress, which quantizes lin1 too; off: lin1, then GELU (default off)")
    o = p.add_argument_group("run")
    o.add_argument("--warmup-batches", type=int, default=None,
                   help="batches excluded from throughput (compile/autotune; default 1, or 3 with "
                        "--compile); mIoU always covers every image")
    o.add_argument("--encoder-iters", type=int, default=10,
                   help="after the evaluation, time the same image encoder alone on random "
                        "full batches this many times (2 untimed calls first) and report its img/s "
                        "next to the pipeline's, so that the pipeline overhead is measured in one "
                        "run; 0 skips it (default 10)")
    o.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after all timings (main rank), profile predict_batch and the image "
                        "encoder alone (_encode) on the last batch, N calls each (GPU kernels on "
                        "CUDA, host ops and wall per call always), into <output stem>_profile.txt; "
                        "0 skips it (default 0)")
    o.add_argument("--output", default="results.csv",
                   help="CSV file to append one row to (created with a header; default results.csv)")
    o.add_argument("--commit", default="",
                   help="git commit recorded in the row (for a copy of the code without .git; "
                        "default: git describe of this checkout)")
    o.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others at a sync point "
                        "(once per batch) before the run fails; must cover the slowest batch, "
                        f"compilation included (default {DEFAULT_TIMEOUT_S:.0f})")
    return p


def validate_args(args, parser) -> None:
    """Turn bad flag values into parser errors that list the valid choices."""
    def bad(flag, value, choices):
        parser.error(f"{flag} {value!r} is not valid; choose one of: {', '.join(choices)}")

    if args.model_type is not None and args.model_type not in MODEL_TYPES:
        bad("--model-type", args.model_type, MODEL_TYPES)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        bad("--device", args.device, ("cpu", "cuda"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if args.dtype not in ("float32", "bfloat16"):
        bad("--dtype", args.dtype, ("float32", "bfloat16"))
    if args.compile not in COMPILE_MODES:
        bad("--compile", args.compile, COMPILE_MODES)
    from segment_anything_fast import attention

    # Built-in backends need no import of the optional ones (flex/triton: seconds of startup).
    if args.attention not in attention.available_backends():
        backends = attention_backends()
        if args.attention not in backends:
            bad("--attention", args.attention, backends)
    if args.upscaling not in ("conv", "triton"):
        bad("--upscaling", args.upscaling, ("conv", "triton"))
    if args.upscaling == "triton" and args.device != "cuda":
        parser.error("--upscaling triton needs --device cuda; use --upscaling conv on the CPU.")
    if args.decoder_attention not in ("sdpa", "triton"):
        bad("--decoder-attention", args.decoder_attention, ("sdpa", "triton"))
    if args.decoder_attention == "triton" and args.device != "cuda":
        parser.error("--decoder-attention triton needs --device cuda; use --decoder-attention sdpa on the CPU.")
    if args.postprocess not in POSTPROCESS_BACKENDS:
        bad("--postprocess", args.postprocess, POSTPROCESS_BACKENDS)
    if args.postprocess == "triton" and args.device != "cuda":
        parser.error("--postprocess triton needs --device cuda; use --postprocess torch on the CPU.")
    if args.prompt_batching not in PROMPT_BATCHING:
        bad("--prompt-batching", args.prompt_batching, PROMPT_BATCHING)
    if args.preprocess not in PREPROCESS_BACKENDS:
        bad("--preprocess", args.preprocess, PREPROCESS_BACKENDS)
    if args.preprocess == "triton" and (args.device == "cpu" or args.prompt_batching != "nested"):
        parser.error("--preprocess triton needs --device cuda and --prompt-batching nested (the "
                     "kernel fills a packed batch); use --preprocess host otherwise.")
    if args.compress not in compress_modes():
        bad("--compress", args.compress, compress_modes())
    if args.mlp_epilogue not in ("on", "off"):
        bad("--mlp-epilogue", args.mlp_epilogue, ("on", "off"))
    if args.mlp_epilogue == "on" and args.compress != "none":
        parser.error(f"--mlp-epilogue on needs plain lin1 weights but --compress {args.compress} "
                     "compresses every encoder linear; pass --mlp-epilogue off.")
    for flag in ("limit", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for flag in ("num_workers", "encoder_iters", "profile"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.warmup_batches is not None and args.warmup_batches < 0:
        parser.error(f"--warmup-batches must be >= 0, got {args.warmup_batches}")
    try:
        args.checkpoint = check_checkpoint_arg(args.checkpoint, args.model_type)
    except ValueError as e:
        parser.error(str(e))
    if not args.dist_timeout > 0:
        parser.error(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")


def model_config(args):
    """The model type name or SamConfig to build."""
    from segment_anything_fast.build_sam import SamConfig

    if args.config_json is not None:
        text = args.config_json
        if os.path.isfile(text):
            with open(text) as f:
                text = f.read()
        try:
            fields = json.loads(text)
            return SamConfig(**fields)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--config-json is not a valid SamConfig JSON object: {e}") from e
    return args.model_type or ("auto" if args.checkpoint else "vit_b")


def build_model(args, verbose: bool = True):
    """Build, move, cast, compress and compile the model as the flags say."""
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.compile import (cast_model, compile_image_encoder, compile_mask_decoder,
                                               set_postprocess)

    if args.checkpoint is None and verbose:
        print("NOTE: no --checkpoint given: the model has RANDOM weights; the mIoU below is "
              f"meaningless (throughput and memory are still valid). Seed {args.seed}.",
              file=sys.stderr)
    torch.manual_seed(args.seed)
    sam = build_sam(model_config(args), args.checkpoint, attention=args.attention)
    sam = cast_model(sam.to(args.device), getattr(torch, args.dtype)).eval()
    sam.mask_decoder.set_upscaling(args.upscaling)
    sam.mask_decoder.transformer.set_attention(args.decoder_attention)
    if args.compress != "none":
        from segment_anything_fast.quantize import compress

        compress(sam, args.compress)
    if args.mlp_epilogue == "on":
        from segment_anything_fast.mlp_epilogue import set_mlp_epilogue

        set_mlp_epilogue(sam.image_encoder, True)
    if args.compile != "none":
        # Static shapes: the encoder batch is padded to --batch-size, decoder prompt counts to
        # buckets; with max-autotune CUDA graphs only for the encoder, as build_sam_fast does.
        sam.image_encoder = compile_image_encoder(
            sam.image_encoder, mode=args.compile,
            batch_size=1 if args.prompt_batching == "none" else args.batch_size)
        dec_mode = "max-autotune-no-cudagraphs" if args.compile == "max-autotune" else args.compile
        sam.mask_decoder = compile_mask_decoder(sam.mask_decoder, mode=dec_mode)
        # nested mode: the total prompt count of a batch is padded to a bucket (static shapes,
        # one graph per bucket, all compiled before the timing by warm_up_decoders).
        packed = compile_function(decode_best, dec_mode, dynamic=False)
        sam._packed_decoder = _graph_steps(packed) if dec_mode == "reduce-overhead" else packed
        # nested mode: the padded uint8 batch normalised in one kernel (one static shape)
        sam._normalize_batch = compile_function(normalize_batch, "default", dynamic=False)
    # the best masks' upscale + threshold: one kernel per image size when compiled (dynamic shapes)
    set_postprocess(sam, args.postprocess, "default" if args.compile != "none" else None)
    return sam


def _graph_steps(fn):
    """``fn`` compiled with CUDA graphs: each call starts a new graph step and copies its outputs
    out of the graph's memory pool (the next replay overwrites it)."""
    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in fn(*args))
    return run


def _bucket(n: int) -> int:
    """Padded prompt count of one image (padded mode): the next power of two, at least 8."""
    return max(8, 1 << max(n - 1, 0).bit_length())


def _packed_bucket(n: int) -> int:
    """Padded total prompt count of a batch (nested mode): a decoder bucket, beyond the
    largest one a multiple of it."""
    for b in DEFAULT_DECODER_BUCKETS:
        if n <= b:
            return b
    top = DEFAULT_DECODER_BUCKETS[-1]
    return -(-n // top) * top


@torch.inference_mode()
def warm_up_decoders(sam, mode: str, counts: List[List[int]], batch_size: int, device, dtype) -> int:
    """Run the (compiled) decoder once at every padded prompt count that the batches of
    ``counts`` (prompts per image, per batch) will use, so that no compilation falls inside
    the timing. Returns how many shapes were run."""
    if mode == "nested":
        sizes = sorted({_packed_bucket(sum(c)) for c in counts if sum(c)})
    elif mode == "padded":
        sizes = sorted({_bucket(k) for c in counts for k in c if k})
    else:
        sizes = sorted({k for c in counts for k in c if k})
    h, w = sam.prompt_encoder.image_embedding_size
    emb = decoder_layout(torch.zeros(batch_size if mode == "nested" else 1, sam.prompt_encoder.embed_dim,
                                     h, w, device=device, dtype=dtype))
    pe = sam.prompt_encoder.get_dense_pe()
    packed = getattr(sam, "_packed_decoder", decode_best)
    for n in sizes:
        if mode == "nested":
            rows = torch.zeros(n, 4, device=device)
            rows[:, 2] = 1  # positive points of image 0
            packed(sam, emb, rows)
        else:
            labels = torch.ones(n, dtype=torch.int, device=device)
            sparse, dense = _prompt(sam, torch.zeros(n, 2, device=device), labels)
            sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=True)
    return len(sizes)


@torch.inference_mode()
def warm_up_postprocess(sam, image_sizes, device, dtype) -> int:
    """Run ``sam.masks_from_logits`` at every distinct (H, W) image size in ``image_sizes`` (the
    dataset's) with 1, 2 and 3 masks, on inference tensors as :func:`predict_batch` does, so
    that the compiled post-processing's recompiles (automatic dynamic shapes, the 1-mask
    specialisation) fall before the timing. Returns how many calls ran."""
    h, w = sam.prompt_encoder.image_embedding_size
    long_side = sam.image_encoder.img_size
    calls = 0
    for size in sorted(set(image_sizes)):
        input_size = ResizeLongestSide.get_preprocess_shape(*size, long_side)
        for k in (1, 2, 3):
            low = torch.zeros(k, 1, 4 * h, 4 * w, device=device, dtype=dtype)
            sam.masks_from_logits(low, input_size, size)
            calls += 1
    return calls


def decode_packed(sam, embeddings, image_index, sparse, dense):
    """Mask decoder over prompts of several images in one call.

    ``embeddings`` (B, C, h, w); ``image_index`` (P,) selects each prompt's image
    (``MaskDecoder.predict_masks_per_prompt``: the first layer's image side is projected once
    per image). Returns all mask tokens' (P, T, 4h, 4w) masks and (P, T) IoU predictions.
    """
    dec = sam.mask_decoder
    dec = getattr(dec, "inner", dec)  # the eager module behind a compiled BucketedMaskDecoder
    return dec.predict_masks_per_prompt(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                        image_index=image_index)


def decode_best(sam, embeddings, prompts):
    """Prompt encoder, packed decoder and best-mask choice of a nested batch (one compiled
    region). ``prompts`` (P, 4) float32 rows of :func:`pack_nested`: x, y, label (1 a point,
    -1 padding), image index. Returns the (P, 1, 4h, 4w) logits of each prompt's
    highest-predicted-IoU multimask output."""
    labels = prompts[:, 2].to(torch.int)
    sparse, dense = _prompt(sam, prompts[:, :2], labels)
    low, iou = decode_packed(sam, embeddings, prompts[:, 3].to(torch.long), sparse, dense)
    return (_best_logits(low[:, 1:], iou[:, 1:]),)


def normalize_batch(sam, images, sizes, dtype: torch.dtype):
    """``sam.preprocess`` of a zero-padded (B, 3, S, S) uint8 batch whose image b fills
    ``sizes[b]`` = (h, w) (int64, (B, 2)): normalised inside, zero outside; in ``dtype``."""
    x = (images.float() - sam.pixel_mean) / sam.pixel_std
    r = torch.arange(images.shape[-1], device=images.device)
    inside = (r[None, :, None] < sizes[:, 0, None, None]) & (r[None, None, :] < sizes[:, 1, None, None])
    return torch.where(inside[:, None], x, 0.0).to(dtype)


def pack_nested(items: List[dict], image_size: int, static_batch: Optional[int] = None,
                preprocess: str = "host") -> dict:
    """The host side of a nested batch, in a few page-locked-ready arrays (the DataLoader
    workers build it, see :class:`NestedCollate`): the images padded to ``static_batch``, their
    resized ``sizes`` (B, 2), ``prompts`` (P, 4) rows x, y, label, image index padded to a
    decoder bucket (label -1: not a point, image 0), and the packed post-processing layout
    (``mask_table``, ``mask_scales``, ``offsets``, ``total``, ``max_pixels``, ``counts``:
    fused_postprocess.packed_layout). The images: preprocess "host", ``images`` (B, 3, S, S)
    uint8 zero-padded (items resized by the dataset); "triton", the items' images as decoded,
    packed by ``fused_preprocess.pack_images`` (``pixels``, ``geometry``, ``x_coef``, ``y_coef``)."""
    from segment_anything_fast.fused_postprocess import packed_layout
    from segment_anything_fast.fused_preprocess import pack_images

    b = max(len(items), static_batch or 0)
    if preprocess == "triton":
        out = pack_images([it["image"].permute(1, 2, 0).numpy() for it in items], image_size, b)
    elif preprocess == "host":
        images = torch.zeros((b, 3, image_size, image_size), dtype=torch.uint8)
        sizes = torch.zeros((b, 2), dtype=torch.int64)
        for j, it in enumerate(items):
            h, w = it["image"].shape[-2:]
            if (h, w) != tuple(it["input_size"]):
                raise ValueError(f"pack_nested: item {j} holds a {w}x{h} image, not resized to its input "
                                 f"size {it['input_size']} (dataset resize=False): pack with preprocess='triton'.")
            images[j, :, :h, :w] = it["image"]
            sizes[j, 0], sizes[j, 1] = h, w
        out = {"images": images, "sizes": sizes}
    else:
        raise ValueError(f"pack_nested: preprocess must be one of {PREPROCESS_BACKENDS}, got {preprocess!r}.")
    counts = [int(it["points"].shape[0]) for it in items]
    total = sum(counts)
    prompts = torch.zeros((_packed_bucket(total) if total else 0, 4), dtype=torch.float32)
    if total:
        prompts[:total, :2] = torch.cat([it["points"] for it in items])
        prompts[:total, 2] = 1
        prompts[total:, 2] = -1
        prompts[:total, 3] = torch.from_numpy(np.repeat(np.arange(len(items)), counts))
    table, scales, offsets, n_px, max_px = packed_layout(
        out["sizes"][:len(items)].tolist(), [it["original_size"] for it in items], counts, image_size)
    out.update({"prompts": prompts, "mask_table": torch.from_numpy(table),
                "mask_scales": torch.from_numpy(scales), "offsets": offsets, "total": n_px,
                "max_pixels": max_px, "counts": counts})
    return out


def _plain_collate(items):
    """DataLoader ``collate_fn`` of the other modes: the batch as a list, nothing packed."""
    return items, None


class NestedCollate:
    """DataLoader ``collate_fn`` of nested mode: ``(items, pack_nested(good items))``, so the
    padding and packing run in the workers and the batch reaches the GPU in a few copies. The
    ground-truth masks travel bit-packed in the same order as the predicted masks (``gt_bits``,
    ``gt_pixels``: coco_prompts.pack_masks) and the items keep only their metadata: every
    tensor sent from a worker costs the main process a shared-memory mapping."""

    def __init__(self, image_size: int, static_batch: Optional[int], preprocess: str = "host"):
        self.image_size, self.static_batch, self.preprocess = image_size, static_batch, preprocess

    def __call__(self, items):
        good = [it for it in items if it["error"] is None]
        packed = pack_nested(good, self.image_size, self.static_batch, self.preprocess)
        packed["gt_bits"], packed["gt_pixels"] = pack_masks([it["gt_masks"] for it in good])
        slim = [{k: v for k, v in it.items() if k not in _PACKED_KEYS} for it in items]
        return slim, packed


_PACKED_KEYS = ("image", "points", "gt_masks")  # what NestedCollate moves into the packed batch


def decoder_layout(emb: torch.Tensor) -> torch.Tensor:
    """Image embeddings (B, C, h, w) in the one layout the decoders are compiled for
    (warm_up_decoders; a stride change would recompile them): channels last, so that the
    transformer's (B, h*w, C) image tokens, gathered per prompt, are contiguous rows. The
    compiled encoder's conv neck may return it so already (then no copy)."""
    return emb.contiguous(memory_format=torch.channels_last)


def _encode(sam, images: List[torch.Tensor], device, dtype) -> torch.Tensor:
    x = torch.stack([sam.preprocess(to_device(im, device).float()) for im in images])
    return decoder_layout(sam.image_encoder(x.to(dtype)))


def _prompt(sam, points: torch.Tensor, labels: torch.Tensor):
    return sam.prompt_encoder(points=(points[:, None, :], labels[:, None]), boxes=None, masks=None)


def _best_logits(low_res, iou) -> torch.Tensor:
    """(K, 1, h, w): the highest-predicted-IoU of each prompt's multimask outputs."""
    best = iou.argmax(dim=1)
    return low_res[torch.arange(low_res.shape[0], device=low_res.device), best][:, None]


def _best_masks(sam, low_res, iou, input_size, original_size) -> torch.Tensor:
    """Pick the highest-IoU of the multimask outputs and upscale to a (K, H, W) bool mask."""
    return sam.masks_from_logits(_best_logits(low_res, iou), input_size, original_size)[:, 0]


@torch.inference_mode()
def predict_batch(sam, items: List[dict], mode: str, device, dtype,
                  static_batch: Optional[int] = None, packed: Optional[dict] = None) -> List[torch.Tensor]:
    """(K_i, H_i, W_i) bool predicted masks for each item, one point prompt per annotation.

    nested: the batch's prompts are padded to a decoder bucket (label -1, not a point) and the
    images to ``static_batch``, so the compiled parts see a few static shapes; ``packed`` is
    :func:`pack_nested` of ``items`` when the DataLoader workers built it."""
    if not items:
        return []
    if mode == "nested":
        return _predict_nested(sam, items, device, dtype, packed or pack_nested(
            items, sam.image_encoder.img_size, static_batch))
    out: List[Optional[torch.Tensor]] = [None] * len(items)
    sizes = [tuple(it["image"].shape[-2:]) for it in items]
    if mode == "none":
        groups = [[i] for i in range(len(items))]
    else:
        groups = [list(range(len(items)))]
    for group in groups:
        emb = _encode(sam, [items[i]["image"] for i in group], device, dtype)
        pe = sam.prompt_encoder.get_dense_pe()
        for j, i in enumerate(group):
            pts = to_device(items[i]["points"], device)
            k = pts.shape[0]
            if k == 0:
                out[i] = torch.zeros((0, *items[i]["original_size"]), dtype=torch.bool, device=device)
                continue
            labels = torch.ones(k, dtype=torch.int, device=device)
            if mode == "padded":
                pad = _bucket(k) - k
                pts = torch.cat([pts, pts.new_zeros(pad, 2)])
                labels = torch.cat([labels, labels.new_full((pad,), -1)])  # -1: not a point
            sparse, dense = _prompt(sam, pts, labels)
            low, iou = sam.mask_decoder(
                image_embeddings=emb[j:j + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=True)
            out[i] = _best_masks(sam, low[:k], iou[:k], sizes[i], items[i]["original_size"])
    return out


def encoder_input(sam, packed: dict, device, dtype) -> torch.Tensor:
    """The (B, 3, S, S) encoder input of a :func:`pack_nested` batch, in ``dtype`` on ``device``:
    its padded uint8 images normalised (compiled ``normalize_batch`` when the model is), or its
    decoded images resized, normalised and padded by ``fused_preprocess.preprocess_packed``."""
    if "pixels" in packed:
        from segment_anything_fast.fused_preprocess import preprocess_packed

        return preprocess_packed(sam, *(to_device(packed[k], device) for k in
                                        ("pixels", "geometry", "x_coef", "y_coef")), dtype)
    images, sizes = to_device(packed["images"], device), to_device(packed["sizes"], device)
    return getattr(sam, "_normalize_batch", normalize_batch)(sam, images, sizes, dtype)


def _predict_nested(sam, items: List[dict], device, dtype, packed: dict) -> List[torch.Tensor]:
    """Nested mode on a :func:`pack_nested` batch: a few host-to-device copies, the
    normalisation kernel, the encoder and the prompt/decoder/best-mask region (CUDA graphs
    when compiled with reduce-overhead), then one post-processing launch for every mask of
    the batch with ``--postprocess triton`` (per image otherwise)."""
    from segment_anything_fast.fused_postprocess import masks_from_logits as fused, packed_masks_from_logits

    counts = packed["counts"]
    if not sum(counts):  # nothing to segment: no encoder run either
        return [torch.zeros((0, *it["original_size"]), dtype=torch.bool, device=device) for it in items]
    prompts = to_device(packed["prompts"], device)
    x = encoder_input(sam, packed, device, dtype)
    emb = decoder_layout(sam.image_encoder(x))
    (best,) = getattr(sam, "_packed_decoder", decode_best)(sam, emb, prompts)
    best = best[:sum(counts)]  # the real prompts
    if sam._masks_fn is fused:
        flat = packed_masks_from_logits(sam, best, to_device(packed["mask_table"], device),
                                        to_device(packed["mask_scales"], device),
                                        packed["total"], packed["max_pixels"])
        return [flat[o:o + k * h * w].view(k, h, w) for o, k, (h, w) in
                zip(packed["offsets"], counts, (it["original_size"] for it in items))]
    hw = packed["sizes"].tolist()
    return [sam.masks_from_logits(part, tuple(hw[j]), it["original_size"])[:, 0]
            for j, (it, part) in enumerate(zip(items, best.split(counts)))]


def _ground_truth(items: List[dict], packed: Optional[dict], device) -> List[torch.Tensor]:
    """Each item's (K, H, W) bool ground truth on ``device``: one copy of the batch's packed bits
    (NestedCollate), else one copy per item."""
    if packed is None or "gt_bits" not in packed:
        return [to_device(it["gt_masks"], device) for it in items]
    return unpack_mask_groups(to_device(packed["gt_bits"], device), packed["gt_pixels"],
                              [(k, *it["original_size"]) for k, it in zip(packed["counts"], items)])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_encoder(sam, batch_size: int, device, dtype, iters: int) -> float:
    """Images/s of ``sam.image_encoder`` alone on random (batch_size, 3, S, S) inputs of the
    model dtype: 2 untimed calls, then ``iters`` timed ones (synchronised, wall clock)."""
    size = sam.image_encoder.img_size
    x = torch.randn(batch_size, 3, size, size, device=device).to(dtype)
    for _ in range(2):
        sam.image_encoder(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        sam.image_encoder(x)
    _sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def git_commit(given: str = "") -> str:
    """``given`` (``--commit``, for a copy of the code without .git), else ``git describe``."""
    if given:
        return given
    try:
        r = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=12"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_csv(path: str, row: Dict[str, object]) -> None:
    """Append ``row``; a new file gets a header, an existing one must have the same columns."""
    exists = os.path.isfile(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_FIELDS:
            raise ValueError(
                f"{path!r} has different columns ({header[:4]}...); write to a new --output file.")
    else:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if not exists:
            w.writeheader()
        w.writerow(row)


def kernel_difference(whole: Dict[str, float], part: Dict[str, float], label: str, top: int = 25) -> str:
    """The GPU time per call that ``whole`` (kernel name -> ms) spends beyond ``part``, in total
    and by kernel (largest first): e.g. predict_batch minus the encoder alone."""
    diff = {k: v - part.get(k, 0.0) for k, v in whole.items()}
    diff = {k: v for k, v in diff.items() if v > 5e-4}
    lines = [f"--- {label}: {sum(diff.values()):.2f} ms GPU per call in {len(diff)} kernel names"]
    lines += [f"{v:8.3f} ms {k[:110]}" for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def write_profile(args, sam, items: List[dict], device, dtype, packed: Optional[dict] = None) -> str:
    """``--profile N``: N calls of predict_batch and of the image encoder alone on the same
    images (as predict_batch groups them) under bench_encoder.profile; the difference (on CUDA a
    section of its own, :func:`kernel_difference`) is the prompt encoder, decoder and mask
    post-processing. Written atomically to
    ``<output stem>_profile.txt``; returns the path."""
    groups = [[it] for it in items] if args.prompt_batching == "none" else [items]
    if packed is None:
        encoder_run = ("image encoder alone (_encode)",
                       lambda: [_encode(sam, [it["image"] for it in g], device, dtype) for g in groups])
    else:  # nested: the items hold no images, the packed batch does
        encoder_run = (f"image encoder alone (encoder_input, {args.preprocess} pre-processing + encoder)",
                       lambda: sam.image_encoder(encoder_input(sam, packed, device, dtype)))
    runs = [(f"predict_batch ({args.prompt_batching})",
             lambda: predict_batch(sam, items, args.prompt_batching, device, dtype, args.batch_size,
                                   packed)), encoder_run]
    model = "custom" if args.config_json else model_config(args)
    n_prompts = sum(packed["counts"]) if packed is not None else sum(len(it["points"]) for it in items)
    head = (f"eval_combo --profile {args.profile}: {model} {device} {args.dtype} "
            f"compile {args.compile}, {len(items)} images, {n_prompts} prompts")
    texts, kernels = [], [{}, {}]
    for (label, fn), k in zip(runs, kernels):
        with torch.inference_mode():  # as in the timed loop: the same compiled graphs
            fn()  # warm-up call, outside the profile
            texts.append(bench_encoder.profile(fn, label, calls=args.profile, top=25, cpu=True, kernels=k))
    if kernels[0]:
        texts.append(kernel_difference(*kernels, "decoder side (predict_batch minus the encoder alone)"))
    path = os.path.splitext(args.output)[0] + "_profile.txt"
    with open(path + ".tmp", "w") as f:
        f.write("\n\n".join([head] + texts) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _evaluate_shard(args, ctx: DistContext, sam, dataset, device, dtype, n_total: int) -> dict:
    """Run this rank's images (``n_total``: over all ranks); returns its IoUs (by image id), counts and timings.

    Under torchrun every rank meets the others once per batch (``ctx.check``): an exception on
    one rank stops all of them, naming the rank and the batch's images.
    """
    # nested: the workers also pad and pack the batch (NestedCollate); else a plain list
    collate = (NestedCollate(sam.image_encoder.img_size, args.batch_size, args.preprocess)
               if args.prompt_batching == "nested" else _plain_collate)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers,
        # pin_memory=False: the loader's pin thread page-locks every batch in a new block
        # (cudaHostAlloc, which stalls the CUDA calls of the main thread: on the H200 a batch of
        # 8 took 40 ms instead of its 25 ms of GPU work, worse at batch 32); to_device pins in the
        # caching host allocator, whose blocks are reused by the next batches of the same size
        collate_fn=collate, pin_memory=False,
        persistent_workers=False, prefetch_factor=4 if args.num_workers > 0 else None)
    warmup = args.warmup_batches if args.warmup_batches is not None else (
        3 if args.compile != "none" else 1)
    ids = dataset.image_ids
    if args.compile != "none":
        counts = [[len(dataset.anns.get(i, [])) for i in ids[k:k + args.batch_size]]
                  for k in range(0, len(ids), args.batch_size)]
        n = warm_up_decoders(sam, args.prompt_batching, counts, args.batch_size, device, dtype)
        if ctx.is_main:
            print(f"compiled the decoder at {n} padded prompt count(s) before timing", file=sys.stderr)
    if args.compile != "none" or args.postprocess == "triton":
        # compiled, the torch post-processing recompiles for new sizes; the Triton kernel is
        # JIT-specialised on them (divisibility of the sizes) either way
        info = dataset.coco.loadImgs(ids)
        sizes = {(im["height"], im["width"]) for im in info if "height" in im and "width" in im}
        warm_up_postprocess(sam, sizes, device, dtype)
        if ctx.is_main:
            print(f"ran the post-processing at {len(sizes)} image size(s) before timing", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ious: List[Tuple[int, torch.Tensor]] = []
    skipped: List[str] = []
    n_images = n_timed = 0
    model_time = 0.0
    loader_wait = 0.0  # seconds the timed loop waited for the DataLoader
    events = []  # (start, end) CUDA events of the timed batches' model part
    t_timed_start = None
    new_points: Dict[int, tuple] = {}
    n_batches = math.ceil(len(dataset) / args.batch_size)
    # Shard 0 is the largest: every rank takes part in that many sync points.
    n_steps = math.ceil(shard_size(n_total, 0, ctx.world_size) / args.batch_size)
    batches = iter(loader)
    error = None
    last_items: List[dict] = []  # the last full batch that ran (else the last one), for --profile
    last_packed = None
    for b in range(n_steps):
        if b < n_batches and error is None:
            # The sequential loader's batch b: named up front, so a failure while loading it
            # still says which images.
            ids = dataset.image_ids[b * args.batch_size:(b + 1) * args.batch_size]
            names = [dataset.coco.loadImgs(i)[0]["file_name"] for i in ids]
            try:
                t_fetch = time.perf_counter()
                batch, packed = next(batches)
                if b > warmup:
                    loader_wait += time.perf_counter() - t_fetch
                if b == warmup:
                    _sync(device)
                    t_timed_start = time.perf_counter()
                for it in batch:
                    new_points.update(it["new_points"])
                    if it["error"] is not None:
                        skipped.append(f"{it['file_name']} ({it['error']})")
                items = [it for it in batch if it["error"] is None]
                # On CUDA, events time the model part without stopping the host: it goes on to
                # load and queue the next batch while the GPU works.
                cuda = device.type == "cuda"
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
                if cuda:
                    ev[0].record()
                t0 = time.perf_counter()
                preds = predict_batch(sam, items, args.prompt_batching, device, dtype,
                                      args.batch_size, packed)
                if cuda:
                    ev[1].record()
                if items and (len(items) == args.batch_size or len(last_items) < args.batch_size):
                    last_items, last_packed = items, packed
                if b >= warmup:
                    if cuda:
                        events.append(ev)
                    else:
                        model_time += time.perf_counter() - t0
                    n_timed += len(items)
                gts = _ground_truth(items, packed, device)
                for it, pred, gt in zip(items, preds, gts):
                    if pred.shape[0]:  # stays on the device: no sync per image
                        ious.append((it["image_id"], mask_iou(pred, gt)))
                n_images += len(items)
            except Exception as e:
                if not ctx.is_distributed:
                    raise
                error = f"failed on image(s) {', '.join(names)}: {type(e).__name__}: {e}"
            if ctx.is_main:
                print(f"\rbatch {b + 1}/{n_batches}", end="", file=sys.stderr, flush=True)
        if ctx.is_distributed:
            ctx.check(error, f"batch {b + 1} of {n_steps}")
    _sync(device)
    t_end = time.perf_counter()
    model_time += sum(a.elapsed_time(b) for a, b in events) / 1e3
    if ctx.is_main:
        print("", file=sys.stderr)
    encoder_ips = None
    if args.encoder_iters and error is None:
        encoder_ips = time_encoder(sam, args.batch_size, device, dtype, args.encoder_iters)
    if args.profile and ctx.is_main and error is None and last_items:  # after every timing
        path = write_profile(args, sam, last_items, device, dtype, last_packed)
        print(f"wrote the profile to {path}",
              file=sys.stderr)
    return {
        "encoder_ips": encoder_ips,
        "rank": ctx.rank,
        "ious": [(i, t.double().cpu().numpy()) for i, t in ious],
        "skipped": skipped, "n_images": n_images, "n_timed": n_timed, "warmup": warmup,
        "n_batches": n_batches, "model_time": model_time, "loader_wait": loader_wait,
        "timed_wall": (t_end - t_timed_start) if t_timed_start is not None else 0.0,
        "new_points": new_points,
        "peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                     if device.type == "cuda" else None),
    }


def run(args, ctx: Optional[DistContext] = None) -> Optional[Dict[str, object]]:
    """Evaluate; returns the CSV row (also appended to ``args.output``).

    With a distributed ``ctx`` each rank evaluates ``shard(image_ids, rank, world_size)``; rank 0
    gathers everything and returns the row, the other ranks return None.
    """
    ctx = ctx or DistContext()
    annotations = args.annotations or os.path.join(
        args.coco_root, "annotations", f"instances_{args.split}.json")
    image_dir = os.path.join(args.coco_root, args.split)
    coco = load_coco(annotations)
    image_ids = sorted(coco.getImgIds())
    if not image_ids:
        raise ValueError(f"{annotations!r} lists no images: nothing to evaluate.")
    if args.limit is not None:
        image_ids = image_ids[: args.limit]
    anns = select_annotations(coco, image_ids)
    if sum(len(a) for a in anns.values()) == 0:
        raise ValueError(f"The {len(image_ids)} selected images of {annotations!r} have no "
                         "(non-crowd) annotations: nothing to evaluate.")
    missing = [coco.loadImgs(i)[0]["file_name"] for i in image_ids
               if not os.path.isfile(os.path.join(image_dir, coco.loadImgs(i)[0]["file_name"]))]
    if missing:
        if ctx.is_main:
            print(f"WARNING: {len(missing)} of {len(image_ids)} image files are missing under "
                  f"{image_dir!r} and will be skipped (first: {missing[:3]}).", file=sys.stderr)
        if len(missing) == len(image_ids):
            raise FileNotFoundError(
                f"None of the {len(image_ids)} images listed in {annotations!r} exist under "
                f"{image_dir!r}; check --coco-root / --split.")
    my_ids = shard(image_ids, ctx.rank, ctx.world_size)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    setup_error = None
    try:
        sam = build_model(args, verbose=ctx.is_main)
    except Exception as e:
        if not ctx.is_distributed:
            raise
        setup_error = f"building the model: {type(e).__name__}: {e}"
    if ctx.is_distributed:
        ctx.check(setup_error, "model setup")
    image_size = sam.image_encoder.img_size if hasattr(sam.image_encoder, "img_size") else (
        sam.prompt_encoder.input_image_size[0])
    cache_dir = None if args.cache_dir == "none" else os.path.expanduser(args.cache_dir)
    cache = CenterPointCache(cache_dir, annotations)
    dataset = CocoPointPromptDataset(coco, image_dir, my_ids, anns, image_size, cache.points,
                                     resize=args.preprocess == "host")
    part = _evaluate_shard(args, ctx, sam, dataset, device, dtype, len(image_ids))
    parts = ctx.gather_object(part)
    if not ctx.is_main:
        return None

    new_points = {k: v for p in parts for k, v in p["new_points"].items()}
    if new_points:
        cache.update(new_points)
        cache.save()
    skipped = [(p["rank"], s) for p in parts for s in p["skipped"]]
    if skipped:
        tag = (lambda r: f"[rank {r}] ") if ctx.is_distributed else (lambda r: "")
        print(f"WARNING: skipped {len(skipped)} image(s): "
              + "; ".join(tag(r) + s for r, s in skipped[:10]), file=sys.stderr)
    # Per-image IoUs in image-id order: the same tensor, hence the same mean, as one process.
    per_image = sorted((x for p in parts for x in p["ious"]), key=lambda x: x[0])
    if not per_image:
        raise RuntimeError("No image could be evaluated (all were skipped); see the warnings above.")
    all_ious = torch.cat([torch.from_numpy(v) for _, v in per_image])
    n_images = sum(p["n_images"] for p in parts)
    n_timed = sum(p["n_timed"] for p in parts)
    warmup = parts[0]["warmup"]
    model_time = max(p["model_time"] for p in parts)
    wall = max(p["timed_wall"] for p in parts)
    if n_timed == 0:
        print(f"WARNING: all {parts[0]['n_batches']} batches were warm-up batches "
              f"(--warmup-batches {warmup}); no throughput measured. Use more images or fewer "
              "warm-up batches.", file=sys.stderr)
    per_rank = ";".join(
        f"{p['n_timed'] / p['timed_wall']:.4f}" if p["n_timed"] and p["timed_wall"] > 0 else "-"
        for p in parts)
    peaks = [p["peak_mib"] for p in parts if p["peak_mib"] is not None]
    # Ranks run side by side on their own GPUs: their encoder rates add up.
    enc = [p["encoder_ips"] for p in parts if p["encoder_ips"]]
    encoder_ips = sum(enc) if len(enc) == len(parts) else None
    e2e = n_timed / wall if n_timed and wall > 0 else None
    waits = [p["loader_wait"] / p["timed_wall"] for p in parts if p["timed_wall"] > 0]
    row = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_type": "custom" if args.config_json else model_config(args),
        "checkpoint": args.checkpoint or f"random-init(seed={args.seed})",
        "device": str(device), "dtype": args.dtype, "compile": args.compile,
        "attention": args.attention, "upscaling": args.upscaling,
        "decoder_attention": args.decoder_attention, "postprocess": args.postprocess,
        "preprocess": args.preprocess,
        "prompt_batching": args.prompt_batching,
        "compress": args.compress, "mlp_epilogue": args.mlp_epilogue, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "limit": args.limit if args.limit is not None else "",
        "n_images": n_images, "n_annotations": int(all_ious.numel()),
        "n_skipped_images": len(skipped), "warmup_batches": warmup, "timed_images": n_timed,
        "miou": round(float(all_ious.mean()), 6),
        # Aggregate over ranks: all timed images / the slowest rank's time.
        "img_per_s_model": round(n_timed / model_time, 4) if n_timed else "",
        "img_per_s_end_to_end": round(e2e, 4) if e2e else "",
        "img_per_s_encoder_only": round(encoder_ips, 4) if encoder_ips else "",
        "end_to_end_vs_encoder": round(e2e / encoder_ips, 4) if e2e and encoder_ips else "",
        # the largest share of a rank's timed wall time spent waiting for its data workers
        "loader_wait_fraction": round(max(waits), 4) if waits and n_timed else "",
        "peak_gpu_memory_mib": round(max(peaks), 1) if peaks else "",
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "git_commit": git_commit(args.commit),
        "annotations": os.path.abspath(annotations),
        "world_size": ctx.world_size, "per_rank_img_per_s": per_rank,
    }
    append_csv(args.output, row)
    return row


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    try:
        check_output_path(args.output, "--output", directory=False)
    except ValueError as e:  # before the evaluation, not after it
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        ctx = init_distributed("cuda" if args.device.startswith("cuda") else "cpu",
                               args.dist_timeout)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ctx:
        try:
            args.device = str(ctx.resolve_device(args.device))
            row = run(args, ctx)
        except RankFailedError as e:
            print_failure(ctx, e)
            return finish(ctx, 2)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            tag = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.is_distributed else ""
            print(f"error{tag}: {e}", file=sys.stderr)
            return 2  # no barrier: the error may be a broken process group
        if row is None:
            return finish(ctx, 0)
        _report(args, ctx, row)
        return finish(ctx, 0)


def _report(args, ctx: DistContext, row: Dict[str, object]) -> None:
    ranks = f" on {ctx.world_size} ranks" if ctx.world_size > 1 else ""
    print(f"mIoU {row['miou']:.4f} over {row['n_annotations']} annotations in {row['n_images']} "
          f"images ({row['n_skipped_images']} skipped){ranks}")
    if row["timed_images"]:
        print(f"throughput: {row['img_per_s_model']} img/s model, {row['img_per_s_end_to_end']} "
              f"img/s end to end ({row['timed_images']} images after {row['warmup_batches']} "
              "warm-up batch(es))")
        if ctx.world_size > 1:
            print(f"per rank (end to end img/s): {row['per_rank_img_per_s']}")
        if row["loader_wait_fraction"] != "":
            print(f"the loop waited for the data workers {row['loader_wait_fraction']:.1%} of that "
                  "time (more --num-workers, or --preprocess triton, when it is large)")
    if row["img_per_s_encoder_only"] != "":
        ratio = row["end_to_end_vs_encoder"]
        print(f"image encoder alone: {row['img_per_s_encoder_only']} img/s at batch "
              f"{row['batch_size']}" + (f"; end to end = {ratio:.1%} of it" if ratio != "" else ""))
    if row["peak_gpu_memory_mib"] != "":
        print(f"peak GPU memory: {row['peak_gpu_memory_mib']} MiB on {row['gpu_name']}")
    print(f"appended a row to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
