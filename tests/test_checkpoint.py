"""Checkpoint loading: round trips, wrapped dicts, official key sets, and clear errors."""
import os
import pickle

import pytest
import torch

from segment_anything_fast.build_sam import (
    SAM_CONFIGS, SamConfig, build_sam, detect_model_type, load_state_dict_file,
    sam_model_registry,
)
from tests.oracle import TINY, build_original, build_pair


@pytest.fixture(scope="module")
def pair():
    return build_pair(TINY, seed=7)


@pytest.fixture(scope="module")
def ckpt(pair, tmp_path_factory):
    ours, orig = pair
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(orig.state_dict(), path)  # written from the original package's model
    return path


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    batch = [{
        "image": torch.rand(3, 128, 100, generator=g) * 255, "original_size": (256, 200),
        "point_coords": torch.rand(2, 3, 2, generator=g) * 100,
        "point_labels": torch.tensor([[1, 0, 1], [1, 1, -1]]),
    }]
    return model(batch, multimask_output=True)[0]


def _meta_shapes(name_or_cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_sam(name_or_cfg).state_dict().items()}


def _fake_checkpoint(shapes):
    """A state dict with the given shapes whose storage is a single element (tiny on disk)."""
    return {k: torch.zeros(()).expand(s) for k, s in shapes.items()}


def test_round_trip_same_outputs(pair, ckpt):
    ours, orig = pair
    loaded = build_sam(TINY, checkpoint=ckpt)
    assert not loaded.training
    assert all(not t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    a, b = _outputs(loaded), _outputs(orig)
    torch.testing.assert_close(a["low_res_logits"], b["low_res_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["iou_predictions"], b["iou_predictions"], atol=1e-5, rtol=0)
    c = _outputs(ours)
    assert torch.equal(a["low_res_logits"], c["low_res_logits"])


def test_original_loads_our_saved_file(pair, tmp_path):
    ours, _ = pair
    path = tmp_path / "ours.pth"
    torch.save(ours.state_dict(), path)
    orig = build_original(TINY)
    orig.load_state_dict(torch.load(path, weights_only=True))


def test_checkpoint_attention_backend(ckpt):
    from segment_anything_fast.modeling.image_encoder import Attention

    model = build_sam(TINY, checkpoint=ckpt, attention="sdpa")
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"sdpa"}


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module."])
def test_wrapped_state_dicts(pair, tmp_path, wrap):
    ours, _ = pair
    sd = ours.state_dict()
    obj = {"module." + k: v for k, v in sd.items()} if wrap == "module." else {wrap: sd, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    loaded = build_sam(TINY, checkpoint=path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_half_precision_checkpoint_loads_as_float32(pair, tmp_path):
    ours, _ = pair
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in ours.state_dict().items()}, path)
    loaded = build_sam(TINY, checkpoint=path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_key_sets_on_meta(name):
    with torch.device("meta"):
        ours = build_sam(name).state_dict()
        orig = build_original(SAM_CONFIGS[name]).state_dict()
    assert list(ours) == list(orig)
    assert all(ours[k].shape == orig[k].shape for k in ours)
    assert detect_model_type(ours) == name


def test_registry_names():
    assert set(sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "demo"}
    assert sam_model_registry["default"] is sam_model_registry["vit_h"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        sam_model_registry["vit_b"](checkpoint=str(path))
    # The original's positional form build_sam(checkpoint_path) keeps working.
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        build_sam(str(path))


def test_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_state_dict_file(tmp_path)


def test_truncated_checkpoint(ckpt, tmp_path):
    data = ckpt.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a SAM checkpoint state_dict.*truncated"):
        build_sam(TINY, checkpoint=path)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", os.urandom(4096)])
def test_not_a_checkpoint_file(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a SAM checkpoint state_dict"):
        load_state_dict_file(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.zeros(3), {}, {"a": 1}, {"model": {}}])
def test_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="not a SAM checkpoint state_dict"):
        load_state_dict_file(path)


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match="not a SAM checkpoint state_dict"):
        build_sam(TINY, checkpoint=path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_pickle_with_code_is_refused(tmp_path, fmt):
    marker = str(tmp_path / "code_ran")
    obj = {"image_encoder.pos_embed": torch.zeros(1), "payload": _Evil(marker)}
    path = tmp_path / "evil.pth"
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(ValueError, match="not a SAM checkpoint state_dict") as e:
        build_sam(TINY, checkpoint=path)
    assert "could run code" in str(e.value)
    assert not os.path.exists(marker), "unpickling executed code"


@pytest.mark.parametrize("ckpt_type,model_type", [("vit_l", "vit_b"), ("vit_h", "vit_l"),
                                                  ("vit_b", "vit_h")])
def test_other_model_size_names_likely_type(tmp_path, ckpt_type, model_type):
    path = tmp_path / f"sam_{ckpt_type}.pth"
    torch.save(_fake_checkpoint(_meta_shapes(ckpt_type)), path)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ValueError) as e:
        sam_model_registry[model_type](checkpoint=path)
    msg = str(e.value)
    assert f"looks like {ckpt_type}" in msg and model_type in msg and str(path) in msg
    assert f"sam_model_registry['{ckpt_type}']" in msg


def test_tiny_checkpoint_into_official_model(ckpt):
    with pytest.raises(ValueError, match=r"looks like custom \(embed dim 32, 4 blocks\)"):
        build_sam("vit_b", checkpoint=ckpt)


def test_missing_and_unexpected_keys_are_listed(pair, tmp_path):
    ours, _ = pair
    sd = dict(ours.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        build_sam(TINY, checkpoint=path)
    msg = str(e.value)
    assert "1 missing keys: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected keys: mask_decoder.extra_head.weight" in msg


def test_shape_mismatch_same_family(pair, tmp_path):
    ours, _ = pair
    cfg = SamConfig(**{**TINY.__dict__, "decoder_mlp_dim": 48})
    path = tmp_path / "mlp48.pth"
    torch.save(build_sam(cfg).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatches.*mlp.lin1"):
        build_sam(TINY, checkpoint=path)


def test_package_names_stay_functions_after_submodule_imports():
    """``from segment_anything_fast import build_sam`` is the function (as in the original)
    even after the submodule of the same name was imported."""
    import subprocess
    import sys

    code = ("import segment_anything_fast.build_sam, segment_anything_fast.build_sam_fast\n"
            "from segment_anything_fast.build_sam import SamConfig\n"
            "from segment_anything_fast import build_sam, build_sam_fast\n"
            "assert callable(build_sam) and callable(build_sam_fast), (build_sam, build_sam_fast)\n"
            "print('OK')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
