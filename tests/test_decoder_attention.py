"""The mask decoder's Triton attention (``decoder_attention="triton"``) against a float64
reference and against the SDPA decoder, on CPU via TRITON_INTERPRET=1 (in a child process: the
interpreter must be on before the kernel is defined; fp32 and fp16, as it mishandles bf16)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from segment_anything_fast.modeling.mask_decoder import MaskDecoder  # noqa: E402
from segment_anything_fast.modeling.transformer import TwoWayTransformer  # noqa: E402

_CHILD = textwrap.dedent(
    """
    import torch
    from segment_anything_fast.decoder_attention import decoder_attention, kernel_config
    from segment_anything_fast.modeling.mask_decoder import MaskDecoder
    from segment_anything_fast.modeling.transformer import TwoWayTransformer

    def ref(q, k, v, nh):
        B = max(q.shape[0], k.shape[0])
        split = lambda x: x.double().reshape(x.shape[0], x.shape[1], nh, -1).transpose(1, 2).expand(B, -1, -1, -1)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, q.shape[2], -1)

    cases = [  # Bq, Bk, M, N, heads, head dim, dtype, tolerance
        (3, 3, 7, 300, 2, 16, torch.float32, 1e-5),   # tokens -> image, 3 key blocks, masked tail
        (3, 1, 7, 300, 2, 16, torch.float32, 1e-5),   # keys shared by every prompt (layer 0)
        (1, 3, 200, 7, 2, 16, torch.float32, 1e-5),   # image -> tokens, queries shared
        (2, 2, 7, 7, 2, 32, torch.float32, 1e-5),     # token self-attention
        (2, 2, 7, 300, 2, 16, torch.float16, 2e-3),
    ]
    for i, (bq, bk, M, N, nh, d, dt, tol) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        q = (torch.randn(bq, M, nh * d, generator=g) * 2).to(dt)
        k = (torch.randn(bk, N, nh * d, generator=g) * 2).to(dt)
        v = torch.randn(bk, N, nh * d, generator=g).to(dt)
        out = decoder_attention(q, k, v, nh)
        r = ref(q, k, v, nh)
        assert out.dtype == dt and out.shape == r.shape, (i, out.shape, r.shape)
        err = ((out.double() - r).norm() / r.norm()).item()
        assert err < tol, (i, err)
    # heads really are separate: the same tensors read as one head give another result
    assert (decoder_attention(q, k, v, 1).double() - ref(q, k, v, 1)).norm() / ref(q, k, v, 1).norm() < tol
    assert (decoder_attention(q, k, v, 1) - out).abs().max() > 1e-2
    # strided (non-contiguous) inputs, as slices of a wider tensor
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(2, 50, 96, generator=g)
    q, k, v = wide[:, :7, :32], wide[:, :, 32:64], wide[:, :, 64:]
    assert ((decoder_attention(q, k, v, 2).double() - ref(q, k, v, 2)).norm() / ref(q, k, v, 2).norm()) < 1e-5
    assert kernel_config(7, 4096, 16)["BLOCK_M"] == 16 and kernel_config(4096, 7, 16)["BLOCK_N"] == 16
    # one row per image on one side, an index per prompt: equals the gathered rows
    g = torch.Generator().manual_seed(8)
    idx = torch.tensor([2, 0, 0, 1, 2])
    for M, N, side in ((7, 300, "kv"), (200, 7, "q")):
        q = torch.randn(3 if side == "q" else 5, M, 32, generator=g) * 2
        k = torch.randn(3 if side == "kv" else 5, N, 32, generator=g) * 2
        v = torch.randn(k.shape, generator=g)
        if side == "q":
            out, r = decoder_attention(q, k, v, 2, q_index=idx), ref(q[idx], k, v, 2)
        else:
            out, r = decoder_attention(q, k, v, 2, kv_index=idx), ref(q, k[idx], v[idx], 2)
        assert out.shape == r.shape and ((out.double() - r).norm() / r.norm()).item() < 1e-5, side
        wrong = ref(q[idx.flip(0)], k, v, 2) if side == "q" else ref(q, k[idx.flip(0)], v[idx.flip(0)], 2)
        assert ((out.double() - wrong).norm() / wrong.norm()).item() > 1e-2, side
    # a strided index (a column of a wider table) reads the same rows
    table = torch.stack([idx, idx.flip(0)], 1)
    out2 = decoder_attention(q, k, v, 2, q_index=table[:, 0])
    assert torch.equal(out2, decoder_attention(q, k, v, 2, q_index=idx))
    # a batch-1 side with an index broadcasts
    out = decoder_attention(q[:1], k, v, 2, q_index=torch.zeros(5, dtype=torch.long))
    assert ((out.double() - ref(q[:1], k, v, 2)).norm() / out.norm()).item() < 1e-5

    # the whole decoder: same masks and IoU as with SDPA, for one image's prompts (layer 0's
    # image side computed once and broadcast) and for one embedding per prompt
    torch.manual_seed(0)
    dec = MaskDecoder(transformer_dim=128, transformer=TwoWayTransformer(
        depth=2, embedding_dim=128, mlp_dim=64, num_heads=4)).eval()
    for p in dec.parameters():
        p.data.normal_(0, 0.2)
    for n_img in (1, 3):
        emb, pe = torch.randn(n_img, 128, 6, 6), torch.randn(1, 128, 6, 6)
        sparse, dense = torch.randn(3, 4, 128), torch.randn(3, 128, 6, 6)
        dense = dense[:1] if n_img == 1 else dense  # batch 1: broadcast over the prompts
        outs = []
        for backend in ("sdpa", "triton"):
            dec.transformer.set_attention(backend)
            with torch.no_grad():
                outs.append(dec.predict_masks_per_prompt(emb, pe, sparse, dense))
        (m0, i0), (m1, i1) = outs
        assert ((m1 - m0).norm() / m0.norm()).item() < 1e-5, n_img
        assert ((i1 - i0).norm() / i0.norm()).item() < 1e-5, n_img
    # prompts of 3 images, one embedding row per image and an index per prompt (eval_combo's
    # packed batches): both backends equal the SDPA decoder on the gathered embeddings
    emb, idx = torch.randn(3, 128, 6, 6), torch.tensor([1, 0, 2, 1])
    sparse, dense = torch.randn(4, 4, 128), torch.randn(1, 128, 6, 6).expand(4, -1, -1, -1)
    dec.transformer.set_attention("sdpa")
    with torch.no_grad():
        m0, i0 = dec.predict_masks_per_prompt(emb[idx], pe, sparse, dense)
    for backend in ("sdpa", "triton"):
        dec.transformer.set_attention(backend)
        with torch.no_grad():
            m1, i1 = dec.predict_masks_per_prompt(emb, pe, sparse, dense, image_index=idx)
        assert ((m1 - m0).norm() / m0.norm()).item() < 1e-5, backend
        assert ((i1 - i0).norm() / i0.norm()).item() < 1e-5, backend
    print("OK")
    """
)


def test_decoder_attention_kernel_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_set_attention_checks_backend_and_head_dims():
    small = TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=16, num_heads=4)  # head dims 8, 4
    with pytest.raises(ValueError, match="power-of-two head dims"):
        small.set_attention("triton")
    assert all(getattr(m, "backend", "sdpa") == "sdpa" for m in small.modules())
    with pytest.raises(ValueError, match="'sdpa' or 'triton'"):
        small.set_attention("flash")


def test_triton_decoder_attention_needs_cuda_tensors():
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    from segment_anything_fast.decoder_attention import decoder_attention

    q = torch.randn(1, 7, 32)
    with pytest.raises(RuntimeError, match="decoder_attention='sdpa'"):
        decoder_attention(q, q, q, 2)


def test_fast_builder_rejects_triton_decoder_attention_on_cpu():
    from segment_anything_fast.build_sam_fast import build_sam_fast

    with pytest.raises(ValueError, match="decoder_attention='triton' needs device='cuda'"):
        build_sam_fast("tiny", device="cpu", decoder_attention="triton", compile_mode=None,
                       decoder_compile_mode=None)


def test_decoder_attention_index_checks():
    from segment_anything_fast.decoder_attention import check_shapes

    q, k = torch.zeros(3, 7, 32), torch.zeros(2, 50, 32)
    check_shapes(q, k, k, 2, kv_index=torch.tensor([0, 1, 1]))  # 3 prompts over 2 images
    with pytest.raises(ValueError, match="kv_index must be a 1-D int32/int64"):
        check_shapes(q, k, k, 2, kv_index=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="q_index must be a 1-D"):
        check_shapes(q, k, k, 2, q_index=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch sizes 3 and 4 differ"):
        check_shapes(q, k, k, 2, kv_index=torch.tensor([0, 1, 1, 0]))
