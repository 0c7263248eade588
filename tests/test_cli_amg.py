"""scripts/amg.py end to end on a tiny model: formats, overlay, failures, resume after a kill."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "amg.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import amg  # noqa: E402
from segment_anything_fast.data.synthetic_coco import make_scene  # noqa: E402

# Thresholds at 0 so that random-weight masks survive the filters.
FAST = ["--model-type", "tiny", "--device", "cpu", "--points-per-side", "4",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def _images(folder, names, size=(96, 72)):
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = make_scene([11, i], *size, num_objects=(2, 4)).image
        assert cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _no_temps(folder):
    return [os.path.join(d, f) for d, ds, fs in os.walk(folder) for f in ds + fs
            if amg.TMP_TAG in f]


def _check_folder_output(d, image_shape):
    with open(os.path.join(d, "metadata.csv")) as f:
        text = f.read()
    rows = list(csv.reader(text.splitlines()))
    assert ",".join(rows[0]) == amg.METADATA_HEADER
    pngs = sorted(f for f in os.listdir(d) if f.endswith(".png"))
    assert len(pngs) == len(rows) - 1 >= 1
    for row in rows[1:]:
        m = cv2.imread(os.path.join(d, f"{row[0]}.png"), cv2.IMREAD_GRAYSCALE)
        assert m.shape == image_shape and set(np.unique(m)) <= {0, 255}
        assert int(row[1]) == int((m > 0).sum())  # area column matches the PNG


def test_folder_with_corrupt_file_overlay_and_png_format(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(str(src), ["a.png", "sub/b.jpg"])
    (src / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (src / "notes.txt").write_text("ignored")
    rc = amg.main(["--input", str(src), "--output", str(out), "--overlay", *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 image(s) failed" in err and "broken.jpg" in err and "RANDOM weights" in err
    for name in ("a", os.path.join("sub", "b")):
        _check_folder_output(str(out / name), (72, 96))
        ov = cv2.imread(str(out / f"{name}_overlay.png"))
        assert ov is not None and ov.shape == (72, 96, 3)
    assert not (out / "broken").exists() and not (out / "notes").exists()
    assert _no_temps(str(out)) == []
    # The overlay is the image blended with the masks, not a copy of it.
    img = cv2.imread(str(src / "a.png"))
    assert np.abs(cv2.imread(str(out / "a_overlay.png")).astype(int) - img).max() > 10


def test_batched_images_same_outputs(tmp_path, capsys):
    src = tmp_path / "in"
    _images(str(src), ["a.png", "b.png", "c.png"])
    (src / "bad.png").write_bytes(b"not a png")
    outs = []
    for n in ("1", "2"):
        out = tmp_path / f"out{n}"
        rc = amg.main(["--input", str(src), "--output", str(out), "--batch-images", n, *FAST])
        assert rc == 1 and "bad.png" in capsys.readouterr().err
        outs.append(out)
    for name in ("a", "b", "c"):
        _check_folder_output(str(outs[1] / name), (72, 96))
        rows = [open(o / name / "metadata.csv").read().splitlines() for o in outs]
        assert len(rows[0]) == len(rows[1])  # same masks (values may differ by float rounding)


def test_convert_to_rle_json(tmp_path, capsys):
    src, out = tmp_path / "one.png", tmp_path / "out"
    _images(str(tmp_path), ["one.png"])
    assert amg.main(["--input", str(src), "--output", str(out), "--convert-to-rle", *FAST]) == 0
    assert "masks ->" in capsys.readouterr().out
    masks = json.load(open(out / "one.json"))
    assert len(masks) >= 1
    for m in masks:
        assert set(m) >= {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                          "stability_score", "crop_box"}
        seg = m["segmentation"]
        dec = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        assert dec.shape == (72, 96) and int(dec.sum()) == m["area"]
    assert _no_temps(str(out)) == []


def test_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert amg.main(["--input", str(tmp_path / "missing"), "--output", out, *FAST]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert amg.main(["--input", str(tmp_path / "empty"), "--output", out, *FAST]) == 2
    assert "No images" in capsys.readouterr().err
    _images(str(tmp_path / "clash"), ["x.png", "x.jpg"])
    assert amg.main(["--input", str(tmp_path / "clash"), "--output", out, *FAST]) == 2
    assert "same output name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        amg.main(["--output", out, "--model-type", "vit_z"])
    assert e.value.code == 2 and "choose one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        amg.main(["--output", out, "--checkpoint", str(tmp_path / "nope.pth"), *FAST[2:]])
    assert "does not exist" in capsys.readouterr().err
    assert amg.main(["--input", str(tmp_path / "clash" / "x.png"), "--output", out, *FAST,
                     "--box-nms-thresh", "7"]) == 2
    assert "box_nms_thresh" in capsys.readouterr().err


def test_resume_after_killed_run(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"img{i:02d}.png" for i in range(5)]
    _images(str(src), names, size=(160, 120))
    cmd = [sys.executable, SCRIPT, "--input", str(src), "--output", str(out),
           *FAST[:4], "--points-per-side", "8", "--pred-iou-thresh", "0",
           "--stability-score-thresh", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "img00" / "metadata.csv").exists():
                break
            time.sleep(0.02)
        time.sleep(0.3)  # let it get into the middle of a later image
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = [n[:-4] for n in names if amg.is_complete(str(out), n[:-4], False, False)]
    assert done, "the killed run finished no image; the test could not observe a partial run"
    # Every final-named output is complete: no half-written folders.
    for entry in os.listdir(out):
        if amg.TMP_TAG not in entry:
            assert (out / entry / "metadata.csv").exists(), entry
    mtimes = {n: os.path.getmtime(out / n / "metadata.csv") for n in done}
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} already complete" in r.stdout
    assert all(amg.is_complete(str(out), n[:-4], False, False) for n in names)
    assert {n: os.path.getmtime(out / n / "metadata.csv") for n in done} == mtimes
    assert _no_temps(str(out)) == []


def test_ctrl_c_keeps_finished_images_and_no_temps(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(str(src), [f"p{i}.png" for i in range(4)], size=(160, 120))
    cmd = [sys.executable, SCRIPT, "--input", str(src), "--output", str(out), "--overlay",
           *FAST[:4], "--points-per-side", "8", "--pred-iou-thresh", "0",
           "--stability-score-thresh", "0"]
    # the child must take Ctrl-C even when this test runs in the background of a shell, which
    # starts it with SIGINT ignored (and Python then keeps ignoring it)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if amg.is_complete(str(out), "p0", False, True):  # overlay AND masks written
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err
    assert _no_temps(str(out)) == []
    assert amg.is_complete(str(out), "p0", False, True)
