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
    with pytest.raises(SystemExit):
        td.main(["--center-prob", "1.5", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit):
        td.main(["--iou-weight", "-1", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit):  # parts of a state that is not written
        td.main(["--state-part-mb", "15", "--out", str(tmp_path / "x.pt")])


def test_worker_pool_swaps_in_fresh_scenes():
    """--workers: scenes made in worker processes replace pool slots, at most max_swaps a call."""
    import time

    import numpy as np

    td = _script()
    pool = td.ScenePool(3, 64, seed=0, workers=1, max_swaps=2)
    try:
        first = pool.images.clone()
        start = pool.next
        deadline = time.time() + 60
        while pool.next == start and time.time() < deadline:
            time.sleep(0.2)
            pool.refresh(np.random.default_rng(0))
        assert pool.next - start in (1, 2)  # each swapped-in scene submits one new one
        assert not torch.equal(pool.images, first)
        assert pool.images.dtype == torch.uint8 and pool.masks.dtype == torch.bool
    finally:
        pool.close()


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """--compile takes an optional mode (bare: default) and hands it to torch.compile; an
    unknown mode is refused."""
    td = _script()
    modes = []

    def fake_compile(fn, mode=None, **kw):
        modes.append(mode)
        return fn

    monkeypatch.setattr(td.torch, "compile", fake_compile)
    flags = ["--steps", "2", "--pool", "2", "--batch", "2", "--prompts", "2", "--heldout", "1",
             "--out", str(tmp_path / "x.pt")]
    assert td.main(flags + ["--compile", "reduce-overhead"]) == 0
    assert td.main(flags + ["--compile"]) == 0
    assert modes == ["reduce-overhead", "default"]
    with pytest.raises(SystemExit):
        td.main(flags + ["--compile", "max-speed"])


def test_pool_slots_hold_the_scenes_exactly():
    """Packed transfer (image + label map + meta row, unpacked on the device) reproduces every
    array of scene_arrays, padded bottom-right; a refresh that draws one slot twice keeps the
    later scene; overlapping masks are refused rather than merged."""
    import numpy as np

    from segment_anything_fast.data.demo_scenes import pack_scene, scene_arrays

    td = _script()

    def check(pool, slot, index):
        img, masks, centers = scene_arrays(0, index, 80)
        k, (h, w) = masks.shape[0], img.shape[1:]
        assert torch.equal(pool.images[slot, :, :h, :w], torch.from_numpy(img))
        assert not pool.images[slot, :, h:].any() and not pool.images[slot, :, :, w:].any()
        assert torch.equal(pool.masks[slot, :k, :h, :w], torch.from_numpy(masks))
        assert not pool.masks[slot, k:].any() and pool.masks[slot].sum() == int(masks.sum())
        assert torch.equal(pool.centers[slot, :k], torch.from_numpy(centers))
        assert pool.counts[slot] == k and pool.hw[slot].tolist() == [h, w]

    pool = td.ScenePool(20, 80, seed=0)  # two staging chunks (STAGE = 16)
    assert pool.next == 20  # no scene of these seeds is empty
    for i in range(20):
        check(pool, i, i)

    class Draws:  # an rng whose integers() returns the given slots
        def __init__(self, slots):
            self.slots = iter(slots)

        def integers(self, n):
            return next(self.slots)

    scenes = [pool._make_next() for _ in range(3)]
    pool._put([3, 7, 3], scenes)
    check(pool, 3, 22)
    check(pool, 7, 21)
    check(pool, 4, 4)
    pool.refresh(Draws([5]))  # workers=0: one new scene per refresh, in the drawn slot
    check(pool, 5, 23)

    img, masks, centers = scene_arrays(0, 0, 80)
    masks = np.concatenate([masks, masks[:1]])
    with pytest.raises(ValueError, match="overlap"):
        pack_scene((img, masks, np.concatenate([centers, centers[:1]])), 80)


def test_pool_batches_and_prompts_are_consistent():
    """Flips act within each image's width on image, masks and centers alike; every point lies
    in its object's mask; boxes (before noise) are the masks' tight boxes."""
    td = _script()
    pool = td.ScenePool(4, 96, seed=3)
    gen = torch.Generator().manual_seed(0)
    flipped = 0
    for _ in range(6):
        images, masks, centers, counts, hw = pool.batch(4, gen)
        for b in range(4):
            slot = next(i for i in range(4) if torch.equal(pool.hw[i], hw[b]) and pool.counts[i] == counts[b]
                        and (torch.equal(pool.masks[i], masks[b]) or torch.equal(
                            pool.masks[i, :, :, :hw[b, 1]].flip(-1), masks[b, :, :, :hw[b, 1]])))
            h, w = hw[b].tolist()
            if not torch.equal(pool.images[slot], images[b]):
                flipped += 1
                assert torch.equal(pool.images[slot, :, :, :w].flip(-1), images[b, :, :, :w])
                assert torch.equal(pool.centers[slot, :counts[b], 0], w - 1 - centers[b, :counts[b], 0])
            assert not masks[b, :, h:].any() and not masks[b, :, :, w:].any()
            for j in range(int(counts[b])):
                x, y = centers[b, j].long().tolist()
                assert masks[b, j, y, x]
        gt, pts, boxes = td.sample_prompts(masks, centers, counts, 5, gen)
        assert gt.shape == (20, 96, 96) and gt.flatten(1).any(1).all()
        assert gt[torch.arange(20), pts[:, 1].long(), pts[:, 0].long()].all()
        ys, xs = torch.nonzero(gt[0], as_tuple=True)
        tight = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
        side = (tight[2:] - tight[:2]).repeat(2)
        assert ((boxes[0] - tight).abs() <= torch.minimum(side * 0.6, torch.tensor(20.0)) + 1e-4).all()
        state = gen.get_state()  # --center-prob 1: every point is its object's center point
        gt1, pts1, _ = td.sample_prompts(masks, centers, counts, 5, gen, center_prob=1.0)
        gen.set_state(state)
        obj = [next(j for j in range(int(counts[b])) if torch.equal(masks[b, j], gt1[b * 5 + i]))
               for b in range(4) for i in range(5)]
        assert torch.equal(pts1, torch.stack([centers[r // 5, j] for r, j in enumerate(obj)]))
    assert 0 < flipped < 24


@pytest.mark.parametrize("part_mb", [None, "0.2"])
def test_stop_and_resume_continue_one_schedule(tmp_path, monkeypatch, part_mb):
    """--stop-after writes --state mid-schedule (one file, or --state-part-mb parts listed by
    it); --resume finishes the same schedule (step count, optimizer steps, scene numbering) and
    refuses other schedule flags."""
    td = _script()
    state, out = str(tmp_path / "state.pt"), str(tmp_path / "demo.pt")
    flags = ["--steps", "6", "--minutes", "1000", "--pool", "3", "--batch", "2", "--prompts", "2",
             "--heldout", "1", "--state", state, "--out", out]
    if part_mb is not None:
        flags += ["--state-part-mb", part_mb]
    clock = iter(range(0, 10**6, 2))  # every time.time() call advances 2 s
    monkeypatch.setattr(td.time, "time", lambda: float(next(clock)))
    assert td.main(flags + ["--stop-after", "0.4"]) == 0  # 24 s of fake training time
    monkeypatch.undo()
    first = td.read_state(state)
    assert 0 < first["step"] < 6
    if part_mb is not None:  # parts of at most 0.2 MB, and the index file is small
        parts = sorted(tmp_path.glob("state.pt.part*"))
        assert len(parts) > 1 and all(p.stat().st_size <= 0.2 * 2**20 for p in parts)
        assert os.path.getsize(state) < 16384
    part = torch.load(out, weights_only=True)["meta"]
    assert part["steps"] == first["step"] and part["schedule_finished"] is False
    with pytest.raises(SystemExit):
        td.main(flags + ["--resume", state, "--lr", "5e-3"])
    assert td.main(flags + ["--resume", state]) == 0
    final = td.read_state(state)
    assert final["step"] == 6 and final["scenes_made"] > first["scenes_made"]
    assert all(int(s["step"]) == 6 for s in final["opt"]["state"].values())
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["steps"] == 6 and meta["schedule_finished"] is True


def test_compiled_model_loss_matches_eager():
    """--compile: model_loss traces as one graph (no graph breaks), forward and backward, and
    gives the eager loss and gradients. (aot_eager backend: the same dynamo + autograd capture
    as inductor without its minutes of C++ compilation on the CI CPU.)"""
    from tests.oracle import TINY

    td = _script()
    sam = build_sam(TINY).train()
    pool = td.ScenePool(2, TINY.image_size, seed=0)
    gen = torch.Generator().manual_seed(0)
    inputs = td.prompt_batch(sam, pool.batch(2, gen), 2, gen)
    losses, grads = [], []
    for fn in (td.model_loss, torch.compile(td.model_loss, backend="aot_eager", fullgraph=True)):
        sam.zero_grad()
        loss = fn(sam, *inputs, 2)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in sam.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)


def test_iou_weight_scales_only_the_iou_term():
    """--iou-weight w: loss(w) = masks + w x IoU-MSE, so the loss is linear in w with a positive
    slope, and at w = 0 the IoU head gets no gradient."""
    from tests.oracle import TINY

    td = _script()
    sam = build_sam(TINY).train()
    pool = td.ScenePool(2, TINY.image_size, seed=0)
    gen = torch.Generator().manual_seed(0)
    inputs = td.prompt_batch(sam, pool.batch(2, gen), 2, gen)
    with torch.no_grad():
        l0, l1, l3 = (td.model_loss(sam, *inputs, 2, iou_weight=w) for w in (0.0, 1.0, 3.0))
    assert l1 > l0
    torch.testing.assert_close(l3 - l0, 3 * (l1 - l0), rtol=1e-4, atol=1e-6)
    sam.zero_grad()
    td.model_loss(sam, *inputs, 2, iou_weight=0.0).backward()
    head = sam.mask_decoder.iou_prediction_head.parameters()
    assert all(p.grad is None or not p.grad.any() for p in head)
