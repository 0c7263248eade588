"""CPU smoke of experiments/bench_amg.py and experiments/run_experiments.py (tiny model), plus
the mask matching and threshold choice of bench_amg on hand-made data."""
import csv
import json
import os
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, ROOT)

import aoti_load_check  # noqa: E402
import bench_amg  # noqa: E402
import bench_attention  # noqa: E402
import bench_encoder  # noqa: E402
import bench_fp8_quant  # noqa: E402
import bench_int8_matmul  # noqa: E402
import bench_loader  # noqa: E402
import bench_postprocess  # noqa: E402
import cold_start  # noqa: E402
import demo_fidelity  # noqa: E402
import run_experiments  # noqa: E402


def _square(y, x, s=4, hw=(16, 16)):
    m = np.zeros(hw, bool)
    m[y : y + s, x : x + s] = True
    return m


def test_match_identical_sets_is_one():
    a = [_square(0, 0), _square(8, 8), _square(0, 10)]
    r = bench_amg.match_masks(a, list(reversed(a)))
    assert r["n_matched"] == 3 and r["matched_iou_mean"] == 1.0 and r["set_iou"] == 1.0


def test_match_disjoint_sets_is_zero():
    r = bench_amg.match_masks([_square(0, 0)], [_square(10, 10), _square(0, 10)])
    assert r["n_matched"] == 0 and r["matched_iou_mean"] == 0.0 and r["set_iou"] == 0.0
    assert (r["n_ref"], r["n_other"]) == (1, 2)


def test_match_partial_overlap_by_hand():
    # shifted by one column: 12 shared px of 20 -> 0.6; the assignment must pair the right masks
    a = [_square(0, 0), _square(8, 8)]
    b = [_square(8, 9), _square(0, 0)]
    r = bench_amg.match_masks(a, b)
    assert r["n_matched"] == 2
    assert r["matched_iou_mean"] == pytest.approx((1.0 + 0.6) / 2)
    assert r["matched_iou_min"] == pytest.approx(0.6)
    # below min_iou a pair does not count as matched
    r = bench_amg.match_masks(a, b, min_iou=0.7)
    assert r["n_matched"] == 1 and r["set_iou"] == pytest.approx(0.5)
    assert bench_amg.match_masks([], [])["set_iou"] == 1.0


def test_choose_thresholds_hits_target_and_falls_back():
    g = torch.Generator().manual_seed(0)
    n = 300
    iou = torch.rand(n, generator=g)
    stab = torch.rand(n, generator=g)
    # disjoint boxes: NMS keeps everything that passes the filters
    x = torch.arange(n) * 10
    boxes = torch.stack([x, torch.zeros(n, dtype=torch.long), x + 5, torch.full((n,), 5)], 1)
    t_iou, t_stab, q, n_after, passing, how = bench_amg.choose_thresholds(iou, stab, boxes, 100, 50)
    assert abs(n_after - 100) <= 15 and n_after == passing and "after NMS" in how
    assert int(bench_amg.passes(iou, stab, t_iou, t_stab).sum()) == passing
    # identical boxes: NMS keeps one, so the candidate count is targeted instead
    same = torch.tensor([[0, 0, 50, 50]]).repeat(n, 1)
    t_iou, t_stab, q, n_after, passing, how = bench_amg.choose_thresholds(iou, stab, same, 100, 50)
    assert n_after == 1 and abs(passing - 50) <= 10 and "candidates pass" in how
    # the same boxes with box NMS off (threshold 1.0): the mask target is reachable again
    t_iou, t_stab, q, n_after, passing, how = bench_amg.choose_thresholds(iou, stab, same, 100, 50, 1.0)
    assert abs(n_after - 100) <= 15 and n_after == passing and "after NMS" in how


def test_thresholds_keep_clear_of_tied_scores():
    """Saturated scores (random weights: many exactly 1.0) get a threshold in the gap below the
    tie, not at it, so a score rounded in bf16 passes the filter as it does in fp32."""
    iou = torch.cat([torch.full((900,), 1.25), torch.linspace(0.5, 0.9, 100)])
    stab = torch.cat([torch.ones(900), torch.linspace(0.8, 0.99, 100)])
    x = torch.arange(1000) * 10
    boxes = torch.stack([x, torch.zeros(1000, dtype=torch.long), x + 5, torch.full((1000,), 5)], 1)
    t_iou, t_stab, _, n_after, passing, _ = bench_amg.choose_thresholds(iou, stab, boxes, 100, 50)
    assert n_after == passing == 900
    assert 0.9 < t_iou < 1.0 and 0.99 < t_stab < 1.0
    assert bench_amg.below_gap(stab, 0.8) == 0.8  # nothing below: unchanged


def test_bench_amg_cpu_smoke(tmp_path):
    out = tmp_path / "amg"
    bench_amg.main(["--device", "cpu", "--model-type", "tiny", "--impls", "orig,ours",
                    "--resize-long", "64", "--points-per-side", "6", "--iters", "1", "--warmup", "0",
                    "--target-candidates", "30", "--box-nms-thresh", "1.0", "--profile", "--out-dir", str(out)])
    with open(out / "amg_tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["orig", "ours"]
    assert all(r["status"] == "ok" for r in rows), rows
    for col in ("s_per_image", "n_masks", "speedup_vs_orig", "gpu", "torch", "commit",
                "pred_iou_thresh", "stability_thresh", "threshold_source", "points_per_side"):
        assert rows[1][col] != "", col
    assert float(rows[1]["s_per_image"]) > 0 and rows[1]["gpu"] == "cpu"
    assert all(float(r["encoder_s"]) > 0 for r in rows)
    prof = (out / "amg_tiny_profile_ours.txt").read_text()
    assert "wall per call" in prof and "aten::" in prof
    assert rows[1]["matched_iou_mean"] != "" and int(rows[1]["n_orig_masks"]) == int(rows[0]["n_masks"])
    assert rows[0]["threshold_source"].startswith("auto")
    assert all(float(r["box_nms_thresh"]) == 1.0 for r in rows)
    assert all(r["weights"] == "random(seed=0)" for r in rows)
    meta = json.loads((out / "amg_tiny.json").read_text())
    assert meta["meta"]["torch"] == torch.__version__ and len(meta["rows"]) == 2
    assert (out / "amg_tiny_overlay.png").stat().st_size > 0


def test_bench_amg_names_the_weights_it_loads():
    demo = bench_amg.weights_file("demo")
    assert demo.endswith("sam_demo.pt") and os.path.isfile(demo)
    assert bench_amg.weights_file("demo", "mine.pt") == "mine.pt"
    assert bench_amg.weights_file("vit_h", "demo") == demo and bench_amg.weights_file("vit_h") is None
    assert bench_amg.weights_label(demo, 0) == os.path.join("segment_anything_fast", "assets", "sam_demo.pt")
    assert bench_amg.weights_label("/elsewhere/x.pth", 0) == "/elsewhere/x.pth"
    assert bench_amg.weights_label(None, 3) == "random(seed=3)"


def test_bench_amg_bad_flags(tmp_path):
    for argv in (["--impls", "orig,nope"], ["--impls", "peer"],
                 ["--pred-iou-thresh", "0.5"], ["--iters", "-1"], ["--box-nms-thresh", "0"],
                 ["--ours-postprocess-compile", "fastest"]):
        with pytest.raises(SystemExit):
            bench_amg.main(["--device", "cpu", "--model-type", "tiny", "--out-dir", str(tmp_path)] + argv)


def test_bench_encoder_compress_linears_columns(capsys):
    """bench_encoder rows say which linears were compressed; bad --ours-compress-linears values
    stop the run before any GPU work."""
    keys = bench_encoder.CSV_KEYS
    assert len(set(keys)) == len(keys) and {"compress", "compress_linears", "mlp_epilogue"} <= set(keys)
    assert keys.index("compress") < keys.index("compress_linears") < keys.index("img_per_s")
    assert bench_encoder.compress_columns() == {"compress": "none", "compress_linears": ""}
    assert bench_encoder.compress_columns("fp8", ("qkv", "proj", "lin1")) == {
        "compress": "fp8", "compress_linears": "qkv+proj+lin1"}
    assert bench_encoder.compress_columns("int8_dynamic")["compress_linears"] == "qkv+proj+lin1+lin2"
    for argv, err in ((["lin9"], "invalid choice: 'lin9'"), (["lin1", "lin1"], "'lin1' more than once"),
                      ([], "expected at least one argument")):
        with pytest.raises(SystemExit) as e:
            bench_encoder.main(["--ours-compress", "fp8", "--ours-compress-linears", *argv])
        assert e.value.code == 2 and err in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_encoder.main(["--ours-mlp-epilogue", "maybe"])
    assert e.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_gpu_kernel_benches_refuse_bad_flags_and_the_cpu(capsys, tmp_path):
    """bench_postprocess / bench_fp8_quant / bench_int8_matmul / bench_attention time GPU kernels: a clear parser error without CUDA,
    and for unusable flags before any work."""
    for main, argv in ((bench_postprocess.main, []), (bench_fp8_quant.main, []), (bench_int8_matmul.main, []),
                       (bench_attention.main, [])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    for argv, err in ((["--tiles", "3x100"], "two powers of two"), (["--tiles", "8by128"], "ROWSxCOLS"),
                      (["--baseline", str(tmp_path / "missing.py")], "is not a file")):
        with pytest.raises(SystemExit) as e:
            bench_postprocess.main(argv)
        assert e.value.code == 2 and err in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_int8_matmul.main(["--rows", "0"])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_fp8_quant.main(["--row-elements", "2048", "--num-warps", "3"])
    assert e.value.code == 2 and "powers of two up to 16" in capsys.readouterr().err
    # the cases and the reference quantization
    assert bench_postprocess.CASES[0] == (64, 3, (768, 1024), (768, 1024))
    ref_q, ref_s = bench_fp8_quant.reference(torch.tensor([[1.0, -2.0, 448.0]]), "none")
    assert torch.equal(ref_q.float(), torch.tensor([[1.0, -2.0, 448.0]])) and ref_s.item() == 1.0
    x = torch.tensor([[1.0, 3.0]])  # layer norm first: (-1, 1) -> scale 1 / 448
    ref_q, ref_s = bench_fp8_quant.reference(x, "none", (torch.ones(2), torch.zeros(2), 0.0))
    assert torch.equal(ref_q.float(), torch.tensor([[-448.0, 448.0]])) and abs(ref_s.item() - 1 / 448) < 1e-9


def test_waterfall_settings_accumulate():
    s = run_experiments.step_settings("max-autotune", "triton", "triton")
    assert s["fp32"] == run_experiments.BASE
    assert s["batched_prompts"]["upscaling"] == "conv" and s["fused_upscale"]["upscaling"] == "triton"
    assert s["fused_upscale"]["decoder_attention"] == "sdpa"
    assert s["fused_decoder_attention"]["decoder_attention"] == "triton"
    assert s["fused_decoder_attention"]["postprocess"] == "torch"
    assert s["fused_postprocess"]["postprocess"] == "triton"
    assert s["fused_postprocess"]["preprocess"] == "host" and s["fused_preprocess"]["preprocess"] == "triton"
    assert s["int8"] == dict(dtype="bfloat16", compile="max-autotune", attention="triton",
                             upscaling="triton", decoder_attention="triton", postprocess="triton",
                             preprocess="triton", prompt_batching="nested", compress="int8_dynamic",
                             mlp_epilogue="off")
    assert s["fused_preprocess"]["mlp_epilogue"] == "off" and s["mlp_epilogue"]["mlp_epilogue"] == "on"
    assert s["fp8"]["compress"] == "fp8" and s["fp8"]["prompt_batching"] == "nested"
    assert s["fp8_triton"]["compress"] == "fp8_triton" and s["fp8_triton"]["mlp_epilogue"] == "off"
    assert s["int8_triton"]["compress"] == "int8_triton" and s["int8_triton"]["mlp_epilogue"] == "off"


def test_every_step_setting_reaches_eval_combo():
    # each step's settings must arrive in eval_combo's parsed flags, not only in the CSV row
    import eval_combo

    for step, settings in run_experiments.step_settings("reduce-overhead", "triton", "triton").items():
        args = eval_combo.build_parser().parse_args(["--coco-root", "x"] + run_experiments.settings_argv(settings))
        for key, value in settings.items():
            assert getattr(args, key) == value, (step, key)


def test_run_experiments_cpu_smoke(tmp_path):
    out = tmp_path / "wf"
    rows = run_experiments.main(["--device", "cpu", "--models", "tiny", "--steps", "bf16,fp32",
                                 "--limit", "2", "--synth-size", "96x64", "--num-workers", "0",
                                 "--warmup-batches", "0", "--encoder-iters", "1", "--out-dir", str(out),
                                 "--commit", "c0ffee"])
    assert [r["step"] for r in rows] == ["fp32", "bf16"]  # waterfall order
    with open(out / "waterfall.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    for col in ("model", "step", "status", "dtype", "miou", "img_per_s_model", "gpu_name",
                "torch_version", "git_commit", "img_per_s_encoder_only", "end_to_end_vs_encoder"):
        assert col in csv_rows[0], col
    assert [r["status"] for r in csv_rows] == ["ok", "ok"]
    assert [r["dtype"] for r in csv_rows] == ["float32", "bfloat16"]
    assert all(r["git_commit"] == "c0ffee" for r in csv_rows)
    assert all(float(r["img_per_s_model"]) > 0 and 0 <= float(r["miou"]) <= 1 for r in csv_rows)
    for r in csv_rows:  # the encoder alone is timed in the same run, and the pipeline ratio derived
        ratio = float(r["img_per_s_end_to_end"]) / float(r["img_per_s_encoder_only"])
        assert float(r["end_to_end_vs_encoder"]) == pytest.approx(ratio, rel=1e-3, abs=6e-5)  # stored to 4 decimals
    md = (out / "waterfall.md").read_text()
    assert "e2e / encoder" in md
    assert "| tiny | fp32 |" in md and "| tiny | bf16 |" in md
    svg = ET.parse(out / "waterfall.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = [e for e in svg.iter(ns + "rect") if e.get("fill") == "#4a7fb5"]
    assert len(bars) == 2
    assert len(list(svg.iter(ns + "polyline"))) == 1  # the mIoU line


def test_run_experiments_rejects_unknown_step(tmp_path):
    with pytest.raises(SystemExit):
        run_experiments.main(["--steps", "fp32,warp", "--out-dir", str(tmp_path)])


def test_cold_start_records_a_failed_step_and_exits_nonzero(tmp_path, monkeypatch):
    """A step whose child fails is written to the JSON with its error (the child's traceback
    included), dependent steps are skipped, and the exit code is 1."""
    out = tmp_path / "cold.json"
    monkeypatch.setattr(sys, "argv", [
        "cold_start.py", "--model-type", "vit_b", "--workdir", str(tmp_path), "--device", "cpu",
        "--checkpoint", str(tmp_path / "unused.pth"), "--steps", "package", "--timeout", "120",
        "--output", str(out)])
    assert cold_start.main() == 1
    res = json.loads(out.read_text())
    assert res["package"]["error"] == "exit code 1" and "--child package" in res["package"]["cmd"]
    assert "compiled package not found" in res["package"]["output_tail"]
    assert "compile_cold" not in res and not list(tmp_path.glob("*.tmp"))


def test_demo_fidelity_rows(tmp_path):
    """demo_fidelity.py: an fp32 reference row, measured rows for what runs on the CPU, and a
    skipped row naming the reason for what needs CUDA."""
    out = tmp_path / "fid.csv"
    assert demo_fidelity.main(["--device", "cpu", "--scenes", "3", "--settings", "bfloat16",
                               "bfloat16+int8_dynamic", "bfloat16+fp8", "--output", str(out)]) == 0
    rows = {r["setting"]: r for r in csv.DictReader(out.open())}
    assert list(rows) == ["float32", "bfloat16", "bfloat16+int8_dynamic", "bfloat16+fp8"]
    assert float(rows["float32"]["iou_vs_fp32_min"]) == 1.0
    for s in ("bfloat16", "bfloat16+int8_dynamic"):
        assert rows[s]["status"] == "ok" and 0.5 < float(rows[s]["iou_vs_fp32_mean"]) <= 1.0
        assert int(rows[s]["n_objects"]) == int(rows["float32"]["n_objects"]) > 0
    assert rows["bfloat16+fp8"]["status"].startswith("skipped:") and "GPU" in rows["bfloat16+fp8"]["status"]


def test_demo_fidelity_refuses_bad_output_before_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        demo_fidelity.main(["--device", "cpu", "--output", str(tmp_path / "afile" / "r.csv")])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_aoti_load_check_passes_on_cpu(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert aoti_load_check.main(["--device", "cpu", "--workdir", str(tmp_path), "--output", str(out)]) == 0
    r = json.load(open(out))["cpu"]
    assert r["ok"] and r["compile"]["ok"] and r["load"]["max_abs_err"] < 1e-3
    assert "cpu: ok" in capsys.readouterr().out


def test_aoti_load_check_reports_a_crashing_child():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    r = aoti_load_check.run_step(crash, timeout=60)
    assert not r["ok"] and r["error"] == "crashed (SIGSEGV)"
    r = aoti_load_check.run_step([sys.executable, "-c", "import json; print('RESULT', json.dumps({'ok': True}))"], timeout=60)
    assert r["ok"] and "error" not in r
    r = aoti_load_check.run_step([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert not r["ok"] and r["error"] == "exit code 3"
    r = aoti_load_check.run_step([sys.executable, "-c", "print('RESULT {oops')"], timeout=60)
    assert not r["ok"] and r["error"].startswith("unreadable result line")
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    r = aoti_load_check.run_step(slow, timeout=2)
    assert r["error"] == "timed out after 2 s" and "started" in r["output_tail"]


def test_aoti_load_check_refuses_a_missing_output_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        aoti_load_check.main(["--device", "cpu", "--output", str(tmp_path / "no" / "x.json")])
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_decoder_needs_a_gpu(capsys):
    import bench_decoder

    with pytest.raises(SystemExit):
        bench_decoder.main(["--prompts", "8"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_loader_times_the_worker_side(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert bench_loader.main(["--images", "3", "--batch-size", "2", "--repeat", "1", "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["images"] == 3 and row["batch_size"] == 2 and row["annotations"] > 0
    assert row["worker_ms_per_image"] == pytest.approx(row["item_ms_per_image"] + row["collate_ms_per_image"], abs=2e-3)
    assert row["item_ms_per_image"] > 0 and row["collate_ms_per_image"] > 0
    assert "worker_ms_per_image" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench_loader.main(["--images", "0"])
    with pytest.raises(SystemExit, match="no images"):
        os.makedirs(tmp_path / "empty" / "annotations")
        (tmp_path / "empty" / "annotations" / "instances_val2017.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": []}))
        bench_loader.main(["--coco-root", str(tmp_path / "empty"), "--repeat", "1"])
