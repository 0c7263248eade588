"""Compress modes "fp8_triton" and "int8_triton" (``segment_anything_fast.fp8_linear``,
``int8_linear``) on the CPU.

The kernel runs under the Triton interpreter, which must be on before the kernel is defined,
so those checks run in a child process; PyTorch's CPU ``_scaled_mm`` does the fp8 matmuls."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

_CHILD = textwrap.dedent(
    """
    import copy
    import torch
    from torch import nn
    from segment_anything_fast import fp8_linear
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.fp8_linear import FP8, Fp8Linear, quantize_rows
    from segment_anything_fast.int8_linear import Int8Linear, int8_matmul
    from segment_anything_fast.mlp_epilogue import set_mlp_epilogue
    from segment_anything_fast.quantize import compress, has_plain_weight, lin1_epilogue_possible

    g = torch.Generator().manual_seed(0)

    def raises(fn, exc, text):
        try:
            fn()
        except exc as e:
            assert text in str(e), str(e)
            return
        raise AssertionError(f"no {exc.__name__} saying {text!r}")

    def min_cos(a, b):
        return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()

    def reference(x, act):
        x = x.float()
        if act == "gelu":
            x = torch.nn.functional.gelu(x, approximate="tanh")  # the kernel's form
        s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        return (x * (1.0 / s)).clamp(-448, 448).to(FP8), s  # the kernel multiplies by 1 / s

    # the kernel against PyTorch's own cast: widths of one column tile (128), two (96 = 64 +
    # 32, 1280 = 1024 + 256) and two with a masked tail (112 = 64 + 48 of 64)
    assert fp8_linear._launch_config(1280)["KA"] == 1024 and fp8_linear._launch_config(1280)["KB"] == 256
    for k in (128, 96, 112, 1280):
        for dt in (torch.float32, torch.bfloat16):
            for act in ("none", "gelu"):
                x = (torch.randn(37, k, generator=g) * 5).to(dt)
                x[3] = 0  # an all-zero row: scale eps, values 0, no NaN
                x[7, 5] = 1e4  # an outlier sets its row's scale
                q, s = quantize_rows(x, act)
                rq, rs = reference(x, act)
                assert q.dtype == FP8 and q.shape == x.shape and s.shape == (37, 1) and s.dtype == torch.float32
                if act == "none":  # the same float32 arithmetic: the same values (a -0 may come out +0)
                    assert torch.allclose(s, rs, rtol=1e-6, atol=0), (k, dt, act)
                    assert torch.equal(q.float(), rq.float()), (k, dt, act)
                else:  # exp2 and PyTorch's tanh differ in the last bits: one fp8 step at most
                    assert torch.allclose(s, rs, rtol=1e-5, atol=0), (k, dt, act)
                    d = (q.float() - rq.float()).abs()
                    assert (d <= rq.float().abs() * 2**-3 + 2**-9).all() and (d == 0).float().mean() > 0.99, (k, dt, act)
                assert not q.float().isnan().any() and q[3].float().abs().max() == 0
    # with a layer norm first (float32 statistics, masked tail columns excluded): the same
    # values as PyTorch's layer norm then the cast, one fp8 step at most
    for k in (96, 112, 1280):
        for act in ("none", "gelu"):
            x = (torch.randn(19, k, generator=g) * 3 + 1).to(torch.bfloat16)
            w, b = torch.randn(k, generator=g) * 0.3 + 1, torch.randn(k, generator=g) * 0.3
            q, s = quantize_rows(x, act, (w.to(torch.bfloat16), b.to(torch.bfloat16), 1e-6))
            y = torch.nn.functional.layer_norm(x.float(), (k,), w.to(torch.bfloat16).float(),
                                               b.to(torch.bfloat16).float(), 1e-6)
            rq, rs = reference(y, act)
            assert torch.allclose(s, rs, rtol=1e-5, atol=0), (k, act)
            d = (q.float() - rq.float()).abs()
            assert (d <= rq.float().abs() * 2**-3 + 2**-9).all() and (d == 0).float().mean() > 0.99, (k, act)
    raises(lambda: quantize_rows(x, "none", (w[:5], b, 1e-6)), ValueError, "must both be (1280,)")
    # with a residual added first: the bf16 sum comes back, and the rows quantized are its norm
    r = (torch.randn(19, 1280, generator=g) * 2).to(torch.bfloat16)
    nrm = (w.to(torch.bfloat16), b.to(torch.bfloat16), 1e-6)
    q, s, total = quantize_rows(x, "none", nrm, residual=r)
    assert total.dtype == torch.bfloat16 and torch.equal(total, x + r)
    q0, s0 = quantize_rows(x + r, "none", nrm)
    assert torch.equal(q.float(), q0.float()) and torch.equal(s, s0)
    raises(lambda: quantize_rows(x, "none", nrm, residual=r[:3]), ValueError, "residual must be (19, 1280)")
    # a strided input (a column slice) is read through its strides
    x = torch.randn(20, 160, generator=g)[:, 16:112]
    q, s = quantize_rows(x, "none")
    assert torch.equal(q.float(), reference(x, "none")[0].float())

    # the linear: weight per output row, the matmul close to the bf16 linear
    lin = nn.Linear(96, 48).to(torch.bfloat16)
    f = Fp8Linear.from_linear(lin)
    assert f.weight.dtype == FP8 and f.weight_scale.shape == (1, 48) and not has_plain_weight(f)
    x = torch.randn(2, 5, 96, generator=g).to(torch.bfloat16)
    y, r = f(x), lin(x)
    assert y.shape == r.shape and y.dtype == torch.bfloat16
    assert ((y.float() - r.float()).norm() / r.float().norm()).item() < 0.06

    # the whole encoder: GELU moved into lin2's quantization, outputs close to bf16
    sam = build_sam("tiny").eval().to(torch.bfloat16)
    ref = copy.deepcopy(sam)
    compress(sam, "fp8_triton")
    enc = sam.image_encoder
    for blk, rblk in zip(enc.blocks, ref.image_encoder.blocks):
        assert type(blk.attn.qkv) is Fp8Linear and type(blk.attn.proj) is Fp8Linear
        assert blk.mlp.lin2.input_act == "gelu" and type(blk.mlp.act) is nn.Identity
        # the layer norms moved into the quantization of qkv / lin1's inputs, and with them
        # the residual adds (fp8 has no epilogue for them)
        assert type(blk.norm1) is nn.Identity and type(blk.norm2) is nn.Identity and blk.defer_residual
        assert torch.equal(blk.attn.qkv.norm_weight, rblk.norm1.weight) and blk.attn.qkv.norm_eps == rblk.norm1.eps
        assert torch.equal(blk.mlp.lin1.norm_bias, rblk.norm2.bias) and blk.attn.proj.norm_weight is None
    for part in (sam.prompt_encoder, sam.mask_decoder):  # untouched
        assert not any(isinstance(m, Fp8Linear) for m in part.modules())
    x = x_img = torch.randn(2, 3, 128, 128, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        a, b = ref.image_encoder(x).float(), enc(x).float()
        a_img = a
        assert min_cos(a, b) > 0.999, min_cos(a, b)
        c = torch.compile(enc, fullgraph=True)(x).float()  # no graph break: a custom op
        # (inductor's bf16 layer norms round differently from eager's, so some fp8 values flip)
        assert min_cos(c, a) > 0.999
        # the deferred adds give exactly the values of adding in place (bf16 sums, same rows)
        for blk in enc.blocks:
            blk.defer_residual = False
        assert torch.equal(enc(x), b.to(torch.bfloat16))
        for blk in enc.blocks:
            blk.defer_residual = True
    raises(lambda: compress(sam, "fp8_triton"), RuntimeError, "already compressed (fp8_triton linears)")

    # a selection: lin1 alone keeps the GELU (and could not take the epilogue); lin2 alone
    # takes the GELU, and lin1 stays a plain nn.Linear
    blk1 = compress(copy.deepcopy(ref), "fp8_triton", linears=("lin1",)).image_encoder.blocks[0]
    only1 = blk1.mlp
    assert not blk1.defer_residual  # qkv stays plain: the adds stay where they are
    assert type(only1.lin1) is Fp8Linear and type(only1.act) is nn.GELU and type(only1.lin2) is nn.Linear
    assert only1.lin1.norm_weight is not None
    assert type(compress(copy.deepcopy(ref), "fp8_triton", linears=("proj",)).image_encoder.blocks[0].norm1) is nn.LayerNorm
    # from_linear with a norm: the same as the norm then the linear
    ln = ref.image_encoder.blocks[0].norm1
    lin = ref.image_encoder.blocks[0].attn.qkv
    xin = torch.randn(6, lin.in_features, generator=g).to(torch.bfloat16) * 4
    y1 = Fp8Linear.from_linear(lin, input_norm=ln)(xin).float()
    y0 = lin(ln(xin)).float()
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.06
    raises(lambda: Fp8Linear.from_linear(lin, input_norm=nn.LayerNorm(lin.in_features, elementwise_affine=False)),
           ValueError, "with a weight and a bias")
    only2 = compress(copy.deepcopy(ref), "fp8_triton", linears=("lin2",))
    m2 = only2.image_encoder.blocks[0].mlp
    assert type(m2.lin1) is nn.Linear and m2.lin2.input_act == "gelu" and type(m2.act) is nn.Identity
    assert not lin1_epilogue_possible("fp8_triton", ("lin2",)) and lin1_epilogue_possible("fp8_triton", ("qkv",))
    assert not lin1_epilogue_possible("fp8", ("lin1",)) and lin1_epilogue_possible("none", ("lin1",))
    raises(lambda: set_mlp_epilogue(only2.image_encoder, True), ValueError, "no MLP qualifies")

    # int8: the row kernel rounds to nearest, the matmul is exact in int32 with the scales and
    # bias applied in float32 (K = 96 is not a multiple of the K tile: the masked path)
    x = torch.randn(37, 96, generator=g) * 3
    x[3] = 0
    q, s = quantize_rows(x, "none", dtype=torch.int8)
    rs = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    assert q.dtype == torch.int8 and torch.allclose(s, rs, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), torch.round(x * (1.0 / rs)).clamp(-127, 127)) and (q[3] == 0).all()
    q, s = quantize_rows(torch.tensor([[127.0, 2.5, -3.5, 0.5, -1.5]]), "none", dtype=torch.int8)
    assert q.tolist() == [[127, 2, -4, 0, -2]] and s.item() == 1.0  # halves to even, like torch.round
    for m, n, k in ((37, 48, 96), (70, 272, 256)):
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        sa, sw, b = torch.rand(m, 1, generator=g), torch.rand(1, n, generator=g), torch.randn(n, generator=g)
        want = (a.int() @ w.int().t()).float() * sa * sw
        assert torch.allclose(int8_matmul(a, sa, w, sw, b, torch.float32), want + b, rtol=1e-6, atol=1e-4)
        assert torch.allclose(int8_matmul(a, sa, w, sw, None, torch.float32), want, rtol=1e-6, atol=1e-4)
        r = torch.randn(m, n, generator=g)  # the residual add in the epilogue; TMA and pointer loads
        assert torch.allclose(int8_matmul(a, sa, w, sw, b, torch.float32, r), want + b + r, rtol=1e-6, atol=1e-4)
        for tma in (True, False):
            got = int8_matmul(a, sa, w, sw, b, torch.float32, r, config=dict(TMA=tma, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64))
            assert torch.allclose(got, want + b + r, rtol=1e-6, atol=1e-4), tma
        c = int8_matmul(a, sa, w, sw, b.to(torch.bfloat16), torch.bfloat16)
        bf = b.to(torch.bfloat16).float()
        assert c.dtype == torch.bfloat16 and torch.allclose(c.float(), want + bf, rtol=1e-2, atol=1e-2)
    for bad in ((a.float(), sa, w, sw), (a, sa[:5], w, sw), (a, sa, w, sw, None, torch.float32, r[:3])):
        raises(lambda: int8_matmul(*bad), ValueError, "int8_matmul")
    # the linears take the block's residual: int8 adds it in the epilogue, fp8 after the matmul
    lin = nn.Linear(96, 48).to(torch.bfloat16)
    xin, res = torch.randn(3, 96, generator=g).to(torch.bfloat16), torch.randn(3, 48, generator=g).to(torch.bfloat16)
    for cls in (Int8Linear, Fp8Linear):
        f = cls.from_linear(lin)
        assert f.takes_residual and torch.allclose(f(xin, residual=res).float(), (f(xin) + res).float(), atol=0.04)
    sam8 = compress(copy.deepcopy(ref), "int8_triton")
    blk = sam8.image_encoder.blocks[0]
    assert type(blk.attn.qkv) is Int8Linear and blk.attn.qkv.weight.dtype == torch.int8
    assert type(blk.norm1) is nn.Identity and blk.mlp.lin2.input_act == "gelu" and not blk.defer_residual
    with torch.no_grad():
        c8 = torch.compile(sam8.image_encoder, fullgraph=True)(x_img).float()
    assert min_cos(c8, a_img) > 0.999
    raises(lambda: compress(sam8, "fp8_triton"), RuntimeError, "already compressed (int8_triton linears)")
    print("OK")
    """
)


def test_fp8_triton_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_fp8_triton_needs_a_gpu_and_bf16(monkeypatch):
    from segment_anything_fast.build_sam import build_sam
    from segment_anything_fast.fp8_linear import Fp8Linear, quantize_rows
    from segment_anything_fast.quantize import compress

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sam = build_sam("tiny").eval()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"'fp8_triton'.*capability >= 8\.9.*on cpu.*bfloat16 weights.*float32"):
        compress(sam, "fp8_triton")
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())  # nothing half-done
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        Fp8Linear.from_linear(nn.Linear(32, 16).to(torch.bfloat16))(torch.randn(3, 32).to(torch.bfloat16))
    with pytest.raises(ValueError, match="act must be one of"):
        quantize_rows(torch.randn(4, 32), "relu")
    with pytest.raises(ValueError, match="2-D float tensor"):
        quantize_rows(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(nn.Linear(30, 16))
    with pytest.raises(ValueError, match="input_act"):
        Fp8Linear.from_linear(nn.Linear(32, 16), input_act="tanh")
