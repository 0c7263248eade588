#!/usr/bin/env python
"""Train a small SAM (our modules, SAM_CONFIGS["demo"]) on generated scenes.

Point prompts (a random interior pixel or the center point; multimask output, loss on the
best of the three masks) and noisy box prompts (single-mask output), the SAM losses
(20 x focal + dice on masks, MSE between predicted and actual IoU, weighted by --iou-weight), AdamW with warmup and
cosine decay. Deterministic for a given --seed when --steps ends the run before --minutes does.
Writes {"model": fp16 state dict, "config": SamConfig fields, "meta": run facts}, all plain types
(torch.load(weights_only=True); build_sam(SamConfig(**config), path) loads it), and prints the
held-out point-prompt mIoU (eval_combo's protocol) on generated scenes training never sees.

    python scripts/train_demo.py --device cpu --steps 2200 --minutes 24.5 --pool 300 --out sam_demo.pt

A run longer than one job may last is split with ``--stop-after MIN --state S`` and continued
with ``--resume S`` (same schedule flags): weights, optimizer, LR schedule, clock and random
streams carry over; the scene pool is generated afresh (continuing the scene numbering), so a
split run is not bit-identical to an unsplit one.
"""
import argparse
import dataclasses
import io
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from segment_anything_fast.build_sam import SAM_CONFIGS, build_sam
from segment_anything_fast.data.demo_scenes import (
    MAX_OBJECTS, PACKED_META, heldout_scenes, one_thread_worker, packed_scene, point_prompt_ious,
)
from segment_anything_fast.utils.amg import batched_mask_to_box

DEMO_CONFIG = SAM_CONFIGS["demo"]  # its trained weights ship as build_sam.DEMO_CHECKPOINT


def focal_loss(logits, target, valid, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss averaged over the valid pixels; (..., H, W) -> (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return (loss * valid).flatten(-2).sum(-1) / valid.flatten(-2).sum(-1)


def dice_loss(logits, target, valid):
    p = (logits.sigmoid() * valid).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


class ScenePool:
    """Pre-generated training scenes held as padded tensors on the training device, so a step
    samples images, flips and prompts without touching the CPU.

    Slot ``i`` holds image (3, S, S) uint8, up to ``MAX_OBJECTS`` masks (S, S) bool, their center
    points (x, y), the object count and the image's (h, w); padding is bottom-right, as
    ``Sam.preprocess`` pads. With ``workers`` > 0 the scenes are made in worker processes (the
    initial pool in parallel; later, fresh scenes swapped in as they finish, which makes the
    run depend on timing); with 0, :meth:`refresh` makes one scene in the loop. Scenes are
    numbered from ``start`` (a resumed run continues where the first part stopped).

    Scenes travel packed (``pack_scene``: image + label map, one small meta row); the scenes of
    one refresh go to the device in one copy from a reused pinned buffer and are unpacked
    there, so a refresh costs the training loop a few kernel launches, not a copy per array.
    """

    STAGE = 16  # scenes per staging buffer (initial fill chunk; >= max_swaps)

    def __init__(self, size, long_side, seed, workers=0, max_swaps=4, device="cpu", start=0):
        self.long_side, self.seed, self.next, self.max_swaps = long_side, seed, start, max_swaps
        s, m = long_side, MAX_OBJECTS
        device = torch.device(device)
        self.images = torch.zeros(size, 3, s, s, dtype=torch.uint8, device=device)
        self.masks = torch.zeros(size, m, s, s, dtype=torch.bool, device=device)
        self.centers = torch.zeros(size, m, 2, device=device)
        self.counts = torch.zeros(size, dtype=torch.long, device=device)
        self.hw = torch.zeros(size, 2, dtype=torch.long, device=device)
        self.labels = torch.arange(1, m + 1, dtype=torch.uint8, device=device)[:, None, None]
        # Two pinned staging buffers, each reused once the copy that last read it has run (a
        # plain .to(cuda) from pageable memory would wait for all queued GPU work instead).
        cuda, cap = device.type == "cuda", max(self.STAGE, max_swaps)
        self.stages = [(torch.zeros(cap, 4, s, s, dtype=torch.uint8, pin_memory=cuda),
                        torch.zeros(cap, PACKED_META, pin_memory=cuda),
                        torch.cuda.Event() if cuda else None) for _ in range(2)]
        self.stage_i = 0
        self.executor, self.pending = None, []
        if workers:
            import concurrent.futures
            import multiprocessing

            self.executor = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread_worker)
            self.pending = [self._submit() for _ in range(size + 4 * workers)]
        filled = 0
        while filled < size:
            chunk = []
            while len(chunk) < min(cap, size - filled):
                packed = self._take() if self.executor else self._make_next()
                if packed is not None:
                    chunk.append(packed)
            self._put(range(filled, filled + len(chunk)), chunk)
            filled += len(chunk)

    def __len__(self):
        return self.images.shape[0]

    def _make_next(self):
        self.next += 1
        return packed_scene(self.seed, self.next - 1, self.long_side)

    def _submit(self):
        self.next += 1
        return self.executor.submit(packed_scene, self.seed, self.next - 1, self.long_side)

    def _take(self):
        """The oldest pending worker scene (waits for it), replaced by a new submission."""
        packed = self.pending.pop(0).result()
        self.pending.append(self._submit())
        return packed

    def _put(self, slots, scenes):
        """Write packed scenes to pool slots in order (a later scene for the same slot wins)."""
        last = {int(slot): i for i, slot in enumerate(slots)}
        n = len(last)
        px, meta, done = self.stages[self.stage_i]
        self.stage_i ^= 1
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has run
        px_np, meta_np = px.numpy(), meta.numpy()
        for j, (slot, i) in enumerate(last.items()):
            px_np[j], meta_np[j] = scenes[i]
            meta_np[j, 0] = slot
        dev = self.images.device
        d_px, d_meta = px[:n].to(dev, non_blocking=True), meta[:n].to(dev, non_blocking=True)
        if done is not None:
            done.record()
        idx = d_meta[:, 0].long()  # distinct slots: the scatter is deterministic
        self.images[idx] = d_px[:, :3]
        self.masks[idx] = d_px[:, 3, None] == self.labels
        self.counts[idx] = d_meta[:, 1].long()
        self.hw[idx] = d_meta[:, 2:4].long()
        self.centers[idx] = d_meta[:, 4:].view(n, -1, 2)

    def refresh(self, rng):
        """Put the next scene (or up to ``max_swaps`` finished worker scenes) in random slots."""
        if self.executor is None:
            scenes = [self._make_next()]
        else:
            scenes = []
            for _ in range(self.max_swaps):  # bounded, so the training loop never waits on data
                if not (self.pending and self.pending[0].done()):
                    break
                scenes.append(self._take())
        scenes = [sc for sc in scenes if sc is not None]
        if scenes:
            self._put([int(rng.integers(len(self))) for _ in scenes], scenes)

    def batch(self, n, gen):
        """``n`` distinct random scenes, each flipped left-right (within its width) with p=0.5:
        images (n, 3, S, S) uint8, masks (n, M, S, S), centers (n, M, 2), counts (n,), hw (n, 2)."""
        dev = self.images.device
        ids = torch.randperm(len(self), generator=gen, device=dev)[:n]
        images, masks, centers = self.images[ids], self.masks[ids], self.centers[ids]  # copies
        counts, hw = self.counts[ids], self.hw[ids]
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        w = hw[:, 1:]
        ar = torch.arange(self.long_side, device=dev)
        col = torch.where(flip[:, None] & (ar < w), w - 1 - ar, ar)  # (n, S) source column
        images = images.gather(-1, col[:, None, None].expand_as(images))
        masks = masks.gather(-1, col[:, None, None].expand_as(masks))
        centers[..., 0] = torch.where(flip[:, None], w - 1 - centers[..., 0], centers[..., 0])
        return images, masks, centers, counts, hw

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


CENTER_PROB = 0.3  # default share of point prompts at the object's center point
IOU_WEIGHT = 1.0  # default weight of the IoU-prediction MSE (SAM's)


def sample_prompts(masks, centers, counts, k, gen, center_prob=CENTER_PROB):
    """``k`` objects per image (drawn with replacement among its ``counts``), each with a point
    (the center point with p=``center_prob``, else a uniformly random pixel of the object) and a
    box (the mask's tight box, each side moved by N(0, 0.1 x box side), clipped to +-20 px).
    Returns gt masks (n*k, S, S), points (n*k, 2) and boxes (n*k, 4) as (x, y) pixels."""
    n, dev, s = masks.shape[0], masks.device, masks.shape[-1]
    obj = (torch.rand(n, k, generator=gen, device=dev) * counts[:, None]).long()
    rows = torch.arange(n, device=dev)[:, None]
    gt = masks[rows, obj].flatten(0, 1)
    pix = torch.multinomial(gt.flatten(1).float(), 1, generator=gen)[:, 0]
    rand_pt = torch.stack([pix % s, pix // s], dim=1).float()
    use_center = torch.rand(n * k, 1, generator=gen, device=dev) < center_prob
    pts = torch.where(use_center, centers[rows, obj].flatten(0, 1), rand_pt)
    boxes = batched_mask_to_box(gt).float()  # objects are never empty
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.randn(n * k, 4, generator=gen, device=dev) * side * 0.1).clamp(-20, 20)
    return gt, pts, boxes + noise


def mask_losses(sam, low, gt, valid):
    """low (K, C, h, w) logits; gt (K, S, S) masks padded to the input size S; valid (K, S, S)
    the image area -> per-mask loss (K, C) and actual IoU (K, C), over the valid pixels.

    Computed at half the input resolution (soft area-averaged targets) to save time.
    """
    size = sam.image_encoder.img_size // 2
    logits = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    target = F.interpolate(gt[:, None].float(), (size, size), mode="area").expand_as(logits)
    v = F.interpolate(valid[:, None].float(), (size, size), mode="area") > 0.5
    loss = 20 * focal_loss(logits, target, v) + dice_loss(logits, target, v)
    with torch.no_grad():
        pred, tgt = (logits > 0) & v, target > 0.5
        inter = (pred & tgt).flatten(-2).sum(-1).float()
        union = (pred | tgt).flatten(-2).sum(-1).float()
        iou = inter / union.clamp(min=1)
    return loss, iou


def prompt_batch(sam, batch, k, gen, center_prob=CENTER_PROB):
    """The eager, random half of a step: normalised padded images (n, 3, S, S), ``k`` prompted
    objects per image (:func:`sample_prompts`) and each prompt's valid-pixel mask (n*k, S, S)."""
    images, masks, centers, counts, hw = batch
    s = images.shape[-1]
    ar = torch.arange(s, device=images.device)
    valid = (ar[None, :, None] < hw[:, :1, None]) & (ar[None, None, :] < hw[:, 1:, None])
    x = (images.float() - sam.pixel_mean) / sam.pixel_std * valid[:, None]
    gt, pts, boxes = sample_prompts(masks, centers, counts, k, gen, center_prob)
    return x, pts, boxes, gt, valid.repeat_interleave(k, dim=0)


def model_loss(sam, x, pts, boxes, gt, valid, k: int, iou_weight: float = IOU_WEIGHT):
    """Mean loss of the model on one :func:`prompt_batch` (a pure tensor function, so
    ``--compile`` can compile it whole, backward included): the best of the point prompt's
    three mask losses, the box prompt's mask loss, and ``iou_weight`` x the MSE of every
    predicted IoU.

    The prompts of all images (a point, multimask, and a box, single mask, per sampled object)
    go through one decoder call.
    """
    emb = sam.image_encoder(x)
    labels = torch.ones(len(pts), 1, dtype=torch.int, device=pts.device)
    sp_pts, dense = sam.prompt_encoder(points=(pts[:, None], labels), boxes=None, masks=None)
    sp_box, _ = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    per_prompt = emb.repeat_interleave(k, dim=0)
    pe = sam.prompt_encoder.get_dense_pe().expand(2 * len(pts), -1, -1, -1)
    low, iou_pred = sam.mask_decoder.predict_masks_per_prompt(
        torch.cat([per_prompt, per_prompt]), pe, torch.cat([sp_pts, sp_box]),
        torch.cat([dense, dense]),
    )
    n_pts = len(pts)
    total = 0.0
    for low_k, iou_k in ((low[:n_pts, 1:], iou_pred[:n_pts, 1:]), (low[n_pts:, :1], iou_pred[n_pts:, :1])):
        loss, iou = mask_losses(sam, low_k.float(), gt, valid)
        total = total + loss.min(dim=1).values.sum() + iou_weight * F.mse_loss(iou_k.float(), iou, reduction="none").mean(1).sum()
    return total / (2 * n_pts)


def train_step(sam, batch, k, gen, loss_fn=model_loss, center_prob=CENTER_PROB, iou_weight=IOU_WEIGHT):
    """batch: ``ScenePool.batch`` output on the model's device; returns the mean loss.
    Nothing in a step waits on the host."""
    return loss_fn(sam, *prompt_batch(sam, batch, k, gen, center_prob), k, iou_weight)


def save_checkpoint(sam, cfg, path, meta):
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sam.state_dict().items()}
    c = dataclasses.asdict(cfg)
    c["encoder_global_attn_indexes"] = list(c["encoder_global_attn_indexes"])
    _write_atomic(path, _serialized({"model": sd, "config": c, "meta": meta}))


SCHEDULE_FLAGS = ("steps", "minutes", "batch", "prompts", "lr", "seed", "center_prob", "iou_weight")


def _serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_atomic(path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, then rename it there."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_state(path, sam, opt, sched, gen, rng, step, train_s, scenes_made, args):
    """Everything a later ``--resume`` needs to continue the same run, written atomically.
    With ``--state-part-mb`` the serialized state goes into ``PATH.partNNN`` files of at most
    that many MiB (machines that return only small files) and ``PATH`` lists them, written last."""
    state = {"model": {k: v.detach().cpu() for k, v in sam.state_dict().items()},
             "opt": opt.state_dict(), "sched": sched.state_dict(), "gen_state": gen.get_state(),
             "rng": rng.bit_generator.state, "step": step, "train_seconds": train_s,
             "scenes_made": scenes_made, "schedule": {f: getattr(args, f) for f in SCHEDULE_FLAGS}}
    data = _serialized(state)
    if args.state_part_mb is None:
        return _write_atomic(path, data)
    size = max(1, int(args.state_part_mb * 2**20))
    parts = []
    for k in range(0, len(data), size):
        name = f"{os.path.basename(path)}.part{k // size:03d}"
        _write_atomic(os.path.join(os.path.dirname(os.path.abspath(path)), name), data[k:k + size])
        parts.append(name)
    _write_atomic(path, _serialized({"state_parts": parts, "state_bytes": len(data)}))


def read_state(path):
    """The state dict that :func:`save_state` wrote to ``path`` (one file, or an index of parts
    lying next to it)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_parts" not in state:
        return state
    folder = os.path.dirname(os.path.abspath(path))
    chunks = []
    for name in state["state_parts"]:
        with open(os.path.join(folder, name), "rb") as f:
            chunks.append(f.read())
    data = b"".join(chunks)
    if len(data) != state["state_bytes"]:
        raise ValueError(f"its parts hold {len(data)} bytes, the index says {state['state_bytes']}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_state(path, args, parser):
    """The ``--state`` file of an earlier part; its schedule flags must equal this run's."""
    if not os.path.isfile(path):
        parser.error(f"--resume: no such file {path!r}.")
    try:
        state = read_state(path)
        saved = state["schedule"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        parser.error(f"--resume: {path!r} is not a train_demo --state file ({type(e).__name__}: {e}).")
    diff = [f"--{f.replace('_', '-')} {saved.get(f)} (now {getattr(args, f)})" for f in SCHEDULE_FLAGS if saved.get(f) != getattr(args, f)]
    if diff:
        parser.error("--resume: pass the schedule flags of the run being resumed: " + ", ".join(diff) + ".")
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=2000, help="schedule length (optimizer steps)")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-time budget of the training loop; the LR schedule ends by then")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--prompts", type=int, default=6, help="objects prompted per image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--center-prob", type=float, default=CENTER_PROB,
                   help="share of point prompts at the object's center point (the evaluation's "
                        f"point); the rest are random object pixels (default {CENTER_PROB})")
    p.add_argument("--iou-weight", type=float, default=IOU_WEIGHT,
                   help="weight of the IoU-prediction MSE against the mask losses (default "
                        f"{IOU_WEIGHT}, SAM's); a larger one trains the choice among the three masks harder")
    p.add_argument("--pool", type=int, default=400, help="pre-generated training scenes")
    p.add_argument("--refresh-every", type=int, default=2, help="replace one pool scene every N steps")
    p.add_argument("--workers", type=int, default=0,
                   help="processes making fresh scenes in the background (0: refresh in the loop)")
    p.add_argument("--heldout", type=int, default=40, help="held-out scenes for the final mIoU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="sam_demo.pt")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead"], metavar="MODE",
                   help="torch.compile the model + loss of a step, forward and backward (fewer, "
                        "fused kernels; compiling takes a minute or two, so only for long runs). "
                        "MODE reduce-overhead also replays them as CUDA graphs, which takes the "
                        "kernel launches off the host (on CPU it acts as default)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                   help="stop this process after MIN minutes of training, before the schedule "
                        "ends, and write --state (for machines whose jobs are shorter than --minutes)")
    p.add_argument("--state", default=None,
                   help="write the resumable training state (fp32 weights, optimizer, step, "
                        "clock, random states) here at the end")
    p.add_argument("--state-part-mb", type=float, default=None, metavar="MB",
                   help="write --state as parts of at most MB MiB (PATH.partNNN) listed by "
                        "PATH, for machines that return only small files; --resume reads either")
    p.add_argument("--resume", default=None,
                   help="continue the run whose --state file this is (same schedule flags)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # bf16 autocast on CUDA
        p.error("--device cuda: no CUDA device is available; use --device cpu.")
    for name in ("steps", "batch", "prompts", "pool", "refresh_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1.")
    if args.workers < 0:
        p.error("--workers must be >= 0.")
    if not 0 <= args.center_prob <= 1:
        p.error(f"--center-prob must lie in [0, 1], got {args.center_prob}.")
    if not args.iou_weight >= 0:
        p.error(f"--iou-weight must be >= 0, got {args.iou_weight}.")
    if args.batch > args.pool:
        p.error(f"--batch {args.batch} is larger than --pool {args.pool}; a batch takes distinct scenes.")
    if args.state_part_mb is not None and (args.state_part_mb <= 0 or args.state is None):
        p.error("--state-part-mb needs a positive size and --state.")
    if args.stop_after is not None and (args.stop_after <= 0 or args.state is None):
        p.error("--stop-after needs a positive number of minutes and --state (to resume from).")
    for flag, path in (("--out", args.out), ("--state", args.state)):
        out_dir = os.path.dirname(os.path.abspath(path)) if path else None
        if out_dir is not None and not os.path.isdir(out_dir):
            p.error(f"{flag}: directory {out_dir!r} does not exist.")
    resumed = load_state(args.resume, args, p) if args.resume else None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = DEMO_CONFIG
    device = torch.device(args.device)
    sam = build_sam(cfg)
    if resumed:
        sam.load_state_dict(resumed["model"])
        rng.bit_generator.state = resumed["rng"]
    sam = sam.to(device).train()
    t0 = time.time()
    pool = ScenePool(args.pool, cfg.image_size, args.seed, args.workers, device=device,
                     start=resumed["scenes_made"] if resumed else 0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if resumed:
        gen.set_state(resumed["gen_state"])
    print(f"generated {args.pool} scenes in {time.time() - t0:.0f}s; "
          f"{sum(p.numel() for p in sam.parameters()) / 1e6:.2f}M parameters", flush=True)
    # fused: one kernel per step for the whole update on CUDA (the same AdamW arithmetic)
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    warmup = min(100, args.steps // 10)
    step, done_s = (resumed["step"], resumed["train_seconds"]) if resumed else (0, 0.0)
    t_part = time.time()
    t_train = t_part - done_s  # the schedule's clock runs over all parts of a run

    def lr_factor(s):
        # Linear warmup, then cosine to 2% over the run. Progress is step/steps, or the elapsed
        # share of --minutes when that is larger (a busy machine still ends annealed; the run is
        # then no longer bit-reproducible).
        if s < warmup:
            return (s + 1) / max(warmup, 1)
        prog = (s - warmup) / max(args.steps - warmup, 1)
        prog = min(max(prog, (time.time() - t_train) / (args.minutes * 60)), 1.0)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    if resumed:
        opt.load_state_dict(resumed["opt"])
        sched.load_state_dict(resumed["sched"])
    loss_fn = torch.compile(model_loss, mode=args.compile) if args.compile else model_loss
    graphs = args.compile == "reduce-overhead" and device.type == "cuda"
    part_s = args.stop_after * 60 if args.stop_after is not None else float("inf")
    avg = None
    while (step < args.steps and time.time() - t_train < args.minutes * 60
           and time.time() - t_part < part_s):
        if graphs:  # a new iteration: the last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        batch = pool.batch(args.batch, gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            loss = train_step(sam, batch, args.prompts, gen, loss_fn, args.center_prob, args.iou_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss = loss.detach()  # with CUDA graphs, a graph output: its memory is reused next step
        avg = loss.clone() if avg is None else 0.98 * avg + 0.02 * loss  # new tensors; no sync
        if step % args.refresh_every == 0:
            pool.refresh(rng)
        if step % 50 == 0:
            print(f"step {step} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train
    pool.close()
    finished = step >= args.steps or train_s >= args.minutes * 60
    if not finished:
        print(f"--stop-after reached after {step}/{args.steps} steps; resume with --resume {args.state}",
              flush=True)
    elif step < args.steps:
        print(f"time budget reached after {step}/{args.steps} steps", flush=True)
    if args.state:
        save_state(args.state, sam, opt, sched, gen, rng, step, train_s, pool.next, args)
    sam.eval()
    # Measure what is shipped: the fp16-rounded weights, without TF32 convolutions, so that
    # eval_combo on the exported held-out set (--heldout-of) reports the same number.
    with torch.no_grad():
        for t in sam.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ious = point_prompt_ious(sam, heldout_scenes(args.heldout, cfg.image_size, args.seed))
    miou = float(ious.mean())
    meta = {"steps": step, "train_seconds": round(train_s, 1), "heldout_scenes": args.heldout,
            "heldout_objects": int(ious.numel()), "heldout_point_miou": round(miou, 4),
            "seed": args.seed, "batch": args.batch, "prompts": args.prompts, "lr": args.lr,
            "center_prob": args.center_prob, "iou_weight": args.iou_weight,
            "scenes_made": pool.next, "schedule_finished": finished}
    save_checkpoint(sam.cpu(), cfg, args.out, meta)
    print(f"trained {step} steps in {train_s / 60:.1f} min; held-out point-prompt mIoU "
          f"{miou:.4f} over {ious.numel()} objects in {args.heldout} scenes; wrote {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
