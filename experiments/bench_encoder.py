"""Image-encoder benchmark on one GPU, in one process: original SAM (fp32, bf16), the
competitor (sam_fast_peer, bf16 + torch.compile) and ours (bf16 + fused rel-pos attention +
torch.compile with static batch), all holding the same random state_dict.

Per (implementation, batch): img/s (median of --iters timed batches after warm-up, CUDA
events), peak GPU memory, first-call seconds (compile included), fidelity vs the original fp32
(embedding cosine; IoU of low-res masks decoded by each implementation's own prompt encoder +
mask decoder for a few point prompts). Also the predictor end to end (set_image + 64 point
prompts) for the original fp32 vs ours. Writes CSV + JSON rows after every measurement.

    python experiments/bench_encoder.py --model vit_b --batches 1 8 32 --out-dir OUT

``--ours-compress fp8 --ours-compress-linears qkv proj lin1`` compresses only those encoder
linears (mlp.lin2 stays bf16); each row records ``compress`` and ``compress_linears``.
"""
import argparse
import csv
import gc
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segment_anything_fast.quantize import COMPRESS_MODES, ENCODER_LINEARS, check_linears  # noqa: E402

T0 = time.time()

# columns of the CSV (the JSON rows hold these and more)
CSV_KEYS = ["model", "impl", "mode", "batch", "status", "compress", "compress_linears", "mlp_epilogue", "img_per_s",
            "ms_per_batch", "peak_gib", "first_call_s", "cos_min", "cos_mean", "mask_iou_min",
            "mask_iou_mean", "mask_pos_frac", "sync_free", "gpu", "torch", "commit"]


def compress_columns(compress="none", linears=ENCODER_LINEARS):
    """The row's ``compress`` mode and ``compress_linears`` ("qkv+proj+lin1"; "" when nothing
    is compressed)."""
    return dict(compress=compress, compress_linears="" if compress == "none" else "+".join(linears))


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def git_commit(given):
    if given:
        return given
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def random_state_dict(model, seed=0):
    """Random values for every floating entry (rel-pos and position tables included)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            scale = 0.5 if t.dim() <= 1 else (1.0 / max(t.shape[-1], 1)) ** 0.5
            if t.dim() == 4 and "weight" in name:  # conv: fan-in is C*kh*kw
                scale = (1.0 / (t.shape[1] * t.shape[2] * t.shape[3])) ** 0.5
            r = torch.randn(t.shape, generator=g, device="cuda") * scale
            if t.dim() == 1 and name.endswith("weight"):
                r = 1.0 + 0.1 * r  # norm scales near one
            out[name] = r.to(t.dtype)
        else:
            out[name] = t.clone().cuda()
    return out


def free():
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- implementations


def build_original(name, sd, dtype):
    from segment_anything import sam_model_registry

    with torch.device("cuda"):
        sam = sam_model_registry[name]()
    sam.to("cuda")  # pixel_mean/std are made with torch.Tensor(list), which ignores the context
    sam.load_state_dict(sd)
    sam.image_encoder.to(dtype)
    sam.prompt_encoder.to(dtype)
    sam.mask_decoder.to(dtype)
    return sam.eval(), sam.image_encoder


def build_peer(name, sd, mode):
    from sam_fast_peer import sam_model_registry

    with torch.device("cuda"):
        sam = sam_model_registry[name]()
    sam.to("cuda")
    sam.load_state_dict(sd)
    sam = sam.to(torch.bfloat16).eval()
    enc = sam.image_encoder if mode is None else torch.compile(sam.image_encoder, mode=mode)
    return sam, enc


def build_ours(name, sd, attention, mode, batch, regional, compress="none",
               compress_linears=ENCODER_LINEARS, mlp_epilogue=False):
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.compile import make_fast

    with torch.device("cuda"):
        sam = build_sam(name, attention=attention)
    sam.to("cuda")
    sam.load_state_dict(sd)
    make_fast(sam, dtype=torch.bfloat16, attention=attention, compile_mode=mode,
              batch_size=batch, regional=regional, decoder_mode=None, compress=compress,
              compress_linears=compress_linears, mlp_epilogue=mlp_epilogue)
    return sam.eval(), sam.image_encoder


# ----------------------------------------------------------------------------- measurements


def time_encoder(enc, x, iters, sync_check):
    """(first-call s, median ms, peak GiB, sync_free) for enc(x)."""
    torch.cuda.synchronize()
    t = time.time()
    with torch.no_grad():
        enc(x)
    torch.cuda.synchronize()
    first = time.time() - t
    with torch.no_grad():
        for _ in range(3):
            enc(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # steady state: weights + activations (+ graph pools)
    sync_free = None
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                enc(x)
            sync_free = True
        except RuntimeError as e:
            sync_free = False
            log("sync check failed:", str(e).splitlines()[0][:200])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    times = []
    if sync_check and sync_free:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for _ in range(iters):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                enc(x)
                b.record()
                times.append((a, b))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return first, ms[len(ms) // 2], peak, sync_free


def profile(fn, label, calls=3, top=25, cpu=False, kernels=None) -> str:
    """Print (and return) the kernels taking the most GPU time over ``calls`` calls of ``fn()``,
    grouped by name; with ``cpu`` (always without CUDA) also the wall time per call and the
    busiest host ops. ``kernels`` (a dict) receives every kernel's GPU ms per call by name."""
    from torch.profiler import ProfilerActivity, profile as prof

    gpu = torch.cuda.is_available()
    cpu = cpu or not gpu
    acts = ([ProfilerActivity.CUDA] if gpu else []) + ([ProfilerActivity.CPU] if cpu else [])
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.no_grad(), prof(activities=acts) as p:
        for _ in range(calls):
            fn()
        sync()
    wall = (time.perf_counter() - t) / calls
    avg = p.key_averages()
    lines = []
    if gpu:
        evs = [e for e in avg if e.device_time_total > 0 and e.device_type != torch.autograd.DeviceType.CPU]
        total = sum(e.device_time_total for e in evs)
        if kernels is not None:
            for e in evs:
                kernels[e.key] = kernels.get(e.key, 0.0) + e.device_time_total / calls / 1e3
        lines.append(f"--- profile {label}: {total / calls / 1e3:.2f} ms GPU per call in {len(evs)} kernel names")
        for e in sorted(evs, key=lambda e: -e.device_time_total)[:top]:
            lines.append(f"{e.device_time_total / calls / 1e3:8.3f} ms {100 * e.device_time_total / total:5.1f}% "
                         f"x{e.count // calls:<5d} {e.key[:110]}")
    if cpu:
        lines.append(f"--- {label}: {wall * 1e3:.2f} ms wall per call (profiler on); host ops by self "
                     "CPU time per call")
        for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:top]:
            lines.append(f"{e.self_cpu_time_total / calls / 1e3:8.3f} ms x{e.count // calls:<5d} {e.key[:110]}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def embed(enc, imgs, batch, dtype):
    """Embeddings (float32) of imgs, run in calls of exactly ``batch`` images (repeating)."""
    outs = []
    n = imgs.shape[0]
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = imgs[i : i + batch]
            k = chunk.shape[0]
            if k < batch:
                chunk = torch.cat([chunk] + [imgs[: batch - k]])
            outs.append(enc(chunk.to(dtype)).float()[:k].clone())
    return torch.cat(outs)


def decode_masks(sam, emb, points):
    """Low-res mask logits (images, P, 3, 256, 256) from the embeddings and point prompts."""
    pe = sam.prompt_encoder
    dtype = next(sam.mask_decoder.parameters()).dtype
    coords, labels = points
    out = []
    with torch.no_grad():
        for e in emb:
            sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
            m, _ = sam.mask_decoder(
                image_embeddings=e[None].to(dtype), image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            out.append(m.float())
    return torch.stack(out)


def iou(a, b):
    """IoU of (logits > 0) or of boolean masks, per mask."""
    a = a if a.dtype == torch.bool else a > 0
    b = b if b.dtype == torch.bool else b > 0
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def point_prompts(pred, image, coords_np):
    """(coords Px1x2, labels Px1) on the GPU: one foreground point per prompt, in ``pred``'s input frame."""
    coords = pred.transform.apply_coords(coords_np, image.shape[:2])
    c = torch.as_tensor(coords, dtype=torch.float, device="cuda")[:, None, :]
    return c, torch.ones(c.shape[0], 1, dtype=torch.int, device="cuda")


def predictor_e2e(sam, predictor_cls, image, coords_np, iters=20):
    """Median seconds of set_image + predict_torch for 64 single-point prompts; masks; and the
    phases (medians of separate iterations that synchronise after set_image): ``set_host`` until
    set_image returns, ``set_sync`` until its GPU work is done, ``predict_host`` until
    predict_torch returns, ``predict_sync`` until its GPU work is done."""
    pred = predictor_cls(sam)
    c, lab = point_prompts(pred, image, coords_np)
    times, masks = [], None
    phases = {k: [] for k in ("set_host", "set_sync", "predict_host", "predict_sync")}
    for i in range(iters + 2):
        torch.cuda.synchronize()
        t = time.time()
        pred.set_image(image)
        masks, scores, _ = pred.predict_torch(c, lab, multimask_output=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.time() - t)
    for i in range(iters):
        torch.cuda.synchronize()
        t0 = time.time()
        pred.set_image(image)
        t1 = time.time()
        torch.cuda.synchronize()
        t2 = time.time()
        pred.predict_torch(c, lab, multimask_output=True)
        t3 = time.time()
        torch.cuda.synchronize()
        t4 = time.time()
        for k, dt in zip(phases, (t1 - t0, t2 - t0, t3 - t2, t4 - t2)):
            phases[k].append(dt)
    times.sort()
    return times[len(times) // 2], masks, {k: float(np.median(v)) for k, v in phases.items()}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--impls", nargs="+",
                    default=["orig_fp32", "orig_bf16", "ours", "peer"],
                    help="orig_fp32 orig_bf16 peer peer_eager ours (order = run order)")
    ap.add_argument("--peer-mode", default="max-autotune")
    ap.add_argument("--peer-batches", type=int, nargs="*", default=None,
                    help="batches for the competitor (default: --batches)")
    ap.add_argument("--ours-mode", default="max-autotune")
    ap.add_argument("--ours-attention", default="triton")
    ap.add_argument("--ours-regional", action="store_true")
    ap.add_argument("--ours-compress", nargs="+", default=["none"],
                    help="compression modes of ours (quantize.COMPRESS_MODES), each a row 'ours' "
                         "(none) or 'ours_<mode>'")
    ap.add_argument("--ours-compress-linears", nargs="+", default=list(ENCODER_LINEARS),
                    choices=ENCODER_LINEARS,
                    help="encoder linears that ours' compressed rows compress (quantize.compress "
                         "linears=), e.g. qkv proj lin1 to keep mlp.lin2 in bf16; column compress_linears")
    ap.add_argument("--ours-inductor", nargs="+", default=["default"], choices=["default", "tutorial"],
                    help="inductor settings of ours: torch's defaults and/or the torchao tutorial's "
                         "(quantize.InductorSettings.tutorial)")
    ap.add_argument("--ours-mlp-epilogue", nargs="+", default=["off"], choices=["off", "on"],
                    help="ours with each MLP's lin1 + GELU as one GEMM (mlp_epilogue) and/or without (the predictor row: the first); "
                         "column mlp_epilogue, mode suffix /mlp-epilogue. A compressed row whose lin1 is quantized "
                         "runs without it when 'off' is not also asked for")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--fid-images", type=int, default=4)
    ap.add_argument("--predictor", action="store_true", help="also time set_image + 64 points")
    ap.add_argument("--ours-postprocess", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                    help="mask post-processing(s) of ours timed in the predictor row (set_postprocess)")
    ap.add_argument("--profile", action="store_true", help="print ours' top GPU kernels (CUDA only)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip measurements that would start after this many seconds")
    ap.add_argument("--out-dir", default="experiments/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--commit", default="", help="git commit of the code (when .git is absent)")
    args = ap.parse_args(argv)
    bad = [m for m in args.ours_compress if m not in COMPRESS_MODES]
    if bad:
        ap.error(f"--ours-compress: unknown mode(s) {bad}; choose from {list(COMPRESS_MODES)}")
    try:
        linears = check_linears(args.ours_compress_linears, "--ours-compress-linears")
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(args.out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=git_commit(args.commit), model=args.model, argv=sys.argv[1:])
    log(meta)
    stem = os.path.join(args.out_dir, f"encoder_{args.model}{args.tag}")
    rows = []

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})

    # one random state dict for everyone, made on the original's key set
    from segment_anything import sam_model_registry as orig_registry

    with torch.device("meta"):
        skeleton = orig_registry[args.model]()
    with torch.device("cuda"):
        sd = random_state_dict(skeleton.to_empty(device="cuda"))
    del skeleton
    free()

    g = torch.Generator(device="cuda").manual_seed(1)
    maxb = max(args.batches)
    bench_x = torch.randn(maxb, 3, 1024, 1024, device="cuda", generator=g)
    fid_x = torch.randn(args.fid_images, 3, 1024, 1024, device="cuda", generator=g)
    pts = torch.rand(8, 1, 2, device="cuda", generator=g) * 1024
    points = (pts, torch.ones(8, 1, dtype=torch.int, device="cuda"))

    # reference: original fp32 embeddings and masks of the fidelity images
    ref_sam, ref_enc = build_original(args.model, sd, torch.float32)
    ref_emb = embed(ref_enc, fid_x, 1, torch.float32)
    ref_masks = decode_masks(ref_sam, ref_emb, points)
    pos_frac = (ref_masks > 0).float().mean().item()
    log(f"reference ready; positive mask fraction {pos_frac:.3f}")
    # masks of every implementation are decoded by this fp32 prompt encoder + mask decoder, so
    # the IoU measures what the encoder's differences do to the masks
    del ref_enc
    ref_sam.image_encoder = None
    free()

    def record(impl, mode, batch, status, compress="none", mlp_epilogue="", **kw):
        row = dict(model=args.model, impl=impl, mode=mode, batch=batch, status=status,
                   mlp_epilogue=mlp_epilogue, **compress_columns(compress, linears), **kw)
        rows.append(row)
        save()
        if status == "ok":
            log(f"{impl:10s} {str(mode):28s} b{batch:<3d} {row['compress_linears'] or '-':19s} "
                f"{row['img_per_s']:8.1f} img/s "
                f"{row['peak_gib']:6.2f} GiB first {row['first_call_s']:6.1f}s "
                f"cos {row['cos_min']:.6f} iou {row['mask_iou_min']:.4f} sync_free {row.get('sync_free')}")
        else:
            log(f"{impl:10s} {str(mode):28s} b{batch:<3d} {status}")

    def measure(impl, mode, batch, builder, dtype, sync_check=False, compress="none", mlp_epilogue=""):
        if time.time() - T0 > args.budget_s:
            record(impl, mode, batch, "skipped (time budget of this run)", compress, mlp_epilogue)
            return None
        sam = enc = None
        try:
            t = time.time()
            sam, enc = builder()
            build_s = time.time() - t
            x = bench_x[:batch].to(dtype)
            first, ms, peak, sync_free = time_encoder(enc, x, args.iters, sync_check)
            if args.profile and impl.startswith("ours"):
                try:
                    profile(lambda: enc(x), f"{impl} {mode} b{batch}")
                except Exception as e:
                    log("profile failed:", repr(e)[:200])
            emb = embed(enc, fid_x, batch, dtype)
            cos = torch.nn.functional.cosine_similarity(emb.flatten(1), ref_emb.flatten(1))
            masks = decode_masks(ref_sam, emb, points)
            ious = iou(masks, ref_masks)
            record(impl, mode, batch, "ok", compress, mlp_epilogue, img_per_s=batch * 1000.0 / ms, ms_per_batch=ms,
                   peak_gib=peak, first_call_s=first, build_s=build_s,
                   cos_min=cos.min().item(), cos_mean=cos.mean().item(),
                   mask_iou_min=ious.min().item(), mask_iou_mean=ious.mean().item(),
                   mask_pos_frac=pos_frac, sync_free=sync_free)
        except torch.cuda.OutOfMemoryError:
            record(impl, mode, batch, "OOM", compress, mlp_epilogue)
        except Exception as e:  # keep going: one failing combination must not lose the others
            record(impl, mode, batch, f"error: {type(e).__name__}: {str(e)[:300]}", compress, mlp_epilogue)
        finally:
            del sam, enc
            torch._dynamo.reset()
            free()

    peer_batches = args.batches if args.peer_batches is None else args.peer_batches
    for impl in args.impls:
        for batch in args.batches:
            if impl == "orig_fp32":
                measure(impl, "eager", batch, lambda: build_original(args.model, sd, torch.float32),
                        torch.float32)
            elif impl == "orig_bf16":
                measure(impl, "eager", batch, lambda: build_original(args.model, sd, torch.bfloat16),
                        torch.bfloat16)
            elif impl == "peer_eager":
                measure(impl, "eager", batch, lambda: build_peer(args.model, sd, None), torch.bfloat16)
            elif impl == "peer":
                if batch in peer_batches:
                    measure(impl, args.peer_mode, batch,
                            lambda: build_peer(args.model, sd, args.peer_mode), torch.bfloat16)
            elif impl == "ours":
                from segment_anything_fast.quantize import InductorSettings, lin1_epilogue_possible

                for comp, ind, epi in itertools.product(args.ours_compress, args.ours_inductor,
                                                        args.ours_mlp_epilogue):
                    if epi == "on" and not lin1_epilogue_possible(comp, linears):
                        if "off" in args.ours_mlp_epilogue:
                            log(f"skipped ours_{comp} with the MLP epilogue: {comp} on {'+'.join(linears)} "
                                "leaves no plain lin1 + GELU to fuse (its row without it runs)")
                            continue
                        log(f"ours_{comp} runs without the MLP epilogue: {comp} on {'+'.join(linears)} "
                            "leaves no plain lin1 + GELU to fuse")
                        epi = "off"
                    mode = (f"{args.ours_mode}/{args.ours_attention}"
                            + ("/regional" if args.ours_regional else "")
                            + ("/tutorial-inductor" if ind == "tutorial" else "")
                            + ("/mlp-epilogue" if epi == "on" else ""))
                    name = "ours" if comp == "none" else f"ours_{comp}"
                    settings = InductorSettings.tutorial() if ind == "tutorial" else InductorSettings()
                    with settings.patch():  # compilation happens at the first call, inside
                        measure(name, mode, batch,
                                lambda: build_ours(args.model, sd, args.ours_attention,
                                                   args.ours_mode, batch, args.ours_regional, comp,
                                                   linears, epi == "on"),
                                torch.bfloat16, sync_check=True, compress=comp, mlp_epilogue=epi)
            else:
                raise SystemExit(f"unknown impl {impl}")

    if args.predictor and time.time() - T0 < args.budget_s:
        from segment_anything import SamPredictor as OrigPredictor
        from segment_anything_fast.build_sam import build_sam
        from segment_anything_fast.compile import make_fast, set_postprocess
        from segment_anything_fast.predictor import SamPredictor

        rng = np.random.default_rng(0)
        image = (rng.random((768, 1024, 3)) * 255).astype(np.uint8)
        coords = rng.random((64, 2)) * np.array([1024, 768])
        try:
            sam, _ = build_original(args.model, sd, torch.float32)
            t_orig, m_orig, ph_orig = predictor_e2e(sam, OrigPredictor, image, coords)
            del sam
            free()
            epilogue = args.ours_mlp_epilogue[0] == "on"  # the first of --ours-mlp-epilogue
            with torch.device("cuda"):
                sam = build_sam(args.model, attention=args.ours_attention)
            sam.to("cuda")
            sam.load_state_dict(sd)
            make_fast(sam, dtype=torch.bfloat16, attention=args.ours_attention,
                      compile_mode=args.ours_mode, batch_size=1, regional=args.ours_regional,
                      decoder_mode="reduce-overhead", decoder_buckets=(64,), upscaling="triton",
                      decoder_attention="triton", mlp_epilogue=epilogue)
            for post in args.ours_postprocess:  # same compiled model, each post-processing
                set_postprocess(sam, post, "default")
                t = time.time()
                t_ours, m_ours, ph_ours = predictor_e2e(sam, SamPredictor, image, coords)
                ious = iou(m_ours, m_orig)
                if args.profile:
                    pred = SamPredictor(sam)
                    c, lab = point_prompts(pred, image, coords)

                    def e2e():
                        pred.set_image(image)
                        pred.predict_torch(c, lab, multimask_output=True)

                    with open(stem + f"_predictor_{post}_profile.txt", "w") as f:
                        f.write(profile(e2e, f"ours predictor e2e (postprocess {post})", cpu=True) + "\n")
                rows.append(dict(model=args.model, impl="predictor_e2e", mode=args.ours_mode, batch=1,
                                 postprocess=post, status="ok", **compress_columns(),
                                 mlp_epilogue="on" if epilogue else "off",
                                 orig_fp32_s=t_orig, ours_s=t_ours, speedup=t_orig / t_ours,
                                 mask_iou_min=ious.min().item(), mask_iou_mean=ious.mean().item(),
                                 first_and_timed_s=time.time() - t,
                                 **{f"orig_{k}_s": v for k, v in ph_orig.items()},
                                 **{f"ours_{k}_s": v for k, v in ph_ours.items()}))
                save()
                log(f"predictor e2e (set_image + 64 points, postprocess {post}): original fp32 "
                    f"{t_orig * 1000:.1f} ms, ours {t_ours * 1000:.1f} ms, x{t_orig / t_ours:.1f}, "
                    f"mask IoU min {ious.min().item():.4f} mean {ious.mean().item():.4f}; ours' phases (ms): "
                    + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in ph_ours.items()))
        except Exception as e:
            rows.append(dict(model=args.model, impl="predictor_e2e", status=f"error: {e!r}"[:300],
                             **compress_columns()))
            save()
            log("predictor e2e failed:", repr(e)[:300])

    # summary table
    print("\nmodel  impl       mode                          batch   img/s   peak GiB  first s  cos_min   iou_min")
    for r in rows:
        if r.get("status") == "ok" and "img_per_s" in r:
            print(f"{r['model']:6s} {r['impl']:10s} {str(r['mode']):28s} {r['batch']:5d} "
                  f"{r['img_per_s']:8.1f} {r['peak_gib']:9.2f} {r['first_call_s']:8.1f} "
                  f"{r['cos_min']:.6f} {r['mask_iou_min']:.4f}")
        elif "img_per_s" not in r and r["impl"] != "predictor_e2e":
            print(f"{r['model']:6s} {r['impl']:10s} {str(r['mode']):28s} {r['batch']:5d} {r['status']}")
    for r in rows:
        if r["impl"] == "predictor_e2e" and r["status"] == "ok":
            print(f"predictor e2e ({r['postprocess']}): orig fp32 {r['orig_fp32_s']*1e3:.1f} ms, ours {r['ours_s']*1e3:.1f} ms "
                  f"(x{r['speedup']:.1f}), mask IoU min {r['mask_iou_min']:.4f}")
    best = {(r["impl"], r["mode"], r["batch"]): r["img_per_s"]
            for r in rows if r.get("status") == "ok" and "img_per_s" in r}
    for (impl, mode, b), v in best.items():
        if not impl.startswith("ours"):
            continue
        peer = next((x for (i, _, bb), x in best.items() if i == "peer" and bb == b), None)
        base = next((x for (i, m, bb), x in best.items()
                     if i == "ours" and bb == b and "tutorial" not in m), None)
        if peer:
            print(f"batch {b}: {impl} {mode} / competitor = {v / peer:.2f}x")
        if base and (impl != "ours" or "tutorial" in mode):
            which = "" if impl == "ours" else f" (compressed {'+'.join(linears)})"
            print(f"batch {b}: {impl} {mode}{which} / ours bf16 = {v / base:.2f}x")

if __name__ == "__main__":
    main()
