"""Parity of every module with the original segment_anything (tiny configs, CPU, fp32)."""
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from segment_anything_fast.build_sam import SamConfig, build_sam
from segment_anything_fast.modeling.image_encoder import Attention, get_rel_pos
from tests.oracle import TINY, build_pair

ATOL = 1e-5


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs diff {err}"


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture(scope="module")
def pair():
    return build_pair(TINY, seed=0)


@pytest.fixture(scope="module")
def embeddings(pair):
    ours, orig = pair
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, TINY.prompt_embed_dim, 8, 8, generator=g)


def _prompts(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, 4, 2, generator=g) * TINY.image_size
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, 1, 1, 1]])[:n]
    boxes = torch.sort(torch.rand(n, 2, 2, generator=g) * TINY.image_size, dim=1).values.reshape(n, 4)
    masks = torch.randn(n, 1, 32, 32, generator=g)
    return coords, labels, boxes, masks


def test_state_dict_keys_and_shapes_match(pair):
    ours, orig = pair
    a, b = ours.state_dict(), orig.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("window", [3, 4])  # 3 pads the 8x8 token grid, 4 divides it
def test_image_encoder_matches(window):
    cfg = SamConfig(**{**TINY.__dict__, "window_size": window})
    ours, orig = build_pair(cfg, seed=3)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(ours.image_encoder(x), orig.image_encoder(x))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_backends_match(pair, backend):
    ours, orig = pair
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    for m in ours.modules():
        if isinstance(m, Attention):
            m.backend = backend
    try:
        with torch.no_grad():
            close(ours.image_encoder(x), orig.image_encoder(x))
    finally:
        for m in ours.modules():
            if isinstance(m, Attention):
                m.backend = "math"


def test_builder_attention_argument():
    model = build_sam(TINY, attention="sdpa")
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    assert backends == {"sdpa"}
    with pytest.raises(ValueError, match="Unknown attention backend"):
        build_sam(TINY, attention="nope")


def test_rel_pos_tables_not_in_state_dict(pair):
    ours, _ = pair
    assert not any("rel_index" in k for k in ours.state_dict())


def test_rel_pos_interpolation_matches_original():
    from segment_anything.modeling.image_encoder import get_rel_pos as orig_get_rel_pos

    table = torch.randn(9, 6)
    for q in (5, 7, 3):  # 2q-1 = 9 (no resize), 13 (upsample), 5 (downsample)
        close(get_rel_pos(q, q, table), orig_get_rel_pos(q, q, table))


def test_attention_on_other_grid_size_interpolates():
    from segment_anything.modeling.image_encoder import Attention as OrigAttention

    ours = Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    orig = OrigAttention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    orig.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 5, 16)
    with torch.no_grad():
        close(ours(x), orig(x))


@pytest.mark.parametrize("kind", ["points", "points+boxes", "boxes", "masks", "all", "none"])
def test_prompt_encoder_matches(pair, kind):
    ours, orig = pair
    coords, labels, boxes, masks = _prompts()
    args = dict(points=None, boxes=None, masks=None)
    if "points" in kind or kind == "all":
        args["points"] = (coords, labels)
    if "boxes" in kind or kind == "all":
        args["boxes"] = boxes
    if kind in ("masks", "all"):
        args["masks"] = masks
    with torch.no_grad():
        s1, d1 = ours.prompt_encoder(**args)
        s2, d2 = orig.prompt_encoder(**args)
    close(s1, s2)
    close(d1, d2)
    close(ours.prompt_encoder.get_dense_pe(), orig.prompt_encoder.get_dense_pe())


def test_prompt_encoder_int_labels(pair):
    ours, orig = pair
    coords, labels, _, _ = _prompts()
    with torch.no_grad():
        close(ours.prompt_encoder((coords, labels.int()), None, None)[0],
              orig.prompt_encoder((coords, labels.float()), None, None)[0])


def test_two_way_transformer_matches(pair, embeddings):
    ours, orig = pair
    img = embeddings[:1].expand(3, -1, -1, -1)
    pe = torch.randn_like(img)
    tokens = torch.randn(3, 7, TINY.prompt_embed_dim)
    with torch.no_grad():
        q1, k1 = ours.mask_decoder.transformer(img, pe, tokens)
        q2, k2 = orig.mask_decoder.transformer(img, pe, tokens)
    close(q1, q2)
    close(k1, k2)


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches(pair, embeddings, multimask):
    ours, orig = pair
    coords, labels, boxes, masks = _prompts()
    with torch.no_grad():
        sparse, dense = orig.prompt_encoder((coords, labels), boxes, masks)
        kw = dict(
            image_embeddings=embeddings[:1], image_pe=orig.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        m1, i1 = ours.mask_decoder(**kw)
        m2, i2 = orig.mask_decoder(**kw)
    assert m1.shape[1] == (3 if multimask else 1)
    close(m1, m2)
    close(i1, i2)


def _batched_input(seed=5):
    g = torch.Generator().manual_seed(seed)
    coords, labels, boxes, masks = _prompts(seed=seed)
    return [
        {"image": torch.rand(3, 128, 96, generator=g) * 255, "original_size": (200, 150),
         "point_coords": coords, "point_labels": labels},
        {"image": torch.rand(3, 80, 128, generator=g) * 255, "original_size": (70, 113),
         "boxes": boxes, "mask_inputs": masks},
        {"image": torch.rand(3, 128, 128, generator=g) * 255, "original_size": (128, 128),
         "point_coords": coords[:2], "point_labels": labels[:2], "boxes": boxes[:2]},
    ]


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_forward_matches(pair, multimask):
    ours, orig = pair
    batch = _batched_input()
    out1 = ours(batch, multimask_output=multimask)
    out2 = orig(batch, multimask_output=multimask)
    for a, b in zip(out1, out2):
        close(a["low_res_logits"], b["low_res_logits"])
        close(a["iou_predictions"], b["iou_predictions"])
        assert a["masks"].dtype == torch.bool and a["masks"].shape == b["masks"].shape
        # Thresholded masks may flip only where logits sit within rounding of zero.
        assert (a["masks"] != b["masks"]).float().mean().item() < 1e-3


def test_sam_attributes(pair):
    ours, orig = pair
    assert ours.image_format == orig.image_format == "RGB"
    assert ours.mask_threshold == orig.mask_threshold == 0.0
    assert ours.device == torch.device("cpu")
    close(ours.pixel_mean, orig.pixel_mean)
    close(ours.pixel_std, orig.pixel_std)
    img = torch.rand(3, 100, 60) * 255
    close(ours.preprocess(img), orig.preprocess(img))
    logits = torch.randn(2, 3, 32, 32)
    close(ours.postprocess_masks(logits, (100, 60), (250, 150)),
          orig.postprocess_masks(logits, (100, 60), (250, 150)))


def test_bf16_model_runs_and_is_close(pair):
    ours, _ = pair
    batch = _batched_input()
    ref = ours(batch, multimask_output=True)
    half = build_sam(TINY).eval()
    half.load_state_dict(ours.state_dict())
    half.to(torch.bfloat16)
    out = half(batch, multimask_output=True)  # fp32 images and prompts into a bf16 model
    for a, b in zip(out, ref):
        assert a["low_res_logits"].dtype == torch.bfloat16
        assert cosine(a["low_res_logits"], b["low_res_logits"]) > 0.99
        assert cosine(a["iou_predictions"], b["iou_predictions"]) > 0.99
    emb_ref = ours.image_encoder(ours.preprocess(batch[0]["image"])[None])
    emb = half.image_encoder(half.preprocess(batch[0]["image"])[None])
    assert cosine(emb, emb_ref) > 0.99


def test_modules_compile_fullgraph_without_graph_breaks(pair, embeddings):
    ours, _ = pair
    torch._dynamo.reset()
    t0 = time.time()
    coords, labels, boxes, masks = _prompts()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        enc = torch.compile(ours.image_encoder, fullgraph=True, backend="eager")
        close(enc(x), ours.image_encoder(x))
        pe = torch.compile(ours.prompt_encoder, fullgraph=True, backend="eager")
        s, d = pe((coords, labels), boxes, masks)
        s_ref, d_ref = ours.prompt_encoder((coords, labels), boxes, masks)
        close(s, s_ref)
        pe(None, boxes, None)
        dec = torch.compile(ours.mask_decoder, fullgraph=True, backend="eager")
        dense_pe = ours.prompt_encoder.get_dense_pe()
        m, i = dec(embeddings[:1], dense_pe, s_ref, d_ref, True)
        m_ref, _ = ours.mask_decoder(embeddings[:1], dense_pe, s_ref, d_ref, True)
        close(m, m_ref)
        # prompts of two images by index (eval_combo's packed decoder)
        s_pts, d_pts = ours.prompt_encoder((coords, labels), None, None)
        idx = torch.tensor([1, 0, 1])
        packed = torch.compile(ours.mask_decoder.predict_masks_per_prompt, fullgraph=True, backend="eager")
        m, _ = packed(embeddings, dense_pe, s_pts, d_pts, image_index=idx)
        close(m, ours.mask_decoder.predict_masks_per_prompt(embeddings, dense_pe, s_pts, d_pts, image_index=idx)[0])
    assert time.time() - t0 < 60


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by encoder_num_heads"):
        SamConfig(encoder_embed_dim=30, encoder_depth=2, encoder_num_heads=4,
                  encoder_global_attn_indexes=(1,))
    with pytest.raises(ValueError, match="outside"):
        SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                  encoder_global_attn_indexes=(2,))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                  encoder_global_attn_indexes=(1,), image_size=100)
    with pytest.raises(ValueError, match="Unknown SAM model type"):
        build_sam("vit_x")
    with pytest.raises(TypeError):
        build_sam(3)


def test_no_torchvision_at_run_time():
    code = (
        "import sys, torch\n"
        "from segment_anything_fast.build_sam import build_sam\n"
        "from tests.oracle import TINY\n"
        "m = build_sam(TINY)\n"
        "m([{'image': torch.rand(3, 128, 128) * 255, 'original_size': (128, 128)}], True)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=".")


def test_windowed_blocks_project_only_real_tokens():
    """qkv and proj of windowed blocks see the H*W real tokens (no all-zero padded rows, which
    give per-row quantizers a zero scale), and the padded keys still equal qkv(0)."""
    from segment_anything_fast.modeling.image_encoder import window_partition

    sam = build_sam(TINY).eval()
    grid = TINY.image_size // TINY.patch_size
    assert grid % TINY.window_size != 0  # the tiny config pads
    seen = []
    for blk in sam.image_encoder.blocks:
        if blk.window_size > 0:
            for lin in (blk.attn.qkv, blk.attn.proj):
                lin.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        sam.image_encoder(torch.randn(2, 3, TINY.image_size, TINY.image_size))
    assert seen and all(t.shape[:3] == (2, grid, grid) for t in seen)
    assert all(bool((t.abs().amax(-1) > 0).all()) for t in seen)

    x = torch.randn(2, 5, 4, 6)
    bias = torch.randn(6)
    win, (hp, wp) = window_partition(x, 3, bias)
    zero_win, _ = window_partition(x, 3)
    assert (hp, wp) == (6, 6) and win.shape == zero_win.shape == (8, 3, 3, 6)
    padded = win.reshape(2, 2, 2, 3, 3, 6).permute(0, 1, 3, 2, 4, 5).reshape(2, 6, 6, 6)
    assert torch.equal(padded[:, :5, :4], x)
    assert torch.equal(padded[:, 5:], bias.expand(2, 1, 6, 6)) and torch.equal(padded[:, :, 4:], bias.expand(2, 6, 2, 6))


@pytest.mark.parametrize("input_size,original_size", [
    ((96, 128), (96, 128)), ((128, 77), (300, 192)), ((128, 128), (128, 128)),
    ((1, 128), (2, 200)), ((127, 128), (127, 128)),
])
def test_postprocess_masks_equals_original(pair, input_size, original_size):
    """Cropping before the upscale and skipping an identity resize change no value."""
    ours, orig = pair
    low = torch.randn(3, 2, TINY.image_size // 4, TINY.image_size // 4)
    got = ours.postprocess_masks(low, input_size, original_size)
    want = orig.postprocess_masks(low, input_size, original_size)
    assert got.shape == want.shape == (3, 2, *original_size)
    assert torch.equal(got, want)


def test_mask_decoder_shares_the_image_side_across_prompts(pair, embeddings):
    """Point/box prompts of one image (no mask prompt): layer 0 projects the image tokens once,
    with the original's values; a materialised dense embedding takes the per-prompt path."""
    ours, orig = pair
    coords, labels, boxes, _ = _prompts()
    with torch.no_grad():
        sparse, dense = orig.prompt_encoder((coords, labels), boxes, None)
        assert dense.stride(0) == 0 and sparse.shape[0] > 1
        kw = dict(image_embeddings=embeddings[:1], image_pe=orig.prompt_encoder.get_dense_pe(),
                  sparse_prompt_embeddings=sparse, multimask_output=True)
        seen = []
        layer0 = ours.mask_decoder.transformer.layers[0]
        hook = layer0.cross_attn_token_to_image.k_proj.register_forward_hook(
            lambda m, inp, out: seen.append(inp[0].shape[0]))
        m1, i1 = ours.mask_decoder(dense_prompt_embeddings=dense, **kw)
        m_dense, i_dense = ours.mask_decoder(dense_prompt_embeddings=dense.contiguous(), **kw)
        hook.remove()
        m2, i2 = orig.mask_decoder(dense_prompt_embeddings=dense, **kw)
    assert seen == [1, sparse.shape[0]]
    close(m1, m2)
    close(i1, i2)
    close(m1, m_dense)
    close(i1, i_dense)


def test_mask_decoder_image_index_equals_the_original_per_image(pair, embeddings):
    """Prompts of two images in one call (image_index): layer 0 projects each image once, and
    every prompt gets the original decoder's masks for its own image; with mask prompts (a
    per-prompt dense embedding) the embeddings are gathered first, same values."""
    ours, orig = pair
    coords, labels, boxes, masks = _prompts()
    idx = torch.tensor([1, 0, 1])
    pe = orig.prompt_encoder.get_dense_pe()
    for mask_in in (None, masks):
        with torch.no_grad():
            sparse, dense = orig.prompt_encoder((coords, labels), boxes, mask_in)
            seen = []
            layer0 = ours.mask_decoder.transformer.layers[0]
            hook = layer0.cross_attn_token_to_image.k_proj.register_forward_hook(
                lambda m, inp, out: seen.append(inp[0].shape[0]))
            m1, i1 = ours.mask_decoder.predict_masks_per_prompt(embeddings, pe, sparse, dense, image_index=idx)
            hook.remove()
            for n, j in enumerate(idx.tolist()):
                m2, i2 = orig.mask_decoder(embeddings[j:j + 1], pe, sparse[n:n + 1], dense[n:n + 1], True)
                close(m1[n:n + 1, 1:], m2)
                close(i1[n:n + 1, 1:], i2)
        assert seen == ([2] if mask_in is None else [3]), seen
    with pytest.raises(ValueError, match="one entry per prompt"):
        ours.mask_decoder.predict_masks_per_prompt(embeddings, pe, sparse, dense, image_index=idx[:2])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        ours.mask_decoder.predict_masks_per_prompt(embeddings, pe, sparse, dense, image_index=idx.float())


def test_patch_embed_gemm_equals_conv():
    """Non-overlapping patches run as a GEMM: same result as the conv (also with a remainder
    smaller than a patch, which the conv drops); overlapping ones still use the conv."""
    from segment_anything_fast.modeling.image_encoder import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed((8, 8), (8, 8), (0, 0), 3, 32)
    for shape in [(2, 3, 32, 32), (1, 3, 35, 20)]:
        x = torch.randn(shape)
        ref = pe.proj(x).permute(0, 2, 3, 1)
        out = pe(x)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5), shape
    over = PatchEmbed((4, 4), (2, 2), (1, 1), 3, 8)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(over(x), over.proj(x).permute(0, 2, 3, 1))
