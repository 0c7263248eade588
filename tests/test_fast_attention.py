"""The fused rel-pos attention backends against the plain math path (CPU)."""
import pytest
import torch

from segment_anything_fast.attention import check_backend, dense_bias, rel_pos_attention

# (batch, heads, key grid H, W, head dim): a windowed layer (14x14 window) and a global one
# (a small square grid stands in for 64x64 to keep the CPU test quick), plus a non-square grid.
SHAPES = [
    (3, 2, 14, 14, 16),
    (1, 2, 16, 16, 32),
    (2, 3, 5, 7, 8),
]


def _inputs(B, nh, H, W, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N = H * W
    q, k, v = (torch.randn(B, nh, N, d, generator=g) for _ in range(3))
    rel_h = torch.randn(B, nh, N, H, generator=g) * 2
    rel_w = torch.randn(B, nh, N, W, generator=g) * 2
    return [t.to(dtype) for t in (q, k, v, rel_h, rel_w)]


def _reference(q, k, v, rel_h, rel_w):
    """float64 attention with the dense bias."""
    q, k, v = (t.double() for t in (q, k, v))
    bias = None if rel_h is None else dense_bias(rel_h.double(), rel_w.double())
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_flex_is_registered():
    assert check_backend("flex") == "flex"


@pytest.mark.parametrize("shape", SHAPES)
def test_flex_matches_math_fp32(shape):
    q, k, v, rh, rw = _inputs(*shape, torch.float32, seed=hash(shape) % 1000)
    ref = _reference(q, k, v, rh, rw)
    out = rel_pos_attention(q, k, v, rh, rw, backend="flex")
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 1e-5
    math = rel_pos_attention(q, k, v, rh, rw, backend="math")
    torch.testing.assert_close(out, math, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_flex_matches_math_bf16(shape):
    q, k, v, rh, rw = _inputs(*shape, torch.bfloat16, seed=7)
    ref = _reference(q, k, v, rh, rw)
    out = rel_pos_attention(q, k, v, rh, rw, backend="flex")
    assert out.dtype == torch.bfloat16
    math = rel_pos_attention(q, k, v, rh, rw, backend="math")
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(out, ref) <= 2 * _rel_err(math, ref) + 2e-3


def test_flex_without_bias_is_plain_attention():
    q, k, v, _, _ = _inputs(2, 2, 4, 4, 8, torch.float32, seed=3)
    out = rel_pos_attention(q, k, v, None, None, backend="flex")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_flex_bias_is_position_dependent():
    """Swapping rel_h and rel_w on a square grid must change the result (the bias is used)."""
    q, k, v, rh, rw = _inputs(1, 1, 6, 6, 8, torch.float32, seed=11)
    a = rel_pos_attention(q, k, v, rh, rw, backend="flex")
    b = rel_pos_attention(q, k, v, rw, rh, backend="flex")
    assert (a - b).abs().max() > 1e-3


def test_flex_rejects_mismatched_grid():
    q, k, v, rh, rw = _inputs(1, 1, 4, 4, 8, torch.float32, seed=5)
    with pytest.raises(ValueError, match="key grid"):
        rel_pos_attention(q, k, v, rh[..., :3], rw, backend="flex")
    with pytest.raises(ValueError, match="together"):
        rel_pos_attention(q, k, v, rh, None, backend="flex")
