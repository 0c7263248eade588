"""mlp_epilogue: lin1 + activation as one GEMM with a bias + activation epilogue (CPU, TINY)."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from oracle import TINY, build_pair
from segment_anything_fast.build_sam_fast import build_sam_fast
from segment_anything_fast.compile import compile_image_encoder, make_fast, set_attention_backend
from segment_anything_fast.mlp_epilogue import epilogue_supported, set_mlp_epilogue
from segment_anything_fast.modeling.common import MLPBlock


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(fn):
    with _Ops() as rec:
        fn()
    return rec.names


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_fused_mlp_matches_and_uses_one_gemm(act):
    torch.manual_seed(0)
    mlp = MLPBlock(32, 128, act)
    x = torch.randn(2, 5, 7, 32) * 3
    with torch.no_grad():
        ref = mlp(x)
        assert "_addmm_activation" not in _ops(lambda: mlp(x))
        assert set_mlp_epilogue(mlp, True) == 1 and mlp.fused_epilogue
        names = _ops(lambda: mlp(x))
        out = mlp(x)
    assert "_addmm_activation" in names and not names & {"gelu", "relu"}
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # exact GELU on the CPU
    set_mlp_epilogue(mlp, False)
    assert not mlp.fused_epilogue


def test_encoder_with_epilogue_compiles_fullgraph_and_matches():
    ours, orig = build_pair()
    assert set_mlp_epilogue(ours.image_encoder, True) == TINY.encoder_depth
    set_attention_backend(ours.image_encoder, "flex")
    enc = compile_image_encoder(ours.image_encoder, mode="default", batch_size=2, backend="aot_eager")
    x = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(enc(x), orig.image_encoder(x), atol=2e-5, rtol=1e-4)


def test_bf16_epilogue_close_to_unfused():
    ours, _ = build_pair()
    make_fast(ours, dtype=torch.bfloat16, compile_mode=None, decoder_mode=None)
    x = torch.randn(1, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours.image_encoder(x.bfloat16()).float()
        make_fast(ours, dtype=None, compile_mode=None, decoder_mode=None, mlp_epilogue=True)
        out = ours.image_encoder(x.bfloat16()).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9999


def test_quantized_lin1_is_not_fused_and_true_is_refused():
    pytest.importorskip("torchao")
    from segment_anything_fast.quantize import compress

    ours, _ = build_pair()
    compress(ours, "int8_weight_only", linears=("qkv", "proj", "lin2"))
    assert all(epilogue_supported(b.mlp) for b in ours.image_encoder.blocks)
    assert set_mlp_epilogue(ours.image_encoder, True) == TINY.encoder_depth
    ours, _ = build_pair()
    compress(ours, "int8_weight_only")
    assert not any(epilogue_supported(b.mlp) for b in ours.image_encoder.blocks)
    with pytest.raises(ValueError, match="compress_linears"):
        set_mlp_epilogue(ours.image_encoder, True)
    assert set_mlp_epilogue(ours.image_encoder, False) == 0
    with pytest.raises(ValueError, match="no MLPBlock"):
        set_mlp_epilogue(nn.Linear(4, 4), True)


def test_builder_default_and_explicit():
    sam = build_sam_fast(TINY, device="cpu", compile_mode=None, decoder_compile_mode=None)
    assert not any(b.mlp.fused_epilogue for b in sam.image_encoder.blocks)  # None: CUDA only
    sam = build_sam_fast(TINY, device="cpu", compile_mode=None, decoder_compile_mode=None,
                         mlp_epilogue=True)
    assert all(b.mlp.fused_epilogue for b in sam.image_encoder.blocks)
    assert not any(m.fused_epilogue for m in sam.mask_decoder.modules() if isinstance(m, MLPBlock))
    with pytest.raises(ValueError, match="compiled_package"):
        build_sam_fast(TINY, device="cpu", mlp_epilogue=True, compiled_package="x.pt2")
