"""Our Triton rel-pos attention kernel against a float64 reference, on CPU via TRITON_INTERPRET=1.

The interpreter must be switched on before the kernel is defined, so the checks run in a child
process. (The interpreter mishandles bfloat16, so fp32 and fp16 are checked here; bf16 is
checked on the GPU by experiments/bench_attention.py.)
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_CHILD = textwrap.dedent(
    """
    import torch
    from segment_anything_fast.attention import dense_bias, rel_pos_attention
    from segment_anything_fast.triton_attention import kernel_config, _split_head_dim

    def ref(q, k, v, rh, rw):
        q, k, v = (t.double() for t in (q, k, v))
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if rh is not None:
            s = s + dense_bias(rh.double(), rw.double())
        return s.softmax(-1) @ v

    cases = [  # B, heads, grid H, W, head dim, dtype, tolerance
        (2, 2, 14, 14, 16, torch.float32, 1e-5),   # windowed layer (padded 16-wide rows)
        (1, 2, 8, 8, 80, torch.float32, 1e-5),     # vit_h head dim 80 = 64 + 16
        (1, 1, 5, 7, 32, torch.float32, 1e-5),     # non-square grid
        (1, 2, 16, 16, 16, torch.float16, 2e-3),
    ]
    for i, (B, nh, H, W, d, dt, tol) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        N = H * W
        q, k, v = (torch.randn(B, nh, N, d, generator=g).to(dt) for _ in range(3))
        rh = (torch.randn(B, nh, N, H, generator=g) * 2).to(dt)
        rw = (torch.randn(B, nh, N, W, generator=g) * 2).to(dt)
        for bias in (True, False):
            a, b = (rh, rw) if bias else (None, None)
            out = rel_pos_attention(q, k, v, a, b, backend="triton")
            r = ref(q, k, v, a, b)
            assert out.dtype == dt and out.shape == q.shape
            err = ((out.double() - r).norm() / r.norm()).item()
            assert err < tol, (i, bias, err)
    # one key-grid row per key block (ROWS == 1: rel_h folded into the row max, the launch of
    # the 64x64 global layers), and blocks of several rows, through explicit launch configs
    from segment_anything_fast.triton_attention import triton_rel_pos_attention
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 48, 32, generator=g) for _ in range(3))
    rh, rw = torch.randn(2, 2, 48, 6, generator=g) * 2, torch.randn(2, 2, 48, 8, generator=g) * 2
    r = ref(q, k, v, rh, rw)
    for cfg in (dict(BLOCK_M=16, ROWS=1, num_warps=4, num_stages=1),
                dict(BLOCK_M=32, ROWS=4, num_warps=4, num_stages=1)):
        out = triton_rel_pos_attention(q, k, v, rh, rw, config=cfg)
        assert ((out.double() - r).norm() / r.norm()).item() < 1e-5, cfg
    # non-contiguous inputs (views of one qkv tensor, as the encoder produces them)
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(3, 2, 49, 2, 16, generator=g).permute(0, 1, 3, 2, 4)
    q, k, v = qkv.unbind(0)
    rh, rw = torch.randn(2, 2, 49, 7, generator=g), torch.randn(2, 2, 49, 7, generator=g)
    out = rel_pos_attention(q, k, v, rh, rw, backend="triton")
    r = ref(q, k, v, rh, rw)
    assert ((out.double() - r).norm() / r.norm()).item() < 1e-5
    # bias really enters: swapping rel_h and rel_w on a square grid changes the output
    assert (out - rel_pos_attention(q, k, v, rw, rh, backend="triton")).abs().max() > 1e-3
    # the grid path: windows read in place from the block's qkv (padded windows, pad = qkv
    # bias), global attention, head dim 80 = 64 + 16; the math backend partitions windows
    from segment_anything_fast.modeling.image_encoder import Block
    for i, (dim, heads, grid, ws, qkv_bias) in enumerate([
        (32, 2, 7, 5, True), (32, 2, 7, 5, False), (160, 2, 6, 4, True), (32, 2, 6, 0, True),
        (32, 1, 6, 3, True),  # windows that tile the grid exactly: no padding
        (32, 2, 7, 6, True),  # 6-wide windows in rows of 8: padding columns and padded tokens
    ]):
        torch.manual_seed(20 + i)
        blk = Block(dim, heads, qkv_bias=qkv_bias, use_rel_pos=True, rel_pos_zero_init=False,
                    window_size=ws, input_size=(grid, grid), attention="math")
        with torch.no_grad():
            if qkv_bias:
                blk.attn.qkv.bias.normal_(0, 2)  # padded tokens' k, v clearly non-zero
            blk.attn.rel_pos_h.normal_(0, 1)
            blk.attn.rel_pos_w.normal_(0, 1)
        x = torch.randn(2, grid, grid, dim)
        with torch.no_grad():
            want = blk(x)
            blk.attn.backend = "triton"
            got = blk(x)
        err = ((got - want).norm() / want.norm()).item()
        assert got.shape == want.shape and err < 1e-5, (i, err)
        # explicit launches: one key-grid row per block (the global layers'), and blocks of
        # whole window rows, whose padding columns rel_w's tile masks once (no per-block mask)
        rows = 1 if ws == 0 else 2 if ws % 2 == 0 else None
        if rows:
            from segment_anything_fast.triton_attention import triton_grid_attention
            blk.attn.attend = lambda qkv, w, p: triton_grid_attention(
                qkv, heads, w, blk.attn._rel_logits(qkv, w), p,
                config=dict(BLOCK_M=16, ROWS=rows, num_warps=4, num_stages=1))
            with torch.no_grad():
                err = ((blk(x) - want).norm() / want.norm()).item()
            assert err < 1e-5, ("rows", rows, i, err)
    assert _split_head_dim(80) == (64, 16) and _split_head_dim(64) == (64, 0)
    assert kernel_config(4096, 64, 64, (9, 0))["ROWS"] == 1
    assert kernel_config(196, 14, 64, (9, 0))["ROWS"] == 2
    print("OK")
    """
)


def test_triton_kernel_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_triton_backend_refuses_cpu_without_interpreter():
    import torch

    from segment_anything_fast.triton_attention import _launch

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter is on in this process")
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        _launch(q, q, q, None, None)


def test_split_head_dim_rejects_odd_sizes():
    from segment_anything_fast.triton_attention import _split_head_dim

    with pytest.raises(ValueError, match="multiple of 16"):
        _split_head_dim(72)
    with pytest.raises(ValueError, match="powers of two"):
        _split_head_dim(112)


def test_attention_kernel_compiles_for_hopper_with_pipelined_loads(tmp_path):
    """experiments/sass_attention.py: our kernel compiles for sm_90 (Triton's bundled ptxas, no
    GPU needed) and the global layers' key loop copies k / v asynchronously (LDGSTS) with no
    spill instruction: the shape of kernel that ran at ~310 TFLOP/s on the H100."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import json

    import sass_attention

    out = tmp_path / "sass.json"
    (rep,) = sass_attention.main(["--cases", "vit_b_global", "--out", str(out)])
    assert rep["loop_instructions"] > 100 and rep["loop_mix"].get("HGMMA", 0) > 0
    assert rep["loop_async_copies"] > 0 and rep["spills"] == 0
    assert json.loads(out.read_text())["reports"][0]["case"] == "vit_b_global"


_GRID_BENCH_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, "experiments")
    import bench_attention as b
    b.GRID_SHAPES.update(tiny_window=(32, 2, 5), tiny_global=(32, 2, 0))
    b.bench = lambda fn, **kw: (lambda t: (fn(), (time.time() - t) * 1e3)[1])(time.time())
    torch.cuda.synchronize = lambda: None
    rows = (b.grid_rows("tiny_window", 1, False, (9, 0), grid=7, device="cpu", dtype=torch.float16)
            + b.grid_rows("tiny_global", 1, False, (9, 0), grid=8, device="cpu", dtype=torch.float16))
    errs = [r["rel_err"] for r in rows if r["variant"] == "gridtable"]
    assert len(errs) == 2 and max(errs) < 2e-3, errs
    assert [r["variant"] for r in rows].count("rel_logits") == 2
    print("OK")
    """
)


def test_bench_attention_grid_mode_in_interpreter():
    """bench_attention --grid-shapes' kernel call and float32 reference agree (tiny shapes, fp16,
    Triton interpreter, timing stubbed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _GRID_BENCH_CHILD], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=240, cwd=root)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
