"""experiments/eval_combo.py: metric arithmetic, prompt-batching modes, CSV row, bad input."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import eval_combo as ec  # noqa: E402
from segment_anything_fast.data.coco_prompts import (  # noqa: E402
    CocoPointPromptDataset, load_coco, mask_iou, select_annotations,
)
from segment_anything_fast.data.synthetic_coco import encode_rle, write_coco_dataset  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth4")
    write_coco_dataset(str(root), 4, seed=1, size=(160, 120))
    return str(root)


def _args(root, tmp_path, *extra):
    return ["--coco-root", root, "--model-type", "tiny", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "r.csv"), *extra]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mask_iou_hand_made():
    p = torch.zeros(3, 4, 4, dtype=torch.bool)
    g = torch.zeros(3, 4, 4, dtype=torch.bool)
    p[0, :2] = True            # 8 px
    g[0, 1:3] = True           # 8 px, 4 shared -> 4 / 12
    p[1, 0, 0] = True          # disjoint -> 0
    g[1, 3, 3] = True
    # p[2], g[2] both empty -> 1 by convention
    np.testing.assert_allclose(mask_iou(p, g).numpy(), [4 / 12, 0.0, 1.0], rtol=1e-6)
    assert mask_iou(g[:2], g[:2]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(p, g[:, :3])


def _hand_dataset(tmp_path):
    """2 images, 3 annotations with known areas (one polygon, two RLE incl. a ring)."""
    import cv2

    root = tmp_path / "hand"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    h, w = 40, 50
    masks = {1: [np.zeros((h, w), bool)], 2: [np.zeros((h, w), bool), np.zeros((h, w), bool)]}
    masks[1][0][5:25, 10:30] = True
    masks[2][0][:, :10] = True
    ring = np.zeros((h, w), np.uint8)
    cv2.circle(ring, (30, 20), 12, 1, -1)
    cv2.circle(ring, (30, 20), 6, 0, -1)
    masks[2][1] = ring > 0
    images, anns = [], []
    for img_id, ms in masks.items():
        cv2.imwrite(str(root / "val2017" / f"{img_id}.png"), np.full((h, w, 3), 100, np.uint8))
        images.append({"id": img_id, "file_name": f"{img_id}.png", "width": w, "height": h})
        for m in ms:
            seg = [[10, 5, 29.999, 5, 29.999, 24.999, 10, 24.999]] if len(anns) == 0 else encode_rle(m)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1,
                         "segmentation": seg, "area": float(m.sum()), "bbox": [0, 0, 1, 1],
                         "iscrowd": 0})
    ds = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ds))
    return str(root), masks


def test_miou_pipeline_with_oracle_and_full_predictors(tmp_path, monkeypatch):
    root, _ = _hand_dataset(tmp_path)
    coco = load_coco(os.path.join(root, "annotations", "instances_val2017.json"))
    gt_areas = [coco.annToMask(a).sum() for a in coco.loadAnns(sorted(coco.getAnnIds()))]

    def oracle(sam, items, mode, device, dtype, static_batch=None, packed=None):
        return [it["gt_masks"].clone() for it in items]

    monkeypatch.setattr(ec, "predict_batch", oracle)
    assert ec.main(_args(root, tmp_path, "--batch-size", "2")) == 0
    assert float(_rows(tmp_path / "r.csv")[-1]["miou"]) == 1.0

    def full(sam, items, mode, device, dtype, static_batch=None, packed=None):
        return [torch.ones_like(it["gt_masks"]) for it in items]

    monkeypatch.setattr(ec, "predict_batch", full)
    assert ec.main(_args(root, tmp_path)) == 0
    expected = np.mean([a / (40 * 50) for a in gt_areas])
    row = _rows(tmp_path / "r.csv")[-1]
    assert abs(float(row["miou"]) - expected) < 1e-5
    assert row["n_annotations"] == "3" and row["n_images"] == "2"


def test_prompt_batching_modes_agree(synth):
    torch.manual_seed(0)
    args = ec.build_parser().parse_args(["--coco-root", synth, "--model-type", "tiny",
                                         "--device", "cpu"])
    sam = ec.build_model(args)
    coco = load_coco(os.path.join(synth, "annotations", "instances_val2017.json"))
    ids = sorted(coco.getImgIds())[:3]
    ds = CocoPointPromptDataset(coco, os.path.join(synth, "val2017"), ids,
                                select_annotations(coco, ids), 128)
    items = [ds[i] for i in range(3)]
    cpu = torch.device("cpu")
    ref = ec.predict_batch(sam, items, "none", cpu, torch.float32)
    assert [r.shape for r in ref] == [it["gt_masks"].shape for it in items]
    for mode, static in (("padded", None), ("nested", None), ("nested", 5)):
        # nested pads the prompts to a decoder bucket and, with static_batch, the embeddings
        out = ec.predict_batch(sam, items, mode, cpu, torch.float32, static)
        for a, b in zip(out, ref):
            assert (a ^ b).sum() <= 2, mode  # fp32 batch-order noise at most
    # The packed host side: images zero-padded to the static batch, prompt rows padded to a
    # decoder bucket (label -1), the normalisation equal to Sam.preprocess.
    p = ec.pack_nested(items, 128, 5)
    counts = [len(it["points"]) for it in items]
    assert p["images"].shape == (5, 3, 128, 128) and p["counts"] == counts
    assert p["prompts"].shape == (ec._packed_bucket(sum(counts)), 4)
    assert (p["prompts"][:sum(counts), 2] == 1).all() and (p["prompts"][sum(counts):, 2] == -1).all()
    assert p["prompts"][:sum(counts), 3].tolist() == sum(([j] * k for j, k in enumerate(counts)), [])
    x = ec.normalize_batch(sam, p["images"], p["sizes"], torch.float32)
    for j, it in enumerate(items):
        torch.testing.assert_close(x[j], sam.preprocess(it["image"]))
    assert (x[3:] == 0).all()
    assert p["total"] == sum(k * h * w for k, (h, w) in zip(counts, (it["original_size"] for it in items)))
    # The packed decoder equals MaskDecoder on one image.
    emb = ec._encode(sam, [items[0]["image"]], cpu, torch.float32)
    pts = items[0]["points"]
    sparse, dense = ec._prompt(sam, pts, torch.ones(len(pts), dtype=torch.int))
    with torch.no_grad():
        m1, i1 = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
        m2, i2 = ec.decode_packed(sam, emb, torch.zeros(len(pts), dtype=torch.long), sparse, dense)
    torch.testing.assert_close(m2[:, 1:], m1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(i2[:, 1:], i1, atol=1e-5, rtol=1e-5)


def test_warm_up_runs_every_padded_shape_once(synth):
    args = ec.build_parser().parse_args(["--coco-root", synth, "--model-type", "tiny",
                                         "--device", "cpu"])
    sam = ec.build_model(args, verbose=False)
    seen = []
    sam._packed_decoder = lambda s, emb, prompts: (
        seen.append((emb.shape[0], tuple(prompts.shape))), ec.decode_best(s, emb, prompts))[1]
    counts = [[3, 5], [20, 30], [1, 2], [200, 100]]  # totals 8, 50, 3, 300 prompts
    n = ec.warm_up_decoders(sam, "nested", counts, 2, torch.device("cpu"), torch.float32)
    assert n == 3 and seen == [(2, (8, 4)), (2, (64, 4)), (2, (512, 4))]
    assert [ec._packed_bucket(k) for k in (1, 8, 9, 256, 257, 600)] == [1, 8, 32, 256, 512, 768]
    calls = []
    sam.mask_decoder.register_forward_pre_hook(
        lambda mod, args, kw: calls.append(kw["sparse_prompt_embeddings"].shape[0]), with_kwargs=True)
    assert ec.warm_up_decoders(sam, "padded", [[3, 9], [0, 16]], 2, torch.device("cpu"), torch.float32) == 2
    assert calls == [8, 16]


def test_decoder_warm_up_matches_the_timed_embedding_layout(synth):
    """The packed decoder compiled by warm_up_decoders is reused by the timed batches: the
    encoder's embeddings reach it in the warm-up's layout (decoder_layout, channels last:
    token rows contiguous), so no stride guard fails and nothing recompiles."""
    args = ec.build_parser().parse_args(["--coco-root", synth, "--model-type", "tiny", "--device", "cpu"])
    sam = ec.build_model(args, verbose=False)
    coco = load_coco(os.path.join(synth, "annotations", "instances_val2017.json"))
    ids = sorted(coco.getImgIds())[:3]
    ds = CocoPointPromptDataset(coco, os.path.join(synth, "val2017"), ids, select_annotations(coco, ids), 128)
    items = [ds[i] for i in range(3)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    sam._packed_decoder = torch.compile(ec.decode_best, backend=backend, dynamic=False)
    cpu = torch.device("cpu")
    counts = [[len(it["points"]) for it in items]]
    with torch.inference_mode():
        ec.warm_up_decoders(sam, "nested", counts, 3, cpu, torch.float32)
        warmed = len(graphs)
        out = ec.predict_batch(sam, items, "nested", cpu, torch.float32, 3)
    assert warmed == 1 and len(graphs) == warmed
    assert [o.shape for o in out] == [it["gt_masks"].shape for it in items]
    emb = ec._encode(sam, [items[0]["image"]], cpu, torch.float32)
    assert emb.is_contiguous(memory_format=torch.channels_last)


def test_post_processing_warm_up_leaves_no_compile_for_the_timing():
    """warm_up_postprocess: after it, masks of any warmed image size and any mask count reuse
    the compiled post-processing (a compile inside the timing cost 4x in session 9)."""
    from segment_anything_fast.compile import compile_postprocess

    args = ec.build_parser().parse_args(["--coco-root", "unused", "--model-type", "tiny", "--device", "cpu"])
    sam = ec.build_model(args, verbose=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compile_postprocess(sam, backend=backend)
    sizes = [(120, 160), (90, 160), (160, 120), (120, 160)]
    assert ec.warm_up_postprocess(sam, sizes, torch.device("cpu"), torch.float32) == 9
    warmed = len(graphs)
    assert warmed >= 2
    h, w = sam.prompt_encoder.image_embedding_size
    for k in (1, 2, 4, 7):
        for size in sizes[:3]:
            inp = ec.ResizeLongestSide.get_preprocess_shape(*size, sam.image_encoder.img_size)
            with torch.inference_mode():  # as predict_batch runs it, on inference tensors
                low = torch.randn(k, 1, 4 * h, 4 * w)
                got = sam.masks_from_logits(low, inp, size)
            assert got.shape == (k, 1, *size) and got.dtype == torch.bool
            assert torch.equal(got, sam.postprocess_masks(low, inp, size) > sam.mask_threshold)
    assert len(graphs) == warmed  # nothing compiled after the warm-up


def test_end_to_end_csv_row_and_cache(synth, tmp_path, capsys):
    args = _args(synth, tmp_path, "--batch-size", "2", "--num-workers", "1",
                 "--prompt-batching", "nested", "--limit", "4")
    assert ec.main(args) == 0
    out = capsys.readouterr()
    assert "RANDOM weights" in out.err and "mIoU" in out.out
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 1
    row = rows[0]
    assert tuple(row) == ec.CSV_FIELDS
    for k in ec.CSV_FIELDS:
        if k != "peak_gpu_memory_mib":  # empty on CPU by design
            assert row[k] != "", k
    assert row["n_images"] == "4" and row["timed_images"] == "2" and row["warmup_batches"] == "1"
    assert 0.0 <= float(row["miou"]) <= 1.0
    assert float(row["img_per_s_model"]) > 0 and float(row["img_per_s_end_to_end"]) > 0
    assert float(row["img_per_s_encoder_only"]) > 0 and float(row["end_to_end_vs_encoder"]) > 0
    assert 0.0 <= float(row["loader_wait_fraction"]) <= 1.0
    assert "image encoder alone" in out.out and "waited for the data workers" in out.out
    assert row["torch_version"] == torch.__version__ and row["gpu_name"] == "cpu"
    assert row["checkpoint"].startswith("random-init")
    cache_files = os.listdir(tmp_path / "cache")
    assert len(cache_files) == 1
    cached = json.load(open(tmp_path / "cache" / cache_files[0]))
    assert len(cached) == int(row["n_annotations"])
    # Second run: points come from the cache, same seed -> same mIoU; --commit is recorded.
    # --encoder-iters 0 skips the encoder-alone timing.
    assert ec.main(args + ["--commit", "abc123", "--encoder-iters", "0"]) == 0
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 2 and rows[1]["miou"] == rows[0]["miou"]
    assert rows[1]["img_per_s_encoder_only"] == "" and rows[1]["end_to_end_vs_encoder"] == ""
    assert rows[1]["git_commit"] == "abc123" and rows[0]["git_commit"] != "abc123"
    # --mlp-epilogue on: recorded, same masks within float32 noise (exact GELU on the CPU)
    assert ec.main(args + ["--encoder-iters", "0", "--mlp-epilogue", "on"]) == 0
    rows = _rows(tmp_path / "r.csv")
    assert rows[0]["mlp_epilogue"] == "off" and rows[2]["mlp_epilogue"] == "on"
    assert float(rows[2]["miou"]) == pytest.approx(float(rows[0]["miou"]), abs=1e-3)


def test_profile_file_after_the_timing(synth, tmp_path, capsys):
    # 4 images in batches of 3: the last full batch (3 images) is the one profiled.
    args = _args(synth, tmp_path, "--limit", "4", "--batch-size", "3", "--encoder-iters", "0",
                 "--profile", "1")
    assert ec.main(args) == 0
    assert "wrote the profile to" in capsys.readouterr().err
    assert _rows(tmp_path / "r.csv")[-1]["timed_images"] == "1"
    text = (tmp_path / "r_profile.txt").read_text()
    assert "3 images" in text and "ms wall per call" in text
    for label in ("predict_batch (padded)", "image encoder alone (_encode)"):
        assert label in text
    assert not (tmp_path / "r_profile.txt.tmp").exists()
    assert ec.main(args[:-2]) == 0  # off by default: no profile run
    assert "wrote the profile" not in capsys.readouterr().err
    # the decoder-side section (CUDA profiles): predict_batch's kernels minus the encoder's
    text = ec.kernel_difference({"gemm": 10.0, "upscale": 0.9, "attn": 1.2, "tiny": 0.0001},
                                {"gemm": 9.5, "attn": 1.2, "norm": 0.3}, "decoder side")
    assert text.splitlines() == ["--- decoder side: 1.40 ms GPU per call in 2 kernel names",
                                 "   0.900 ms upscale", "   0.500 ms gemm"]


def test_missing_image_reported_and_skipped(synth, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    os.remove(root / "val2017" / "000000000002.jpg")
    assert ec.main(_args(str(root), tmp_path, "--limit", "3", "--warmup-batches", "0")) == 0
    err = capsys.readouterr().err
    assert "missing" in err and "000000000002.jpg" in err
    row = _rows(tmp_path / "r.csv")[-1]
    assert row["n_skipped_images"] == "1" and row["n_images"] == "2"
    for f in os.listdir(root / "val2017"):
        os.remove(root / "val2017" / f)
    assert ec.main(_args(str(root), tmp_path)) == 2
    assert "None of the" in capsys.readouterr().err


def test_bad_annotations_and_flags(tmp_path, capsys):
    root, _ = _hand_dataset(tmp_path)
    ann_path = os.path.join(root, "annotations", "instances_val2017.json")
    ds = json.load(open(ann_path))
    ds["annotations"][1]["segmentation"] = []
    bad_path = tmp_path / "noseg.json"
    bad_path.write_text(json.dumps(ds))
    assert ec.main(_args(root, tmp_path, "--annotations", str(bad_path))) == 2
    assert "no 'segmentation'" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert ec.main(_args(root, tmp_path, "--annotations", str(empty))) == 2
    assert "lists no images" in capsys.readouterr().err
    assert ec.main(_args(root, tmp_path, "--annotations", str(tmp_path / "nope.json"))) == 2
    assert "not found" in capsys.readouterr().err
    for flag, value in [("--prompt-batching", "ragged"), ("--compile", "fast"),
                        ("--attention", "nope"), ("--dtype", "fp16"), ("--model-type", "vit_x"),
                        ("--compress", "int3"), ("--decoder-attention", "flash"),
                        ("--postprocess", "fused"), ("--mlp-epilogue", "yes")]:
        with pytest.raises(SystemExit) as e:
            ec.main(_args(root, tmp_path, flag, value))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert value in err and "choose one of" in err, (flag, err)
    with pytest.raises(SystemExit):
        ec.main(_args(root, tmp_path, "--batch-size", "0"))
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ec.main(_args(root, tmp_path, "--encoder-iters", "-1"))
    assert "--encoder-iters must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ec.main(_args(root, tmp_path, "--profile", "-1"))
    assert "--profile must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ec.main(_args(root, tmp_path, "--mlp-epilogue", "on", "--compress", "int8_dynamic"))
    assert "--mlp-epilogue on needs plain lin1" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        ec.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--coco-root", "--annotations", "--limit", "--batch-size", "--model-type",
                 "--checkpoint", "--device", "--dtype", "--compile", "--attention",
                 "--prompt-batching", "--compress", "--num-workers", "--output", "--config-json",
                 "--encoder-iters", "--profile", "--postprocess", "--mlp-epilogue"):
        assert flag in out
    assert "not torch.nested" in out


def test_checkpoint_and_config_json(synth, tmp_path, capsys):
    import dataclasses

    from segment_anything_fast.build_sam import SAM_CONFIGS, build_sam

    torch.manual_seed(123)
    ckpt = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), ckpt)
    common = ["--limit", "2", "--checkpoint", str(ckpt), "--warmup-batches", "0"]
    assert ec.main(_args(synth, tmp_path, *common, "--seed", "1")) == 0
    assert ec.main(_args(synth, tmp_path, *common, "--seed", "2")) == 0
    assert "RANDOM" not in capsys.readouterr().err
    rows = _rows(tmp_path / "r.csv")
    assert rows[0]["checkpoint"] == str(ckpt) and rows[0]["miou"] == rows[1]["miou"]
    cfg = dict(dataclasses.asdict(SAM_CONFIGS["tiny"]), encoder_depth=2,
               encoder_global_attn_indexes=[1])
    assert ec.main(_args(synth, tmp_path, "--limit", "1", "--config-json", json.dumps(cfg))) == 0
    assert _rows(tmp_path / "r.csv")[-1]["model_type"] == "custom"
    assert ec.main(_args(synth, tmp_path, "--config-json", '{"encoder_embed_dim": "wide"')) == 2
    assert "--config-json" in capsys.readouterr().err


def test_graph_steps_copy_outputs_out_of_the_graph_pool():
    out = (torch.ones(3), torch.zeros(2))
    a, b = ec._graph_steps(lambda *args: out)(1, 2)
    assert torch.equal(a, out[0]) and torch.equal(b, out[1])
    assert a.data_ptr() != out[0].data_ptr() and b.data_ptr() != out[1].data_ptr()


def test_nested_collate_packs_ground_truth_and_slims_items(synth):
    from segment_anything_fast.data.coco_prompts import pack_masks, unpack_mask_groups, unpack_masks

    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.random(s) > 0.5) for s in ((2, 5, 7), (0, 3, 3), (1, 9, 1), (3, 4, 4))]
    masks[3] = masks[3].transpose(1, 2).contiguous().transpose(1, 2)  # the dataset's layout, same values
    bits, n = pack_masks(masks)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-n // 8) and n == sum(m.numel() for m in masks)
    # column by column within each mask
    assert torch.equal(unpack_masks(bits, n), torch.cat([m.transpose(1, 2).flatten() for m in masks]))
    groups = unpack_mask_groups(bits, n, [tuple(m.shape) for m in masks])
    assert all(torch.equal(g, m) for g, m in zip(groups, masks))
    coco = load_coco(os.path.join(synth, "annotations", "instances_val2017.json"))
    ids = sorted(coco.getImgIds())[:3]
    ds = CocoPointPromptDataset(coco, os.path.join(synth, "val2017"), ids, select_annotations(coco, ids), 128)
    full = [ds[i] for i in range(3)]
    slim, packed = ec.NestedCollate(128, 4)([ds[i] for i in range(3)])
    assert all(k not in it for it in slim for k in ("image", "points", "gt_masks"))
    assert [it["image_id"] for it in slim] == [it["image_id"] for it in full]
    gts = ec._ground_truth(slim, packed, torch.device("cpu"))
    assert all(torch.equal(g, it["gt_masks"]) for g, it in zip(gts, full))
    assert [g.shape[0] for g in gts] == packed["counts"]


def test_dataset_item_masks_points_and_bad_annotations(tmp_path):
    """One decode for all of an image's annotations: (K, H, W) ground truth equal to
    pycocotools' annToMask, degenerate (empty) annotations dropped, a mask whose size is not the
    image's reported, an image without annotations gives empty tensors."""
    import cv2

    from segment_anything_fast.data.synthetic_coco import encode_rle

    h, w = 30, 40
    os.makedirs(tmp_path / "img")
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / "img" / name), np.full((h, w, 3), 90, np.uint8))
    ring = np.zeros((h, w), bool)
    ring[5:25, 5:35] = True
    ring[10:20, 10:30] = False
    wrong = np.zeros((h + 1, w), bool)
    wrong[2:5, 2:5] = True
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": encode_rle(np.zeros((h, w), bool))},  # no pixels
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": encode_rle(ring)},
        {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": encode_rle(wrong)},
    ]
    images = [{"id": 1, "file_name": "a.png", "height": h, "width": w},
              {"id": 2, "file_name": "b.png", "height": h, "width": w},
              {"id": 3, "file_name": "b.png", "height": h, "width": w}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    coco = load_coco(str(path))
    ds = CocoPointPromptDataset(coco, str(tmp_path / "img"), [1, 2, 3], select_annotations(coco, [1, 2, 3]), 64)
    item = ds[0]
    assert item["error"] is None and item["ann_ids"] == [1, 3]
    want = torch.from_numpy(np.stack([coco.annToMask(anns[0]), ring]).astype(bool))
    assert item["gt_masks"].shape == (2, h, w) and torch.equal(item["gt_masks"], want)
    x, y = item["points"][1].tolist()
    scale = 64 / w
    assert ring[round(y / scale), round(x / scale)]  # the ring's point lies on the ring
    empty = ds[1]
    assert empty["error"] is None and empty["gt_masks"].shape == (0, h, w) and empty["points"].shape == (0, 2)
    assert ds[2]["error"] == f"annotation 4 mask is {w}x{h + 1} but the image is {w}x{h}"
