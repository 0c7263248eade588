"""A train_demo checkpoint through the CLIs: eval_combo on the exported held-out scenes
reproduces the training script's mIoU; the architecture comes from the file."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import eval_combo as ec  # noqa: E402
from segment_anything_fast.build_sam import (  # noqa: E402
    SAM_CONFIGS, build_sam, checkpoint_config,
)
from segment_anything_fast.data.demo_scenes import (  # noqa: E402
    heldout_of_checkpoint, heldout_scenes, point_prompt_ious,
)

SEED, HELDOUT = 1, 3


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 3-step train_demo checkpoint (seed and lr chosen so every held-out IoU is > 0) and its
    held-out scenes exported by make_synthetic_coco.py."""
    d = tmp_path_factory.mktemp("demo")
    ckpt, root = str(d / "demo.pt"), str(d / "heldout")
    with contextlib.redirect_stdout(io.StringIO()):
        assert _script("train_demo").main([
            "--steps", "3", "--pool", "3", "--batch", "2", "--prompts", "2", "--lr", "1e-2",
            "--heldout", str(HELDOUT), "--seed", str(SEED), "--out", ckpt]) == 0
        _script("make_synthetic_coco").main(["--output", root, "--heldout-of", ckpt])
    return ckpt, root, torch.load(ckpt, weights_only=True)


def _eval_args(root, tmp_path, *extra):
    return ["--coco-root", root, "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "r.csv"), *extra]


def _last_row(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_export_is_the_heldout_set_losslessly(demo):
    ckpt, root, obj = demo
    size = obj["config"]["image_size"]
    assert heldout_of_checkpoint(ckpt) == (HELDOUT, size, SEED)
    with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
        ds = json.load(f)
    from pycocotools import mask as mask_utils

    scenes = heldout_scenes(HELDOUT, size, SEED)
    assert len(ds["images"]) == HELDOUT
    for info, sc in zip(ds["images"], scenes):
        assert info["file_name"].endswith(".png")
        img = cv2.cvtColor(cv2.imread(os.path.join(root, "val2017", info["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(img, sc.image)
        anns = [a for a in ds["annotations"] if a["image_id"] == info["id"]]
        assert len(anns) == len(sc.masks)
        for a, m in zip(anns, sc.masks):
            seg = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
            assert np.array_equal(mask_utils.decode(seg).astype(bool), m)


@pytest.mark.parametrize("batching", ["padded", "nested"])
def test_eval_combo_reproduces_train_demo_miou(demo, tmp_path, batching):
    ckpt, root, obj = demo
    meta = obj["meta"]
    # The same number computed in-process on the loaded checkpoint, per object: not all zero.
    ious = point_prompt_ious(build_sam("auto", ckpt), heldout_scenes(HELDOUT, obj["config"]["image_size"], SEED))
    assert ious.numel() == meta["heldout_objects"] and bool((ious > 0).all())
    with contextlib.redirect_stdout(io.StringIO()):
        rc = ec.main(_eval_args(root, tmp_path, "--checkpoint", ckpt, "--prompt-batching", batching))
    assert rc == 0
    row = _last_row(tmp_path / "r.csv")
    assert row["model_type"] == "auto" and int(row["n_annotations"]) == meta["heldout_objects"]
    miou = float(row["miou"])
    assert abs(miou - float(ious.mean())) < 2e-6  # the CSV rounds to 6 decimals
    assert abs(miou - meta["heldout_point_miou"]) < 1e-3
    assert meta["heldout_point_miou"] > 0.01


@pytest.mark.bad_input
@pytest.mark.parametrize("model_type", ["vit_b", "tiny"])
def test_conflicting_model_type_is_refused(demo, tmp_path, capsys, model_type):
    ckpt, root, _ = demo
    with pytest.raises(ValueError, match="stores its architecture.*config='auto'"):
        build_sam(model_type, ckpt)
    assert ec.main(_eval_args(root, tmp_path, "--checkpoint", ckpt, "--model-type", model_type)) == 2
    err = capsys.readouterr().err
    assert "stores its architecture" in err and model_type in err and "--model-type auto" in err


@pytest.mark.bad_input
def test_conflicting_config_json_is_refused(demo, tmp_path, capsys):
    ckpt, root, obj = demo
    other = dict(obj["config"], encoder_num_heads=obj["config"]["encoder_num_heads"] // 2)
    assert ec.main(_eval_args(root, tmp_path, "--checkpoint", ckpt,
                              "--config-json", json.dumps(other))) == 2
    assert "encoder_num_heads" in capsys.readouterr().err


def test_amg_takes_the_config_from_the_checkpoint(demo, tmp_path, capsys):
    ckpt, root, _ = demo
    amg = _script("amg")
    image = os.path.join(root, "val2017", "000000000001.png")
    common = ["--input", image, "--output", str(tmp_path / "out"), "--checkpoint", ckpt,
              "--device", "cpu", "--points-per-side", "2", "--convert-to-rle"]
    assert amg.main(common) == 0
    assert os.path.isfile(tmp_path / "out" / "000000000001.json")
    assert amg.main([*common, "--model-type", "vit_b"]) == 2
    assert "stores its architecture" in capsys.readouterr().err


def test_file_without_config_works_as_before(tmp_path, capsys):
    sam = build_sam("tiny")
    path = str(tmp_path / "tiny.pth")
    torch.save(sam.state_dict(), path)
    assert checkpoint_config(path) is None
    loaded = build_sam("tiny", path)
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in loaded.state_dict().items())
    # auto: no stored config and no official shape -> a clear error naming the way out.
    with pytest.raises(ValueError, match="no 'config' entry.*custom \\(embed dim 32, 4 blocks\\)"):
        build_sam("auto", path)
    from segment_anything_fast.data.synthetic_coco import write_coco_dataset

    root = str(tmp_path / "synth")
    write_coco_dataset(root, 1, seed=1, size=(160, 120))
    assert ec.main(_eval_args(root, tmp_path, "--checkpoint", path, "--model-type", "tiny")) == 0
    assert _last_row(tmp_path / "r.csv")["model_type"] == "tiny"
    assert ec.main(_eval_args(root, tmp_path, "--checkpoint", path)) == 2
    assert "--model-type tiny" in capsys.readouterr().err


def test_stored_config_round_trip(tmp_path):
    import dataclasses

    cfg = SAM_CONFIGS["tiny"]
    path = str(tmp_path / "c.pt")
    sd = build_sam(cfg).state_dict()
    torch.save({"model": sd, "config": dataclasses.asdict(cfg)}, path)
    assert checkpoint_config(path) == cfg
    assert build_sam(cfg, path) is not None  # the same config explicitly: accepted


@pytest.mark.bad_input
@pytest.mark.parametrize("config", [{"encoder_embed_dim": 32}, [1, 2], {"nope": 1}])
def test_invalid_stored_config(tmp_path, config):
    path = str(tmp_path / "bad.pt")
    torch.save({"model": build_sam("tiny").state_dict(), "config": config}, path)
    with pytest.raises(ValueError, match="'config' entry that is not a valid SamConfig"):
        checkpoint_config(path)
    with pytest.raises(ValueError, match="'config' entry that is not a valid SamConfig"):
        build_sam("auto", path)


@pytest.mark.bad_input
def test_auto_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="config='auto'.*checkpoint"):
        build_sam("auto")
    with pytest.raises(SystemExit):
        ec.main(_eval_args(str(tmp_path), tmp_path, "--model-type", "auto"))


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["extra_flag", "no_meta"])
def test_heldout_of_refuses(demo, tmp_path, capsys, case):
    ckpt, _, _ = demo
    msc = _script("make_synthetic_coco")
    if case == "extra_flag":
        argv, msg = ["--heldout-of", ckpt, "--num-images", "5"], "drop --num-images"
    else:
        bare = str(tmp_path / "bare.pth")
        torch.save(build_sam("tiny").state_dict(), bare)
        argv, msg = ["--heldout-of", bare], "not a scripts/train_demo.py checkpoint"
    with pytest.raises(SystemExit):
        msc.main(["--output", str(tmp_path / "o"), *argv])
    assert msg in capsys.readouterr().err
