"""AOTInductor packages on the CPU: CLI export, load round trip, predictor, mismatch errors.

One package is exported (by the CLI, in a subprocess with a fresh inductor cache) for a
two-block variant of the tiny config and shared by every test of the module.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from segment_anything_fast import aot
from segment_anything_fast.build_sam import build_sam
from segment_anything_fast.predictor import SamPredictor

from tests.oracle import TINY, random_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One windowed and one global block: both attention paths, half the compile time of TINY.
CFG = dataclasses.replace(TINY, encoder_depth=2, encoder_global_attn_indexes=(1,))
BATCH = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("aot")
    cfg_json = d / "cfg.json"
    cfg_json.write_text(json.dumps(dataclasses.asdict(CFG)))
    ckpt = d / "tiny.pth"
    torch.save(random_state_dict(build_sam(CFG), seed=1), ckpt)
    out = d / "enc.pt2"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(d / "inductor_cache"))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export_package.py"),
         "--config-json", str(cfg_json), "--checkpoint", str(ckpt), "--batch-size", str(BATCH),
         "--dtype", "float32", "--device", "cpu", "--mlp-epilogue", "--with-mask-decoder", "--max-prompts", "16",
         "--max-prompt-tokens", "8", "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert not [p for p in os.listdir(d) if p.startswith(".enc")], "temporary file left behind"
    return {"dir": d, "ckpt": str(ckpt), "path": str(out), "stdout": proc.stdout}


def _model(exported):
    return build_sam(CFG, exported["ckpt"])


def _rewrite_metadata(src, dst, **changes):
    """Copy a package, changing fields of its metadata (a package made elsewhere)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/" + aot.METADATA_FILE):
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            zout.writestr(item, data)
    return str(dst)


def test_metadata_records_build(exported):
    meta = aot.read_package_metadata(exported["path"])
    assert meta["batch_size"] == BATCH and meta["dtype"] == "float32"
    assert meta["device_type"] == "cpu" and meta["gpu_name"] is None
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta["torch_version"] == torch.__version__
    assert meta["model_type"] == "custom"
    assert meta["encoder_architecture"]["depth"] == 2
    assert meta["encoder_architecture"]["global_attn_indexes"] == [1]
    assert meta["input_shape"] == [BATCH, 3, CFG.image_size, CFG.image_size]
    assert meta["package_version"] == __import__("segment_anything_fast").__version__
    assert "random weights" not in exported["stdout"].lower()
    assert meta["decoder"]["max_prompts"] == 16 and meta["decoder"]["max_prompt_tokens"] == 8
    assert meta["mlp_epilogue"] is True and "MLP epilogue" in exported["stdout"]
    assert "with mask decoder" in exported["stdout"]


def test_round_trip_matches_eager(exported):
    sam = _model(exported)
    enc = aot.load_image_encoder_package(exported["path"], sam)
    assert isinstance(enc, aot.AOTImageEncoder) and enc.img_size == CFG.image_size
    x = torch.randn(BATCH, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sam.image_encoder(x)
        for n in (1, BATCH):  # n=1 is zero-padded to the static batch and sliced back
            out = enc(x[:n])
            assert out.shape == ref[:n].shape
            torch.testing.assert_close(out, ref[:n], atol=2e-4, rtol=2e-4)
        first = enc(x)
        enc(torch.zeros_like(x))  # outputs are not overwritten by the next call
        torch.testing.assert_close(first, ref, atol=2e-4, rtol=2e-4)


def test_predictor_with_attached_package(exported):
    eager = _model(exported)
    sam = aot.attach_compiled_package(_model(exported), exported["path"])
    assert isinstance(sam.image_encoder, aot.AOTImageEncoder)
    assert isinstance(sam.mask_decoder, aot.AOTMaskDecoder)
    assert set(sam.mask_decoder.state_dict()) == set(eager.mask_decoder.state_dict())
    img = np.random.default_rng(0).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    prompts = [
        dict(point_coords=np.array([[30.0, 40.0], [80.0, 50.0]]), point_labels=np.array([1, 0])),
        dict(box=np.array([10.0, 12.0, 90.0, 70.0]), multimask_output=False),
        dict(mask_input=rng.normal(size=(1, 32, 32)).astype(np.float32)),  # no tokens: eager
    ]
    preds = []
    for model in (eager, sam):
        pred = SamPredictor(model)
        pred.set_image(img)
        preds.append(pred)
    for kw in prompts:
        (m0, s0, l0), (m1, s1, l1) = (p.predict(return_logits=True, **kw) for p in preds)
        np.testing.assert_allclose(l1, l0, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(s1, s0, atol=1e-4)
        assert m1.shape == m0.shape
    # 20 prompts > max_prompts=16: the package runs them in two chunks.
    coords = torch.as_tensor(rng.uniform(0, 120, (20, 1, 2)), dtype=torch.float32)
    labels = torch.ones(20, 1, dtype=torch.int)
    (m0, s0, l0), (m1, s1, l1) = (p.predict_torch(coords, labels, return_logits=True) for p in preds)
    assert m1.shape == m0.shape == (20, 3, 96, 120)
    torch.testing.assert_close(l1, l0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-4)


def test_batch_larger_than_static_size(exported):
    sam = aot.attach_compiled_package(_model(exported), exported["path"])
    x = torch.zeros(BATCH + 1, 3, CFG.image_size, CFG.image_size)
    with pytest.raises(ValueError, match=f"at most {BATCH} images.*--batch-size {BATCH + 1}"):
        sam.image_encoder(x)
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        sam.image_encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(aot.PackageMismatchError, match=f"static batch size is {BATCH}, requested batches of 8"):
        aot.attach_compiled_package(_model(exported), exported["path"], batch_size=8)


def test_dtype_weights_and_architecture_mismatch(exported):
    bf16 = _model(exported)
    bf16.image_encoder.to(torch.bfloat16)
    with pytest.raises(aot.PackageMismatchError, match="package dtype is float32, requested bfloat16"):
        aot.attach_compiled_package(bf16, exported["path"])
    other = build_sam(CFG)
    other.load_state_dict(random_state_dict(other, seed=7))
    with pytest.raises(aot.PackageMismatchError, match="different encoder weights"):
        aot.attach_compiled_package(other, exported["path"])
    dec = _model(exported)
    dec.mask_decoder.load_state_dict(random_state_dict(dec.mask_decoder, seed=3))
    with pytest.raises(aot.PackageMismatchError, match="different mask decoder weights"):
        aot.attach_compiled_package(dec, exported["path"])
    assert isinstance(aot.load_image_encoder_package(exported["path"], dec), aot.AOTImageEncoder)
    with pytest.raises(aot.PackageMismatchError, match="holds a custom encoder.*architecture"):
        aot.attach_compiled_package(build_sam(TINY), exported["path"])
    with pytest.raises(aot.PackageMismatchError, match="package dtype"):
        aot.load_image_encoder_package(exported["path"], dtype="fp16")


def test_package_from_another_torch_or_gpu(exported, tmp_path):
    sam = _model(exported)
    old = _rewrite_metadata(exported["path"], tmp_path / "old.pt2", torch_version="2.3.0")
    with pytest.raises(aot.PackageMismatchError, match=r"built with torch 2\.3\.0, this process runs torch"):
        aot.attach_compiled_package(sam, old)
    gpu = _rewrite_metadata(
        exported["path"], tmp_path / "gpu.pt2", device_type="cuda",
        gpu_name="NVIDIA H100 80GB HBM3", gpu_capability=[9, 0], cpu_capability=None,
    )
    with pytest.raises(aot.PackageMismatchError, match="built for device 'cuda', the model is on 'cpu'"):
        aot.attach_compiled_package(sam, gpu)
    isa = _rewrite_metadata(exported["path"], tmp_path / "isa.pt2", cpu_capability="FAKE_ISA")
    with pytest.raises(aot.PackageMismatchError, match="CPU instruction set FAKE_ISA"):
        aot.attach_compiled_package(sam, isa)
    assert isinstance(sam.image_encoder, torch.nn.Module) and not isinstance(
        sam.image_encoder, aot.AOTImageEncoder
    )  # a failed attach leaves the model as it was


def test_recompile_on_mismatch(exported, tmp_path, monkeypatch):
    sam = _model(exported)
    old = _rewrite_metadata(exported["path"], tmp_path / "old.pt2", torch_version="2.3.0")
    calls = []

    def fake_export(model, path, *, batch_size, dtype, device, **decoder):
        calls.append((batch_size, dtype, torch.device(device).type, decoder))
        shutil.copy(exported["path"], path)  # what a real re-export here would produce

    monkeypatch.setattr(aot, "export_image_encoder", fake_export)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="torch 2.3.0.*Recompiling a package"):
        aot.attach_compiled_package(sam, old, recompile_on_mismatch=True, cache_dir=cache)
    assert calls == [(BATCH, torch.float32, "cpu", dict(
        include_mask_decoder=True, max_prompts=16, max_prompt_tokens=8))]
    assert isinstance(sam.image_encoder, aot.AOTImageEncoder)
    assert os.path.dirname(sam.image_encoder.path) == str(cache / "packages")
    # A later process finds the recompiled package instead of compiling again.
    sam2 = _model(exported)
    with pytest.warns(UserWarning, match="Using the package recompiled earlier"):
        aot.attach_compiled_package(sam2, old, recompile_on_mismatch=True, cache_dir=cache)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="recompile_on_mismatch must be a bool"):
        aot.attach_compiled_package(sam2, old, recompile_on_mismatch="yes")


def test_build_from_package_needs_official_type(exported):
    with pytest.raises(ValueError, match="custom architecture.*attach_compiled_package"):
        aot.build_sam_from_package(exported["path"], exported["ckpt"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_package.py"):
        aot.read_package_metadata(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip" * 10)
    with pytest.raises(ValueError, match="not a .pt2 package"):
        aot.read_package_metadata(junk)
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("foreign/archive_format", "pt2")
    with pytest.raises(ValueError, match="without segment_anything_fast metadata"):
        aot.read_package_metadata(foreign)
    sam = build_sam(CFG)
    with pytest.raises(ValueError, match="must end in .pt2"):
        aot.export_image_encoder(sam, tmp_path / "x.zip", device="cpu")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        aot.export_image_encoder(sam, tmp_path / "x.pt2", batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.export_image_encoder(sam, tmp_path / "x.pt2", dtype="int8", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        aot.export_image_encoder(sam, tmp_path / "no" / "x.pt2", device="cpu")


def test_cli_errors(tmp_path):
    script = os.path.join(ROOT, "scripts", "export_package.py")
    proc = subprocess.run(
        [sys.executable, script, "--output", str(tmp_path / "a.zip"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "must end in .pt2" in proc.stderr


def test_build_sam_fast_with_compiled_package(exported):
    from segment_anything_fast.build_sam_fast import build_sam_fast

    kw = dict(dtype=None, device="cpu", attention="math", decoder_compile_mode=None)
    sam = build_sam_fast(CFG, exported["ckpt"], compiled_package=exported["path"], **kw)
    assert isinstance(sam.image_encoder, aot.AOTImageEncoder)
    x = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(x), _model(exported).image_encoder(x),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="compiled_package"):
        build_sam_fast(CFG, exported["ckpt"], compiled_package=exported["path"],
                       compress="int8_dynamic", **kw)
    with pytest.raises(aot.PackageMismatchError):
        build_sam_fast(CFG, exported["ckpt"], compiled_package=exported["path"],
                       **dict(kw, dtype=torch.bfloat16))
