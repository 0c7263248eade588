"""Shared test helpers: tiny SAM configurations and the original package as oracle.

``build_pair`` returns our model and the original ``segment_anything`` model holding the
same random weights (position tables included, which the original zero-initialises).
"""
from functools import partial

import torch

from segment_anything_fast.build_sam import SAM_CONFIGS, SamConfig, build_sam

# The test-sized model (128 px input, 32-wide encoder), shared with the CLIs' --model-type tiny.
TINY = SAM_CONFIGS["tiny"]


def build_original(cfg: SamConfig = TINY):
    """The original package's Sam for ``cfg`` (fp32, eval mode)."""
    from segment_anything.modeling import (
        ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer,
    )

    emb = cfg.image_size // cfg.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size,
            mlp_ratio=cfg.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
            window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """Random values for every entry of ``model``'s state dict (no zero tables)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            scale = 0.5 if t.dim() <= 1 else (1.0 / max(t.shape[-1], 1)) ** 0.5
            r = torch.randn(t.shape, generator=g) * scale
            if name.endswith(("norm1.weight", "norm2.weight", ".weight")) and t.dim() == 1:
                r = 1.0 + 0.1 * r  # keep norm scales near one
            out[name] = r.to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def build_pair(cfg: SamConfig = TINY, seed: int = 0, **ours_kwargs):
    """(ours, original) fp32 eval models with identical random weights."""
    orig = build_original(cfg)
    sd = random_state_dict(orig, seed)
    orig.load_state_dict(sd)
    ours = build_sam(cfg, **ours_kwargs)
    ours.load_state_dict(sd)
    return ours.eval(), orig
