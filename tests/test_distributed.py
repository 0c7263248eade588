"""segment_anything_fast.distributed and the torchrun paths of eval_combo / scripts/amg.py.

Multi-process tests launch ``python -m torch.distributed.run --nproc-per-node 2`` (gloo, CPU).
"""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from segment_anything_fast.distributed import (
    DistContext, RankFailedError, init_distributed, shard, shard_size,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_partitions_balanced_in_order(n, world):
    items = [f"img{i}" for i in range(n)]
    shards = [shard(items, r, world) for r in range(world)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))  # all, once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert sizes == [shard_size(n, r, world) for r in range(world)]
    for s in shards:
        assert s == sorted(s, key=items.index)  # input order kept
    assert shards == [shard(items, r, world) for r in range(world)]  # deterministic


def test_shard_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        shard([1], 0, 0)
    with pytest.raises(ValueError, match="rank"):
        shard([1], 2, 2)
    with pytest.raises(ValueError, match="rank"):
        shard([1], -1, 2)


def test_single_process_context(monkeypatch):
    for v in TORCHRUN_ENV:
        monkeypatch.delenv(v, raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.is_distributed and ctx.is_main and ctx.world_size == 1
    assert ctx.all_gather_object({"a": 1}) == [{"a": 1}] == ctx.gather_object({"a": 1})
    ctx.check(None)
    with pytest.raises(RankFailedError, match="rank 0 of 1 .*failed on image x.png"):
        ctx.check("failed on image x.png", "batch 1")
    assert str(ctx.resolve_device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="device_type"):
        init_distributed("tpu")
    # torchrun with one process: no process group, but cuda:N requests are refused only when
    # distributed, so a plain single-process run keeps its device.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not init_distributed("cpu").is_distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")
    two = DistContext(1, 2, 1, backend="gloo")
    assert str(two.resolve_device("cuda")) == "cuda:1"
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        two.resolve_device("cuda:0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, nproc=2, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, script), *args]
    # A hang would fail here (TimeoutExpired) instead of blocking the test run.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from segment_anything_fast.data.synthetic_coco import write_coco_dataset

    root = tmp_path_factory.mktemp("synth5")
    write_coco_dataset(str(root), 5, seed=3, size=(160, 120))
    os.remove(root / "val2017" / "000000000004.jpg")  # a missing image: skipped and reported
    return str(root)


def _eval_args(root, out):
    return ["--coco-root", root, "--model-type", "tiny", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", "none", "--warmup-batches", "0", "--output", out,
            "--dist-timeout", "60"]


def test_eval_combo_two_ranks_same_miou_as_one(synth, tmp_path):
    from experiments import eval_combo as ec

    out = str(tmp_path / "r.csv")
    assert ec.main(_eval_args(synth, out)) == 0
    r = _torchrun("experiments/eval_combo.py", *_eval_args(synth, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 ranks" in r.stdout and "per rank" in r.stdout
    assert r.stderr.count("000000000004.jpg") >= 1 and "[rank 1]" in r.stderr  # missing, rank 1
    with open(out, newline="") as f:
        one, two = list(csv.DictReader(f))
    assert (one["world_size"], two["world_size"]) == ("1", "2")
    for k in ("miou", "n_images", "n_annotations", "n_skipped_images", "timed_images"):
        assert one[k] == two[k], k
    assert one["n_images"] == "4" and one["n_skipped_images"] == "1"
    assert len(two["per_rank_img_per_s"].split(";")) == 2
    assert float(two["img_per_s_end_to_end"]) > 0


def test_eval_combo_failing_rank_stops_all(synth, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(synth, root)
    ann = root / "annotations" / "instances_val2017.json"
    ds = json.loads(ann.read_text())
    # Image 2 is the second image, so rank 1's first; its mask cannot be decoded.
    next(a for a in ds["annotations"] if a["image_id"] == 2)["segmentation"] = {
        "size": [120, 160], "counts": 123}
    ann.write_text(json.dumps(ds))
    r = _torchrun("experiments/eval_combo.py", *_eval_args(str(root), str(tmp_path / "r.csv")))
    assert r.returncode != 0
    assert "rank 1 of 2" in r.stderr and "000000000002.jpg" in r.stderr, r.stderr[-3000:]
    assert "the run stops on every rank" in r.stderr
    assert not (tmp_path / "r.csv").exists()


def test_amg_each_image_once_and_failure_names_rank(tmp_path):
    import cv2

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = []
    for i in range(5):
        name = f"sub/im{i}" if i % 2 else f"im{i}"
        rng = np.random.default_rng(i)
        cv2.imwrite(str(src / f"{name}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        good.append(name)
    (src / "sub" / "zz_bad.jpg").write_bytes(b"not an image")  # 6th of 6 -> rank 1's
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--model-type", "tiny", "--device", "cpu",
            "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--convert-to-rle", "--dist-timeout", "60"]
    r = _torchrun("scripts/amg.py", *args)
    assert r.returncode != 0  # an image failed
    assert "[rank 1]" in r.stderr and "zz_bad.jpg" in r.stderr, r.stderr[-3000:]
    # Rank 0's summary covers both ranks; 3 + 2 written: every good image exactly once.
    assert "Done: 5 image(s) written" in r.stdout and "1 failed" in r.stdout, r.stdout
    assert "rank 0 (" in r.stdout and ": 3 written" in r.stdout and ": 2 written" in r.stdout
    written = sorted(os.path.relpath(os.path.join(d, f), out)[:-5]
                     for d, _, fs in os.walk(out) for f in fs)
    assert written == sorted(good)
    for name in good:
        assert isinstance(json.loads((out / f"{name}.json").read_text()), list)
