"""Compress mode "fp8_triton" (``segment_anything_fast.fp8_linear``) on the CPU.

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
    from segment_anything_fast.mlp_epilogue import set_mlp_epilogue
    from segment_anything_fast.quantize import compress, has_plain_weight, lin1_epilogue_possible

    g = torch.Generator().manual_seed(0)

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
    for blk in enc.blocks:
        assert type(blk.attn.qkv) is Fp8Linear and type(blk.attn.proj) is Fp8Linear
        assert blk.mlp.lin2.input_act == "gelu" and type(blk.mlp.act) is nn.Identity
    for part in (sam.prompt_encoder, sam.mask_decoder):  # untouched
        assert not any(isinstance(m, Fp8Linear) for m in part.modules())
    x = torch.randn(2, 3, 128, 128, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        a, b = ref.image_encoder(x).float(), enc(x).float()
        cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()
        assert cos > 0.999, cos
        c = torch.compile(enc, fullgraph=True)(x).float()  # no graph break: a custom op
        # (inductor's bf16 layer norms round differently from eager's, so some fp8 values flip)
        assert torch.nn.functional.cosine_similarity(c.flatten(1), a.flatten(1)).min().item() > 0.999
    try:
        compress(sam, "fp8_triton")
        raise AssertionError("compressed twice")
    except RuntimeError as e:
        assert "already compressed" in str(e)

    # a selection: lin1 alone keeps the GELU (and could not take the epilogue); lin2 alone
    # takes the GELU, and lin1 stays a plain nn.Linear
    only1 = compress(copy.deepcopy(ref), "fp8_triton", linears=("lin1",)).image_encoder.blocks[0].mlp
    assert type(only1.lin1) is Fp8Linear and type(only1.act) is nn.GELU and type(only1.lin2) is nn.Linear
    only2 = compress(copy.deepcopy(ref), "fp8_triton", linears=("lin2",))
    m2 = only2.image_encoder.blocks[0].mlp
    assert type(m2.lin1) is nn.Linear and m2.lin2.input_act == "gelu" and type(m2.act) is nn.Identity
    assert not lin1_epilogue_possible("fp8_triton", ("lin2",)) and lin1_epilogue_possible("fp8_triton", ("qkv",))
    assert not lin1_epilogue_possible("fp8", ("lin1",)) and lin1_epilogue_possible("none", ("lin1",))
    try:
        set_mlp_epilogue(only2.image_encoder, True)
        raise AssertionError("epilogue without a GELU")
    except ValueError as e:
        assert "no MLP qualifies" in str(e)
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
