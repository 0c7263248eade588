#!/usr/bin/env python
"""Train a small SAM (our modules, DEMO_CONFIG below) on generated scenes.

Point prompts (a random interior pixel or the center point; multimask output, loss on the
best of the three masks) and noisy box prompts (single-mask output), the SAM losses
(20 x focal + dice on masks, MSE between predicted and actual IoU), AdamW with warmup and
cosine decay. Deterministic for a given --seed when --steps ends the run before --minutes does.
Writes {"model": fp16 state dict, "config": SamConfig fields, "meta": run facts}, all plain types
(torch.load(weights_only=True); build_sam(SamConfig(**config), path) loads it), and prints the
held-out point-prompt mIoU (eval_combo's protocol) on generated scenes training never sees.

    python scripts/train_demo.py --device cpu --steps 2200 --minutes 24.5 --pool 300 --out sam_demo.pt
"""
import argparse
import dataclasses
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

from segment_anything_fast.build_sam import SamConfig, build_sam
from segment_anything_fast.data.coco_prompts import center_point
from segment_anything_fast.data.demo_scenes import demo_scene, heldout_scenes, point_prompt_ious

# Sized for CPU training: 256 px input -> 16x16 tokens (windows of 8, two global blocks).
DEMO_CONFIG = SamConfig(
    encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
    image_size=256, patch_size=16, window_size=8, prompt_embed_dim=64, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=256, decoder_num_heads=2, iou_head_depth=3,
    iou_head_hidden_dim=64,
)


def focal_loss(logits, target, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss averaged over pixels; (..., H, W) -> (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return loss.flatten(-2).mean(-1)


def dice_loss(logits, target):
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


class ScenePool:
    """Pre-generated training scenes (image tensor, mask tensor, center points), refreshed on the go."""

    def __init__(self, size, long_side, seed):
        self.long_side, self.seed, self.next = long_side, seed, 0
        self.items = [self._make() for _ in range(size)]

    def _make(self):
        while True:
            sc = demo_scene((self.seed, self.next), self.long_side)
            self.next += 1
            if sc.masks:
                break
        masks = torch.from_numpy(np.stack(sc.masks))
        centers = torch.tensor([center_point(m) for m in sc.masks], dtype=torch.float32)
        return torch.from_numpy(sc.image).permute(2, 0, 1).contiguous(), masks, centers

    def refresh(self, rng):
        self.items[int(rng.integers(len(self.items)))] = self._make()


def sample_prompts(masks, centers, k, rng):
    """Pick up to k objects; a point (random interior pixel, or the center 30%) and a noisy box each."""
    n = masks.shape[0]
    idx = rng.choice(n, size=min(k, n), replace=False)
    pts, boxes = [], []
    for i in idx:
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if rng.random() < 0.3:
            pts.append(centers[i].tolist())
        else:
            j = int(rng.integers(len(xs)))
            pts.append([float(xs[j]), float(ys[j])])
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
        bw, bh = x1 - x0, y1 - y0
        noise = rng.normal(0, 1, 4) * np.array([bw, bh, bw, bh]) * 0.1
        noise = np.clip(noise, -20, 20)
        boxes.append([x0 + noise[0], y0 + noise[1], x1 + noise[2], y1 + noise[3]])
    return torch.from_numpy(idx), torch.tensor(pts), torch.tensor(boxes, dtype=torch.float32)


def mask_losses(sam, low, gt, hw):
    """low (K, C, h, w) logits, gt (K, H, W) -> per-mask loss (K, C) and actual IoU (K, C).

    Computed at half the input resolution (soft area-averaged targets) to save CPU time.
    """
    size = sam.image_encoder.img_size // 2
    h, w = (hw[0] + 1) // 2, (hw[1] + 1) // 2
    logits = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[..., :h, :w]
    target = F.interpolate(gt[:, None].float(), (h, w), mode="area").expand_as(logits)
    loss = 20 * focal_loss(logits, target) + dice_loss(logits, target)
    with torch.no_grad():
        pred, tgt = logits > 0, target > 0.5
        inter = (pred & tgt).flatten(-2).sum(-1).float()
        union = (pred | tgt).flatten(-2).sum(-1).float()
        iou = inter / union.clamp(min=1)
    return loss, iou


def train_step(sam, batch, k, rng):
    images = torch.stack([sam.preprocess(img.float()) for img, _, _ in batch])
    emb = sam.image_encoder(images)
    pe = sam.prompt_encoder.get_dense_pe()
    total, n = 0.0, 0
    for e, (img, masks, centers) in zip(emb, batch):
        hw = img.shape[-2:]
        idx, pts, boxes = sample_prompts(masks, centers, k, rng)
        gt = masks[idx]
        labels = torch.ones(len(idx), 1, dtype=torch.int)
        for prompt, multi in (((pts[:, None], labels), True), (boxes, False)):
            sparse, dense = sam.prompt_encoder(
                points=prompt if multi else None, boxes=None if multi else prompt, masks=None
            )
            low, iou_pred = sam.mask_decoder(
                image_embeddings=e[None], image_pe=pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=multi,
            )
            loss, iou = mask_losses(sam, low, gt, hw)
            best = loss.min(dim=1).values
            total = total + best.sum() + F.mse_loss(iou_pred, iou, reduction="none").mean(1).sum()
            n += len(idx)
    return total / n


def save_checkpoint(sam, cfg, path, meta):
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sam.state_dict().items()}
    c = dataclasses.asdict(cfg)
    c["encoder_global_attn_indexes"] = list(c["encoder_global_attn_indexes"])
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"model": sd, "config": c, "meta": meta}, tmp)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=2000, help="schedule length (optimizer steps)")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-time budget of the training loop; the LR schedule ends by then")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--prompts", type=int, default=6, help="objects prompted per image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=400, help="pre-generated training scenes")
    p.add_argument("--refresh-every", type=int, default=2, help="replace one pool scene every N steps")
    p.add_argument("--heldout", type=int, default=40, help="held-out scenes for the final mIoU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="sam_demo.pt")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available; use --device cpu.")
    for name in ("steps", "batch", "prompts", "pool", "refresh_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1.")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out: directory {out_dir!r} does not exist.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = DEMO_CONFIG
    device = torch.device(args.device)
    sam = build_sam(cfg).to(device).train()
    t0 = time.time()
    pool = ScenePool(args.pool, cfg.image_size, args.seed)
    print(f"generated {args.pool} scenes in {time.time() - t0:.0f}s; "
          f"{sum(p.numel() for p in sam.parameters()) / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.999))
    warmup = min(100, args.steps // 10)
    t_train = time.time()

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
    step, avg = 0, None
    while step < args.steps and time.time() - t_train < args.minutes * 60:
        ids = rng.choice(len(pool.items), size=args.batch, replace=False)
        batch = []
        for i in ids:
            img, masks, centers = pool.items[int(i)]
            if rng.random() < 0.5:  # horizontal flip
                img, masks = img.flip(-1), masks.flip(-1)
                centers = centers.clone()
                centers[:, 0] = img.shape[-1] - 1 - centers[:, 0]
            batch.append((img.to(device), masks.to(device), centers))
        loss = train_step(sam, batch, args.prompts, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % args.refresh_every == 0:
            pool.refresh(rng)
        if step % 50 == 0:
            print(f"step {step} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train
    if step < args.steps:
        print(f"time budget reached after {step}/{args.steps} steps", flush=True)
    sam.eval()
    ious = point_prompt_ious(sam, heldout_scenes(args.heldout, cfg.image_size, args.seed))
    miou = float(ious.mean())
    meta = {"steps": step, "train_seconds": round(train_s, 1), "heldout_scenes": args.heldout,
            "heldout_objects": int(ious.numel()), "heldout_point_miou": round(miou, 4),
            "seed": args.seed, "batch": args.batch, "prompts": args.prompts, "lr": args.lr}
    save_checkpoint(sam.cpu(), cfg, args.out, meta)
    print(f"trained {step} steps in {train_s / 60:.1f} min; held-out point-prompt mIoU "
          f"{miou:.4f} over {ious.numel()} objects in {args.heldout} scenes; wrote {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
