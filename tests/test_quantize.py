"""CPU tests of segment_anything_fast.quantize / sparsity on the TINY model (random weights)."""
import copy
import functools
import sys

import pytest
import torch
from torch import nn

from oracle import TINY, build_pair
from segment_anything_fast import quantize
from segment_anything_fast.quantize import (
    COMPRESS_MODES, FlatInputLinear, InductorSettings, check_inductor_config_names, check_linears,
    compress, encoder_linear_filter, encoder_linears, flatten_linear_inputs_,
)
from segment_anything_fast.sparsity import (
    SPARSE_GPU_ERROR, input_channel_norms, is_2_4_sparse, mask_2_4, prune_2_4, prune_linears_2_4_,
    to_semi_structured_,
)

ENCODER_LINEARS = [f"blocks.{i}.{n}" for i in range(4) for n in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")]

# Measured on TINY, seed 0, 3 single-point prompts x 3 multimask outputs, min mask IoU vs the
# fp32 model: int8_dynamic 0.995, int8_weight_only 0.995, 2:4 pruning (dense) 0.874
# (the whole model in bf16: 0.972).
IOU_FLOOR = {"int8_dynamic": 0.97, "int8_weight_only": 0.97, "prune_2_4": 0.85}


@pytest.fixture(scope="module")
def models():
    ours, orig = build_pair()
    return ours, orig


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 128, 128, generator=g) * 255
    points = torch.tensor([[[40.0, 50.0]], [[90.0, 70.0]], [[64.0, 64.0]]])
    return [{"image": image, "original_size": (128, 128), "point_coords": points,
             "point_labels": torch.ones(3, 1)}]


def masks(sam, batch):
    with torch.no_grad():
        return sam(batch, multimask_output=True)[0]["masks"]


def min_iou(a, b):
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return (inter / union.clamp(min=1)).min().item()


@pytest.fixture(scope="module")
def ref_masks(models, batch):
    m = masks(models[0], batch)
    assert 0.05 < m.float().mean() < 0.95  # non-degenerate masks, or the IoU checks mean nothing
    return m


def test_modes_and_targets(models):
    assert COMPRESS_MODES[0] == "none"
    assert {"int8_dynamic", "int8_weight_only", "fp8", "sparse_2_4"} <= set(COMPRESS_MODES)
    ours, orig = models
    assert encoder_linears(ours) == ENCODER_LINEARS
    assert encoder_linears(orig) == ENCODER_LINEARS  # same names in the original package
    assert encoder_linears(ours.image_encoder) == ENCODER_LINEARS
    assert not encoder_linear_filter(ours.image_encoder.patch_embed.proj, "patch_embed.proj")
    assert not encoder_linear_filter(nn.Linear(4, 4), "mask_decoder.output_upscaling")


def _plain(t):
    return type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_weight_only"])
def test_cpu_mode_runs_and_keeps_masks(models, batch, ref_masks, mode):
    sam = copy.deepcopy(models[0])
    assert compress(sam, mode) is sam
    enc = sam.image_encoder
    for name, mod in enc.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            assert _plain(mod.weight) == (name not in ENCODER_LINEARS), name
    for part in (sam.prompt_encoder, sam.mask_decoder):
        assert all(_plain(p) for p in part.parameters())
    out = masks(sam, batch)
    assert out.shape == ref_masks.shape
    assert min_iou(out, ref_masks) >= IOU_FLOOR[mode]
    with pytest.raises(RuntimeError, match="already compressed"):
        compress(sam, mode)


def test_compress_original_package_encoder(models):
    enc = copy.deepcopy(models[1].image_encoder)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = enc(x)
        compress(enc, "int8_dynamic")
        out = enc(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.995


def test_flatten_linear_inputs_keeps_params_and_outputs(models):
    enc = copy.deepcopy(models[0].image_encoder)
    keys = list(enc.state_dict())
    params = {n: p for n, p in enc.named_parameters()}
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = enc(x)
        assert flatten_linear_inputs_(enc, encoder_linear_filter) == ENCODER_LINEARS
        out = enc(x)
    assert list(enc.state_dict()) == keys
    assert all(p is params[n] for n, p in enc.named_parameters())  # shared, not copied
    assert all(type(enc.get_submodule(n)) is FlatInputLinear for n in ENCODER_LINEARS)
    assert encoder_linears(enc) == ENCODER_LINEARS
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_none_is_identity(models):
    sam = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    assert compress(sam, "none") is sam
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())


@pytest.mark.parametrize("shape", [(8, 16), (48, 32), (3, 128)])
def test_prune_2_4_pattern_keeps_largest(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    mask = mask_2_4(w)
    pruned = prune_2_4(w)
    groups = pruned.reshape(shape[0], -1, 4)
    assert ((groups == 0).sum(-1) == 2).all()
    assert torch.equal(pruned[mask], w[mask]) and (pruned[~mask] == 0).all()
    mag = w.abs().reshape(shape[0], -1, 4)
    gmask = mask.reshape(shape[0], -1, 4)
    kept_min = mag.masked_fill(~gmask, float("inf")).min(-1).values
    dropped_max = mag.masked_fill(gmask, -1.0).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert is_2_4_sparse(pruned) and not is_2_4_sparse(w)
    assert prune_2_4(w.to(torch.bfloat16)).dtype == torch.bfloat16


def test_prune_rejects_bad_weights():
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_2_4(torch.randn(4, 6))
    with pytest.raises(ValueError, match="2-D"):
        mask_2_4(torch.randn(4, 4, 4))


def calibration_images(sam, n=4):
    g = torch.Generator().manual_seed(7)
    return torch.stack([sam.preprocess(torch.rand(3, 128, 128, generator=g) * 255) for _ in range(n)])


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_pruned_model_pattern_and_masks(models, batch, ref_masks, criterion):
    sam = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    norms = None
    if criterion == "wanda":
        calib = calibration_images(sam)
        norms = input_channel_norms(sam.image_encoder, encoder_linear_filter, lambda: sam.image_encoder(calib))
        assert sorted(norms) == sorted(ENCODER_LINEARS)
    names = prune_linears_2_4_(sam.image_encoder, encoder_linear_filter, norms)
    assert names == ENCODER_LINEARS
    for key, value in sam.state_dict().items():
        rel = key[len("image_encoder."):-len(".weight")] if key.startswith("image_encoder.") else None
        if rel in ENCODER_LINEARS and key.endswith(".weight"):
            groups = value.reshape(value.shape[0], -1, 4)
            assert ((groups == 0).sum(-1) == 2).all(), key
            assert torch.equal(value, prune_2_4(before[key], None if norms is None else norms[rel])), key
        else:
            assert torch.equal(value, before[key]), key
    assert min_iou(masks(sam, batch), ref_masks) >= IOU_FLOOR["prune_2_4"]


def test_input_channel_norms_and_wanda_beats_magnitude():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) / 8)
    net = nn.Sequential(nn.Identity(), lin)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-2, 1, 64)[torch.randperm(64, generator=g)]
    norms = input_channel_norms(net, lambda m, n: n == "1", lambda: (net(x[:100]), net(x[100:])))
    assert list(norms) == ["1"] and torch.allclose(norms["1"], x.norm(dim=0), rtol=1e-5)
    ref = x @ lin.weight.detach().t()
    err = {name: ((x @ prune_2_4(lin.weight, n).t()) - ref).norm() / ref.norm()
           for name, n in (("magnitude", None), ("wanda", norms["1"]))}
    assert err["wanda"] < 0.6 * err["magnitude"]  # measured 0.063 vs 0.378
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        prune_2_4(lin.weight, torch.ones(63))
    with pytest.raises(ValueError, match="non-negative"):
        prune_2_4(lin.weight, -torch.ones(64))
    with pytest.raises(ValueError, match="lacks 1"):
        prune_linears_2_4_(net, lambda m, n: n == "1", {})
    with pytest.raises(RuntimeError, match="never ran 1"):
        input_channel_norms(net, lambda m, n: n == "1", lambda: None)


def test_calibration_argument_is_checked(models):
    sam = copy.deepcopy(models[0])
    calib = calibration_images(sam, 1)
    with pytest.raises(ValueError, match="only by the 2:4 modes"):
        compress(sam, "int8_dynamic", calibration=calib)
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        compress(sam, "sparse_2_4", calibration=calib[:, :, :64])
    with pytest.raises(ValueError, match="float tensor"):
        compress(sam, "sparse_2_4", calibration=[calib])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_gpu_only_modes_fail_clearly_on_cpu(models):
    sam = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"'fp8'.*capability >= 8\.9.*on cpu.*bfloat16 weights.*float32"):
        compress(sam, "fp8")
    with pytest.raises(RuntimeError, match=r"'fp8_sparse_2_4'.*capability >= 9\.0"):
        compress(sam, "fp8_sparse_2_4")
    with pytest.raises(RuntimeError, match=r"2:4 sparse kernels need a CUDA GPU \(Ampere or newer\).*"
                                           r"bfloat16 or float16 weights"):
        compress(sam, "sparse_2_4")
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())  # nothing half-done
    sam.to(torch.bfloat16)
    for mode in ("fp8", "sparse_2_4"):
        with pytest.raises(RuntimeError, match="CUDA") as err:
            compress(sam, mode)
        assert "weights" not in str(err.value)  # the dtype is fine now, only the device is named
    with pytest.raises(RuntimeError, match="2:4 sparse kernels"):
        to_semi_structured_(sam.image_encoder, encoder_linear_filter)
    assert SPARSE_GPU_ERROR == "2:4 sparse kernels need a CUDA GPU (Ampere or newer)"


def test_bad_arguments(models):
    sam = copy.deepcopy(models[0])
    with pytest.raises(ValueError, match="int8_dynamic, int8_weight_only, fp8, sparse_2_4"):
        compress(sam, "int4")
    with pytest.raises(ValueError, match="unknown compress mode"):
        compress(sam, None)
    with pytest.raises(TypeError, match="nn.Module"):
        compress("sam", "int8_dynamic")
    with pytest.raises(ValueError, match="no image-encoder linears"):
        compress(nn.Sequential(nn.Linear(8, 8)), "int8_dynamic")


def test_old_torchao_is_named(models, monkeypatch):
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.9.0")
    with pytest.raises(ImportError, match=r"torchao >= 0\.18.*found 0\.9\.0.*pip install -U torchao"):
        compress(copy.deepcopy(models[0]), "int8_weight_only")


def test_torchao_missing_is_named(models, monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    sam = copy.deepcopy(models[0])
    with pytest.raises(ImportError, match="pip install torchao"):
        compress(sam, "int8_dynamic")


def test_inductor_settings():
    import torch._inductor.config as cfg

    assert InductorSettings().options() == {}
    s = InductorSettings.tutorial()
    assert s.options() == {"force_fuse_int_mm_with_mul": True, "coordinate_descent_tuning": True,
                           "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}
    old = cfg.epilogue_fusion, cfg.force_fuse_int_mm_with_mul
    with InductorSettings(epilogue_fusion=not old[0], force_fuse_int_mm_with_mul=not old[1]).patch():
        assert (cfg.epilogue_fusion, cfg.force_fuse_int_mm_with_mul) == (not old[0], not old[1])
    assert (cfg.epilogue_fusion, cfg.force_fuse_int_mm_with_mul) == old
    torch.compile(nn.Linear(2, 2), options=InductorSettings(epilogue_fusion_first=True).options())
    opts = InductorSettings(coordinate_descent_tuning=False).options(mode="max-autotune")
    assert opts["max_autotune"] is True and opts["coordinate_descent_tuning"] is False
    torch.compile(nn.Linear(2, 2), options=opts)
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        InductorSettings().options(mode="fastest")
    with pytest.raises(RuntimeError, match="no inductor option.*fuse_everything_xyz"):
        check_inductor_config_names(["epilogue_fusion", "fuse_everything_xyz"])
    with pytest.raises(TypeError, match="True, False or None"):
        InductorSettings(epilogue_fusion=1)
    with pytest.raises(TypeError):
        InductorSettings(unknown_option=True)


# ----------------------------------------------------------------------------- linears= selection

NO_LIN2 = ("qkv", "proj", "lin1")
LEAF = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.lin1", "lin2": "mlp.lin2"}


def _names(kinds):
    return [f"blocks.{i}.{LEAF[k]}" for i in range(4) for k in quantize.ENCODER_LINEARS if k in kinds]


def test_linears_constant_filter_and_names(models):
    assert quantize.ENCODER_LINEARS == ("qkv", "proj", "lin1", "lin2")
    ours = models[0]
    assert encoder_linears(ours, quantize.ENCODER_LINEARS) == ENCODER_LINEARS
    assert encoder_linears(ours, NO_LIN2) == _names(NO_LIN2)
    assert encoder_linears(ours.image_encoder, ["lin2", "qkv"]) == _names(("qkv", "lin2"))  # any order
    lin2 = ours.image_encoder.blocks[0].mlp.lin2
    assert encoder_linear_filter(lin2, "blocks.0.mlp.lin2")
    assert not encoder_linear_filter(lin2, "blocks.0.mlp.lin2", NO_LIN2)
    assert encoder_linear_filter(lin2, "blocks.0.mlp.lin2", ["lin2"])
    assert check_linears(["lin2", "qkv"]) == ("qkv", "lin2")


def test_int8_dynamic_leaves_unselected_linears_alone(models, batch, ref_masks):
    sam = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    assert compress(sam, "int8_dynamic", linears=NO_LIN2) is sam
    enc = sam.image_encoder
    for name in ENCODER_LINEARS:
        weight = enc.get_submodule(name).weight
        if name.endswith("mlp.lin2"):
            assert _plain(weight) and type(enc.get_submodule(name)) is nn.Linear, name
            assert torch.equal(weight, before[f"image_encoder.{name}.weight"]), name
        else:
            assert not _plain(weight), name  # a torchao tensor
    assert min_iou(masks(sam, batch), ref_masks) >= IOU_FLOOR["int8_dynamic"]
    with pytest.raises(RuntimeError, match="already compressed"):  # lin2 alone: still refused
        compress(sam, "int8_dynamic", linears=("lin2",))


def test_prune_2_4_only_the_selected_linears(models):
    sam = copy.deepcopy(models[0])
    enc = sam.image_encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    keep = ("proj", "lin2")
    filter_fn = functools.partial(encoder_linear_filter, linears=keep)
    norms = input_channel_norms(enc, filter_fn, lambda: enc(calibration_images(sam, 2)))
    assert sorted(norms) == sorted(_names(keep))
    assert prune_linears_2_4_(enc, filter_fn, norms) == _names(keep)
    for name in ENCODER_LINEARS:
        w = enc.get_submodule(name).weight
        if name in _names(keep):
            assert is_2_4_sparse(w) and torch.equal(w, prune_2_4(before[name + ".weight"], norms[name])), name
        else:
            assert torch.equal(w, before[name + ".weight"]) and not is_2_4_sparse(w), name


def test_compress_2_4_modes_act_on_the_selection_only(models, monkeypatch):
    """compress's 2:4 path on the CPU, with the GPU-only steps stubbed: Wanda pruning, the
    FlatInputLinear swap and the sparse conversion reach the selected linears only."""
    converted = []
    monkeypatch.setattr(quantize, "_check_requirements", lambda mode, device, dtype: None)
    monkeypatch.setattr(quantize, "to_semi_structured_", lambda module, filter_fn: converted.extend(
        n for n, m in module.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, n)))
    sam = copy.deepcopy(models[0])
    enc = sam.image_encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    keep = ("qkv", "lin1")
    compress(sam, "sparse_2_4", linears=list(reversed(keep)), calibration=calibration_images(sam, 2))
    assert converted == _names(keep)
    for name in ENCODER_LINEARS:
        mod = enc.get_submodule(name)
        selected = name in _names(keep)
        assert (type(mod) is FlatInputLinear) == selected and type(mod) in (nn.Linear, FlatInputLinear), name
        assert is_2_4_sparse(mod.weight) == selected, name
        if not selected:
            assert torch.equal(mod.weight, before[name + ".weight"]), name


@pytest.mark.parametrize("bad, match", [
    ("qkv", r"non-empty tuple or list of names from qkv, proj, lin1, lin2, got 'qkv'"),
    ((), r"non-empty tuple or list .*got \(\)"),
    (None, r"non-empty tuple or list .*got None"),
    (("qkv", "fc1"), r"unknown encoder linear\(s\) 'fc1'; valid names: qkv, proj, lin1, lin2"),
    (["mlp.lin2"], r"unknown encoder linear\(s\) 'mlp.lin2'"),
    (["qkv", 3], r"unknown encoder linear\(s\) 3"),
    (("lin1", "qkv", "lin1"), r"names 'lin1' more than once; valid names: qkv, proj, lin1, lin2"),
])
def test_bad_linears_are_refused_before_any_change(models, bad, match):
    sam = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    for mode in ("int8_dynamic", "none"):
        with pytest.raises(ValueError, match=r"^linears.*" + match):
            compress(sam, mode, linears=bad)
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())
    with pytest.raises(ValueError, match=match):
        encoder_linears(sam, bad)
    with pytest.raises(ValueError, match=match):
        encoder_linear_filter(sam.image_encoder.blocks[0].mlp.lin2, "blocks.0.mlp.lin2", bad)


def test_build_sam_fast_passes_compress_linears(tmp_path, models):
    from segment_anything_fast.build_sam_fast import build_sam_fast

    ckpt = tmp_path / "tiny.pth"
    torch.save(models[1].state_dict(), ckpt)
    kw = dict(dtype=None, attention="sdpa", compile_mode=None, decoder_compile_mode=None, device="cpu")
    sam = build_sam_fast(TINY, ckpt, compress="int8_dynamic", compress_linears=["lin1", "qkv"], **kw)
    plain = {n: _plain(sam.image_encoder.get_submodule(n).weight) for n in ENCODER_LINEARS}
    assert plain == {n: n not in _names(("qkv", "lin1")) for n in ENCODER_LINEARS}
    for bad, match in ((("qkv", "qkv"), "more than once"), (("w_o",), "unknown encoder linear"), ([], "non-empty")):
        with pytest.raises(ValueError, match=f"^compress_linears.*{match}"):
            # a missing checkpoint: the argument is checked before anything is read or built
            build_sam_fast(TINY, tmp_path / "missing.pth", compress="int8_dynamic", compress_linears=bad, **kw)
    with pytest.raises(ValueError, match="compress_linears= cannot be combined with compiled_package="):
        build_sam_fast(TINY, ckpt, compress_linears=NO_LIN2, compiled_package=tmp_path / "missing.pt2", **kw)
    with pytest.raises(ValueError, match="unknown compress mode"):
        build_sam_fast(TINY, tmp_path / "missing.pth", compress="int4", **kw)
