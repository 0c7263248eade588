"""The bundled demo checkpoint: it loads by name everywhere, segments generated scenes as well
as its metadata says, and the CLIs take "demo" for its path."""
import contextlib
import csv
import importlib.util
import io
import os

import cv2
import numpy as np
import pytest
import torch

from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything_fast.build_sam import (
    BUNDLED_CHECKPOINTS, DEMO_AMG_SETTINGS, DEMO_CHECKPOINT, SAM_CONFIGS, SamConfig, build_sam, build_sam_demo,
    resolve_checkpoint,
    sam_model_registry,
)
from segment_anything_fast.build_sam_fast import sam_model_fast_registry
from segment_anything_fast.data.coco_prompts import mask_iou
from segment_anything_fast.data.demo_scenes import (
    heldout_scenes, point_prompt_ious,
)
from segment_anything_fast.data.synthetic_coco import make_scene, sample_scene, write_sample_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured on CPU (float32): held-out point mIoU 0.8667 over all 40 seed-0 scenes (236 objects);
# AMG recall at IoU >= 0.5 on the 8 simple scenes below 1.0 (22 of 22 objects).
MIOU_FLOOR = 0.80
AMG_RECALL_FLOOR = 0.85
# The demo model's AMG settings (the official 0.88 / 0.95 thresholds keep almost none of its
# masks); scripts/amg.py uses them for --checkpoint demo.
AMG_SETTINGS = DEMO_AMG_SETTINGS


def _script(name, folder="scripts"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def file_obj():
    return torch.load(DEMO_CHECKPOINT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sam():
    return sam_model_registry["demo"]()


def test_registry_loads_the_bundled_weights(sam, file_obj):
    assert os.path.isfile(DEMO_CHECKPOINT) and resolve_checkpoint("demo") == DEMO_CHECKPOINT
    assert SamConfig(**file_obj["config"]) == SAM_CONFIGS["demo"]
    sd = sam.state_dict()
    assert set(sd) == set(file_obj["model"])
    assert all(torch.equal(sd[k], v.float() if v.is_floating_point() else v)
               for k, v in file_obj["model"].items())
    assert sum(p.numel() for p in sam.parameters()) == pytest.approx(3.8e6, rel=0.01)
    import segment_anything_fast

    assert segment_anything_fast.build_sam_demo is build_sam_demo
    # A name alone builds random weights, like every other named config.
    rand = build_sam("demo").state_dict()
    key = "image_encoder.patch_embed.proj.weight"
    assert rand[key].shape == sd[key].shape and not torch.equal(rand[key], sd[key])


def test_fast_registry_loads_the_bundled_weights(sam):
    fast = sam_model_fast_registry["demo"](device="cpu", dtype=None, attention="sdpa",
                                            compile_mode=None, decoder_compile_mode=None)
    ours = sam.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in fast.state_dict().items())


def test_heldout_point_miou(sam, file_obj):
    meta = file_obj["meta"]
    n, seed = meta["heldout_scenes"], meta["seed"]
    ious = point_prompt_ious(sam, heldout_scenes(n, SAM_CONFIGS["demo"].image_size, seed))
    assert ious.numel() == meta["heldout_objects"]
    assert abs(float(ious.mean()) - meta["heldout_point_miou"]) < 1e-3
    assert float(ious.mean()) >= MIOU_FLOOR


def test_amg_finds_most_objects(sam):
    gen = SamAutomaticMaskGenerator(sam, **AMG_SETTINGS)
    found = total = 0
    for i in range(8):
        sc = make_scene([7, i], 256, 192, num_objects=(2, 4))
        masks = [torch.from_numpy(m["segmentation"]) for m in gen.generate(sc.image)]
        for g in sc.masks:  # an object is found when one mask covers it with IoU >= 0.5
            g = torch.from_numpy(g)
            found += any(float(mask_iou(m[None], g[None])) >= 0.5 for m in masks)
        total += len(sc.masks)
    assert total == 22 and found / total >= AMG_RECALL_FLOOR


def test_eval_combo_reports_the_checkpoint_miou(tmp_path, file_obj):
    root, out = str(tmp_path / "heldout"), tmp_path / "r.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        _script("make_synthetic_coco").main(["--output", root, "--heldout-of", "demo"])
        assert _script("eval_combo", "experiments").main([
            "--coco-root", root, "--checkpoint", "demo", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", "none", "--output", str(out)]) == 0
    with open(out, newline="") as f:
        row = list(csv.DictReader(f))[-1]
    meta = file_obj["meta"]
    assert row["checkpoint"] == DEMO_CHECKPOINT and row["model_type"] == "auto"
    assert int(row["n_images"]) == meta["heldout_scenes"]
    assert int(row["n_annotations"]) == meta["heldout_objects"]
    assert abs(float(row["miou"]) - meta["heldout_point_miou"]) < 1e-3


def test_amg_cli_takes_demo(tmp_path, capsys):
    """--checkpoint demo: the bundled model with its AMG settings (flags given still win)."""
    out = tmp_path / "out"
    assert _script("amg").main(["--checkpoint", "demo", "--output", str(out), "--device", "cpu",
                                "--overlay"]) == 0
    err = capsys.readouterr().err
    assert "points_per_side=16, pred_iou_thresh=0.6, stability_score_thresh=0.8" in err
    with open(out / "demo_scene" / "metadata.csv") as f:
        assert len(f.readlines()) - 1 >= 6  # the README's run: 13 masks on the 8-object scene
    assert os.path.isfile(out / "demo_scene_overlay.png")
    assert _script("amg").main(["--checkpoint", "demo", "--output", str(tmp_path / "o2"),
                                "--device", "cpu", "--points-per-side", "4"]) == 0
    assert "points_per_side=4, pred_iou_thresh=0.6" in capsys.readouterr().err


def test_bundled_demo_image_is_reproducible(tmp_path):
    bundled = os.path.join(ROOT, "segment_anything_fast", "assets", "demo_scene.jpg")
    assert _script("amg").SAMPLE_IMAGE == bundled and os.path.getsize(bundled) < 150_000
    scene = write_sample_image(tmp_path / "d.jpg", noise=True)
    assert len(scene.masks) == len(sample_scene(noise=True).masks) >= 6
    img = cv2.imread(bundled)
    np.testing.assert_array_equal(img, cv2.imread(str(tmp_path / "d.jpg")))
    diff = np.abs(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(int) - scene.image).mean()
    assert diff < 6  # JPEG (quality 90) error on the pixel noise; another scene: > 100


@pytest.mark.bad_input
def test_missing_bundled_file_says_how_to_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(BUNDLED_CHECKPOINTS, "demo", str(tmp_path / "sam_demo.pt"))
    with pytest.raises(FileNotFoundError, match="missing.*pip install -e ."):
        sam_model_registry["demo"]()
    with pytest.raises(SystemExit):
        _script("amg").main(["--checkpoint", "demo", "--output", str(tmp_path / "o")])
    assert "pip install -e ." in capsys.readouterr().err
    assert resolve_checkpoint("other.pt") == "other.pt" and resolve_checkpoint(None) is None
