"""The fused mask-upscaling kernel (``upscaling="triton"``) against the original module chain.

Every launch variant of the kernel is checked too. As for the attention kernel, the Triton interpreter must be on before the kernel is defined, so
the comparisons run in a child process (fp32 and fp16: the interpreter mishandles bfloat16).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_CHILD = textwrap.dedent(
    """
    import torch
    from segment_anything_fast.fused_upscale import fused_upscale_masks
    from segment_anything_fast.modeling.mask_decoder import MaskDecoder
    from segment_anything_fast.modeling.transformer import TwoWayTransformer

    def decoder(c, dt, seed):
        torch.manual_seed(seed)
        dec = MaskDecoder(transformer_dim=c, transformer=TwoWayTransformer(
            depth=1, embedding_dim=c, mlp_dim=64, num_heads=4))
        for p in dec.parameters():  # away from the init's ones/zeros, so every weight matters
            p.data.normal_(0, 0.2)
        return dec.to(dt).eval()

    def both(dec, *args):
        dec.set_upscaling("conv")
        ref = dec.upscale_masks(*args)
        dec.set_upscaling("triton")
        return dec.upscale_masks(*args), ref

    cases = [  # channels, grid h, w, batch, dtype, tolerance (relative L2)
        (128, 8, 8, 3, torch.float32, 1e-5),
        (256, 4, 8, 2, torch.float32, 1e-5),    # non-square grid, vit width
        (128, 5, 3, 2, torch.float32, 1e-5),    # token count not a multiple of the block
        (128, 8, 8, 2, torch.float16, 5e-3),
    ]
    # launch variants (fused_upscale.DEFAULT_CONFIG); BLOCK 8 divides the 8-wide grids, so the
    # row stores take the one-run-per-row (ALIGNED) path there and the masked path elsewhere
    variants = [
        None,  # the custom op with the default config
        dict(ROUND=True, ROW_STORE=False, WIDE=False),  # the plain variant, rounding like the modules
        dict(ROW_STORE=True),
        dict(ROW_STORE=True, HOIST_W=True, BLOCK=8),
        dict(WIDE=True),
        dict(WIDE=True, ROW_STORE=True, BLOCK=8),
        dict(WIDE=True, ROW_STORE=True, HOIST_W=True, BLOCK=16, BLOCKS_PER_PROG=3),  # tail program
        dict(ROUND=False, HOIST_W=True, BLOCK=16, BLOCKS_PER_PROG=2),
        dict(ROUND=False, WIDE=True, ROW_STORE=True, BLOCK=8),
    ]
    for i, (c, h, w, b, dt, tol) in enumerate(cases):
        dec = decoder(c, dt, i)
        src = torch.randn(b, h * w, c).to(dt)
        tok = torch.randn(b, 4, c).to(dt)
        out, ref = both(dec, src, tok, w)
        hyper = torch.stack([m(tok[:, j]) for j, m in enumerate(dec.output_hypernetworks_mlps)], 1)
        for cfg in variants:
            if cfg is not None:
                out = fused_upscale_masks(dec.output_upscaling, src, hyper, w, cfg)
            assert out.shape == ref.shape == (b, 4, 4 * h, 4 * w) and out.dtype == dt, (i, cfg, out.shape)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < tol, (i, cfg, err)
            assert ((out > 0) == (ref > 0)).double().mean() > 0.99, (i, cfg)
    try:
        fused_upscale_masks(dec.output_upscaling, src, hyper, w, dict(ROWSTORE=True))
        raise AssertionError("unknown config key accepted")
    except ValueError as e:
        assert "ROWSTORE" in str(e)

    # one image's tokens shared by all prompts (batch stride 0), as predict_masks passes them
    dec = decoder(128, torch.float32, 7)
    src = torch.randn(1, 16, 128).expand(3, -1, -1)
    out, ref = both(dec, src, torch.randn(3, 4, 128), 4)
    assert (out - ref).abs().max() < 1e-4
    # and through the whole decoder, single- and multi-mask, and a traced (compiled) call
    img, pe = torch.randn(1, 128, 4, 4), torch.randn(1, 128, 4, 4)
    sparse, dense = torch.randn(3, 2, 128), torch.randn(3, 128, 4, 4)
    for multi in (True, False):
        outs = []
        for mode in ("conv", "triton"):
            dec.set_upscaling(mode)
            outs.append(dec(img, pe, sparse, dense, multi))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-4) and torch.equal(outs[0][1], outs[1][1])
    traced = torch.compile(dec, backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # inference only: the op has no backward
        assert torch.allclose(traced(img, pe, sparse, dense, True)[0], dec(img, pe, sparse, dense, True)[0], atol=1e-5)
    print("OK")
    """
)


def test_fused_upscale_matches_modules_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_set_upscaling_rejects_bad_values():
    from segment_anything_fast.modeling.mask_decoder import MaskDecoder
    from segment_anything_fast.modeling.transformer import TwoWayTransformer

    dec = MaskDecoder(transformer_dim=96, transformer=TwoWayTransformer(depth=1, embedding_dim=96, mlp_dim=32, num_heads=4))
    with pytest.raises(ValueError, match="'conv' or 'triton'"):
        dec.set_upscaling("fused")
    with pytest.raises(ValueError, match="power-of-two transformer_dim"):
        dec.set_upscaling("triton")
    assert dec.upscaling == "conv"


def test_fused_upscale_refuses_cpu_without_interpreter():
    from segment_anything_fast.fused_upscale import _launch

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter is on in this process")
    w1, w2 = torch.randn(128, 32, 2, 2), torch.randn(32, 16, 2, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        _launch(torch.randn(1, 4, 128), torch.randn(1, 4, 16), w1, torch.zeros(32), torch.ones(32),
                torch.zeros(32), 1e-6, w2, torch.zeros(16), 2)


def test_builder_picks_conv_upscaling_on_cpu():
    from segment_anything_fast import build_sam_fast

    with pytest.raises(ValueError, match="upscaling='triton' needs device='cuda'"):
        build_sam_fast("demo", device="cpu", upscaling="triton", compile_mode=None, decoder_compile_mode=None)
    sam = build_sam_fast("demo", device="cpu", dtype=None, compile_mode=None, decoder_compile_mode=None)
    assert sam.mask_decoder.upscaling == "conv"


def test_kernels_use_torchs_ptxas(monkeypatch):
    """Our kernels compile with torch's ptxas when torch ships one (as torch.compile does): with
    Triton's bundled one, kernels compiled before any inductor compile faulted on the H100."""
    import pathlib

    from segment_anything_fast import triton_env

    ptxas = pathlib.Path(torch.__file__).parent / "bin" / "ptxas"
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    triton_env.use_torch_ptxas.cache_clear()
    try:  # torch's helper caches too
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

        _set_triton_ptxas_path.cache_clear()
    except ImportError:
        pass
    triton_env.use_torch_ptxas()
    if ptxas.is_file():
        assert os.environ["TRITON_PTXAS_PATH"] == str(ptxas)
    else:
        assert "TRITON_PTXAS_PATH" not in os.environ


def test_default_launch_falls_back_when_out_of_shared_memory(monkeypatch):
    """A GPU whose shared memory the default launch does not fit gets the plain variant (CPU:
    a stub kernel that refuses the wide variant as Triton would)."""
    from triton.runtime.errors import OutOfResources

    from segment_anything_fast import fused_upscale as fu
    from segment_anything_fast.modeling.mask_decoder import MaskDecoder
    from segment_anything_fast.modeling.transformer import TwoWayTransformer

    launches = []

    class StubKernel:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["WIDE"])
                if kw["WIDE"]:
                    raise OutOfResources(300000, 232448, "shared memory")
            return launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fu, "_upscale_masks_fwd", StubKernel())
    monkeypatch.setattr(fu, "_use_fallback", False)
    dec = MaskDecoder(transformer_dim=128, transformer=TwoWayTransformer(
        depth=1, embedding_dim=128, mlp_dim=64, num_heads=4)).eval()
    conv1, ln, _, conv2, _ = dec.output_upscaling
    args = (torch.zeros(2, 16, 128), torch.zeros(2, 4, 16), conv1.weight, conv1.bias, ln.weight,
            ln.bias, 1e-6, conv2.weight, conv2.bias, 4)
    assert fu._launch(*args).shape == (2, 4, 16, 16)
    assert launches == [True, False] and fu._use_fallback
    fu._launch(*args)  # later calls go straight to the fallback
    assert launches == [True, False, False]
    with pytest.raises(OutOfResources):  # an explicit config is not replaced
        fu._launch(*args, config=dict(WIDE=True))
