"""scripts/train_demo.py: a short run writes a safe fp16 checkpoint that build_sam loads."""
import importlib.util
import os

import pytest
import torch

from segment_anything_fast.build_sam import SamConfig, build_sam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("train_demo", os.path.join(ROOT, "scripts", "train_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_run_writes_loadable_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "demo.pt")
    td = _script()
    assert td.main(["--steps", "3", "--pool", "3", "--batch", "2", "--prompts", "2",
                    "--heldout", "2", "--out", out]) == 0
    assert "held-out point-prompt mIoU" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert obj["meta"]["steps"] == 3 and 0 <= obj["meta"]["heldout_point_miou"] <= 1
    assert all(v.dtype == torch.float16 for v in obj["model"].values() if v.is_floating_point())
    cfg = SamConfig(**obj["config"])
    assert cfg == td.DEMO_CONFIG
    sam = build_sam(cfg, out)
    sd = sam.state_dict()
    assert all(torch.equal(sd[k], v.float()) for k, v in obj["model"].items() if v.is_floating_point())


def test_bad_arguments_are_refused(tmp_path):
    td = _script()
    with pytest.raises(SystemExit):
        td.main(["--steps", "0", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit):
        td.main(["--out", str(tmp_path / "missing" / "x.pt")])


def test_worker_pool_swaps_in_fresh_scenes():
    """--workers: scenes made in worker processes replace pool items, at most max_swaps a call."""
    import time

    import numpy as np

    td = _script()
    pool = td.ScenePool(3, 64, seed=0, workers=1, max_swaps=2)
    try:
        first = [item[0].clone() for item in pool.items]
        start = pool.next
        deadline = time.time() + 60
        while pool.next == start and time.time() < deadline:
            time.sleep(0.2)
            pool.refresh(np.random.default_rng(0))
        assert pool.next - start in (1, 2)  # each swapped-in scene submits one new one
        img, masks, centers = pool.items[0]
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and masks.dtype == torch.bool
        assert centers.shape == (masks.shape[0], 2)
        assert any(not torch.equal(a[0], b) for a, b in zip(pool.items, first) if a[0].shape == b.shape) \
            or any(a[0].shape != b.shape for a, b in zip(pool.items, first))
    finally:
        pool.close()
