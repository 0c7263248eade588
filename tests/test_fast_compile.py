"""compile.py and build_sam_fast.py on the CPU (TINY models; eager/aot_eager compile backends)."""
import pytest
import torch

from oracle import TINY, build_pair
from segment_anything_fast.build_sam_fast import build_sam_fast, sam_model_fast_registry
from segment_anything_fast.compile import (
    BucketedMaskDecoder,
    StaticBatchEncoder,
    cast_model,
    compile_image_encoder,
    compile_mask_decoder,
    make_fast,
    set_attention_backend,
)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=g)


def _prompts(sam, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, 2, 2, generator=g) * TINY.image_size
    labels = torch.randint(0, 2, (n, 2), generator=g)
    return sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)


def test_cast_and_backend():
    ours, _ = build_pair()
    cast_model(ours, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.pixel_mean.dtype == torch.float32
    assert set_attention_backend(ours.image_encoder, "flex") == TINY.encoder_depth
    assert {b.attn.backend for b in ours.image_encoder.blocks} == {"flex"}
    with pytest.raises(ValueError, match="Unknown attention backend"):
        set_attention_backend(ours.image_encoder, "nope")
    with pytest.raises(ValueError, match="no image-encoder Attention"):
        set_attention_backend(ours.mask_decoder, "flex")
    with pytest.raises(TypeError, match="floating"):
        cast_model(ours, torch.int8)


@pytest.mark.parametrize("regional", [False, True])
def test_compiled_encoder_fullgraph_flex_matches_original(regional):
    """fullgraph=True (raises on any graph break) with the flex backend; padded static batch."""
    ours, orig = build_pair()
    set_attention_backend(ours.image_encoder, "flex")
    enc = compile_image_encoder(
        ours.image_encoder, mode="default", batch_size=3, regional=regional, backend="aot_eager"
    )
    assert isinstance(enc, StaticBatchEncoder) and enc.img_size == TINY.image_size
    x = _images(5)
    with torch.no_grad():
        ref = orig.image_encoder(x)
        for n in (1, 3, 5):  # padded, exact, chunked (3 + 2 padded)
            out = enc(x[:n])
            assert out.shape == ref[:n].shape
            torch.testing.assert_close(out, ref[:n], atol=2e-5, rtol=1e-4)


def test_static_batch_encoder_rejects_bad_input():
    ours, _ = build_pair()
    with pytest.raises(ValueError, match="batch_size"):
        StaticBatchEncoder(ours.image_encoder, ours.image_encoder, 0, False)
    enc = StaticBatchEncoder(ours.image_encoder, ours.image_encoder, 2, False)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(3, 128, 128))
    with pytest.raises(ValueError, match="compile mode"):
        compile_image_encoder(ours.image_encoder, mode="fastest")


def test_bucketed_decoder_pads_and_chunks():
    ours, orig = build_pair()
    dec = compile_mask_decoder(ours.mask_decoder, mode="default", buckets=(2, 4), backend="eager")
    assert isinstance(dec, BucketedMaskDecoder) and dec.num_mask_tokens == 4
    emb = orig.image_encoder(_images(1)).detach()
    pe = ours.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for n in (1, 3, 4, 7):
            sparse, dense = _prompts(ours, n, seed=n)
            ref_m, ref_i = orig.mask_decoder(emb, pe, sparse, dense, True)
            assert n == 1 or dense.stride(0) == 0  # no mask prompts: one shared dense embedding
            for d in (dense, dense.contiguous()):  # padded as a broadcast / with zero rows
                m, i = dec(emb, pe, sparse, d, True)
                assert m.shape == ref_m.shape and i.shape == ref_i.shape
                torch.testing.assert_close(m, ref_m, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(i, ref_i, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="same batch size"):
        dec(emb, pe, sparse, dense[:1], True)


def test_wrappers_keep_state_dict_keys():
    ours, orig = build_pair()
    keys = set(ours.state_dict())
    make_fast(ours, dtype=None, attention="flex", compile_mode="default", decoder_mode="default")
    assert isinstance(ours.image_encoder, StaticBatchEncoder)
    assert set(ours.state_dict()) == keys
    sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in orig.state_dict().items()}
    ours.load_state_dict(sd)
    w = ours.image_encoder.inner.blocks[0].attn.qkv.weight
    torch.testing.assert_close(w, sd["image_encoder.blocks.0.attn.qkv.weight"])


def test_build_sam_fast_cpu_bf16_matches_original():
    _, orig = build_pair()
    sam = build_sam_fast(
        TINY, dtype=torch.bfloat16, compile_mode=None, decoder_compile_mode=None, device="cpu"
    )
    assert {b.attn.backend for b in sam.image_encoder.blocks} == {"flex"}  # auto on the CPU
    assert not sam.training
    sam.load_state_dict(orig.state_dict())
    x = _images(2, seed=4)
    with torch.no_grad():
        ref = orig.image_encoder(x)
        out = sam.image_encoder(x).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99


def test_build_sam_fast_errors():
    assert set(sam_model_fast_registry) == {"default", "vit_h", "vit_l", "vit_b", "demo"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            build_sam_fast(TINY, device="cuda")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        build_sam_fast(TINY, attention="triton", device="cpu", compile_mode=None)
    with pytest.raises(ValueError, match="Unknown attention backend"):
        build_sam_fast(TINY, attention="fast!", device="cpu", compile_mode=None)
    with pytest.raises(ValueError, match="not a valid torch device"):
        build_sam_fast(TINY, device="gpu0", compile_mode=None)


def test_build_sam_fast_compress_int8_matches_uncompressed(tmp_path):
    _, orig = build_pair()
    ckpt = tmp_path / "tiny.pth"
    torch.save(orig.state_dict(), ckpt)
    kw = dict(dtype=None, attention="sdpa", compile_mode=None, decoder_compile_mode=None,
              device="cpu")
    plain = build_sam_fast(TINY, ckpt, **kw)
    sam = build_sam_fast(TINY, ckpt, compress="int8_dynamic", **kw)
    qkv = sam.image_encoder.blocks[0].attn.qkv.weight
    assert type(qkv) is not type(plain.image_encoder.blocks[0].attn.qkv.weight)  # torchao tensor
    x = _images(2, seed=5)
    with torch.no_grad():
        ref, out = plain.image_encoder(x), sam.image_encoder(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99
    with pytest.raises(ValueError, match="compress"):
        build_sam_fast(TINY, ckpt, compress="int4_magic", **kw)


def test_compiled_postprocess_gives_the_eager_masks():
    """compile_postprocess (inductor on the CPU): the predictor's bool masks equal the eager
    ones; logits agree to float rounding."""
    import numpy as np

    from segment_anything_fast import SamPredictor
    from segment_anything_fast.compile import compile_postprocess

    ours, _ = build_pair()
    pred = SamPredictor(ours.eval())
    hw = (50, 70)
    pred.set_image((np.random.default_rng(0).random((*hw, 3)) * 255).astype(np.uint8))
    coords = pred.transform.apply_coords_torch(torch.tensor([[[10.0, 20.0]], [[30.0, 5.0]]]), hw)
    labels = torch.ones(2, 1, dtype=torch.int)
    ref, ref_logits = (pred.predict_torch(coords, labels, return_logits=r)[0] for r in (False, True))
    compile_postprocess(ours)
    masks, logits = (pred.predict_torch(coords, labels, return_logits=r)[0] for r in (False, True))
    assert masks.dtype == torch.bool and masks.shape == (2, 3, *hw) and torch.equal(masks, ref)
    assert ref.any() and not ref.all()  # a real threshold, not a trivially equal mask
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
