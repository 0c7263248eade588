"""Robustness beyond tests/test_validation.py: huge / non-contiguous / 1-pixel images, wrong
devices, AMG bounds, CLI output paths and a simulated full disk, out-of-memory behaviour, and
seeded hypothesis fuzzing (>= 1,000 examples per entry point, counted) on a micro model.

Tests marked ``bad_input`` are counted by tests/conftest.py's summary; fuzz counts are
recorded through the ``robustness_report`` fixture.
"""
import errno
import os
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segment_anything_fast import validation
from segment_anything_fast.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything_fast.build_sam import SamConfig, build_sam
from segment_anything_fast.predictor import SamPredictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)
import amg  # noqa: E402

bad_input = pytest.mark.bad_input

# 32 px input, 8 px patches -> 4x4 tokens, 16x16 low-res masks: ~2 ms per encoder / decoder call.
MICRO = SamConfig(
    encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=(1,),
    image_size=32, patch_size=8, window_size=2, prompt_embed_dim=16, mask_in_chans=4,
    decoder_depth=1, decoder_mlp_dim=16, decoder_num_heads=1, iou_head_depth=2, iou_head_hidden_dim=16,
)
LOW = 16  # low-res mask side of MICRO
FUZZ_EXAMPLES = 1000
IMG = np.random.RandomState(0).randint(0, 256, (20, 30, 3), dtype=np.uint8)
# Thresholds at 0 so that random-weight masks survive the filters.
KEEP_ALL = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam(MICRO).eval()


@pytest.fixture(scope="module")
def pred(model):
    p = SamPredictor(model)
    p.set_image(IMG)
    return p


# ---------------------------------------------------------------- images
def _virtual(shape):
    """A read-only uint8 image of any size that takes no memory (all strides 0)."""
    return np.broadcast_to(np.full((1, 1, 3), 7, np.uint8), shape)


@bad_input
@pytest.mark.parametrize("shape", [(46341, 46341, 3), (1, validation.MAX_PIXELS + 1, 3), (10**6, 10**6, 3)])
def test_huge_image_rejected_without_allocating(model, shape):
    """Above MAX_PIXELS (2**31 - 1) pixels set_image / generate refuse before any resize."""
    for call in (SamPredictor(model).set_image, SamAutomaticMaskGenerator(model, points_per_side=2).generate):
        with pytest.raises(ValueError, match=r"too large \(max 2147483647 pixels\); downscale"):
            call(_virtual(shape))


def test_large_image_works(model):
    """A 2000x3000 image (6 Mpx) goes through predict and returns full-size masks."""
    p = SamPredictor(model)
    p.set_image(_virtual((2000, 3000, 3)))
    m, s, low = p.predict(point_coords=np.array([[2999.0, 1999.0]]), point_labels=np.array([1]))
    assert m.shape == (3, 2000, 3000) and m.dtype == bool and low.shape == (3, LOW, LOW)


CONTIG = np.random.RandomState(1).randint(0, 256, (24, 36, 3), dtype=np.uint8)


def _views():
    big = np.random.RandomState(2).randint(0, 256, (48, 72, 4), dtype=np.uint8)
    big[::2, ::2, :3] = CONTIG
    ro = CONTIG.copy()
    ro.flags.writeable = False
    return {
        "strided": (big[::2, ::2, :3], CONTIG),
        "flipped": (CONTIG[::-1, ::-1], np.ascontiguousarray(CONTIG[::-1, ::-1])),
        "fortran": (np.asfortranarray(CONTIG), CONTIG),
        "channels_first_transposed": (np.ascontiguousarray(CONTIG.transpose(2, 0, 1)).transpose(1, 2, 0), CONTIG),
        "read_only": (ro, CONTIG),
        "rgba_sliced": (np.concatenate([CONTIG, CONTIG[..., :1]], axis=2)[..., :3], CONTIG),
        "broadcast": (_virtual((24, 36, 3)), np.full((24, 36, 3), 7, np.uint8)),
    }


@pytest.mark.parametrize("name", list(_views()))
def test_non_contiguous_images_same_embedding(model, name):
    view, ref = _views()[name]
    assert not view.flags.c_contiguous or not view.flags.writeable
    a, b = SamPredictor(model), SamPredictor(model)
    a.set_image(view)
    b.set_image(ref)
    assert torch.equal(a.features, b.features)
    gen = SamAutomaticMaskGenerator(model, points_per_side=2, output_mode="uncompressed_rle", **KEEP_ALL)
    assert gen.generate(view) == gen.generate(ref)


def test_bgr_view_equals_rgb(model):
    a, b = SamPredictor(model), SamPredictor(model)
    a.set_image(CONTIG[..., ::-1], image_format="BGR")
    b.set_image(CONTIG)
    assert torch.equal(a.features, b.features)


def test_non_contiguous_torch_image(model):
    p = SamPredictor(model)
    ref = p.transform.apply_image_torch(torch.as_tensor(CONTIG).permute(2, 0, 1)[None].float())
    p.set_torch_image(ref.contiguous(), CONTIG.shape[:2])
    want = p.features
    for t in (ref.contiguous(memory_format=torch.channels_last), ref.expand(1, 3, -1, -1),
              torch.flip(torch.flip(ref, [3]).contiguous(), [3]), ref.to(torch.float64)):
        p.set_torch_image(t, CONTIG.shape[:2])
        assert torch.allclose(p.features, want, atol=1e-5) and p.original_size == CONTIG.shape[:2]


META_TORCH_IMAGE_CASES = [
    (lambda p: p.set_torch_image(torch.zeros(1, 3, 32, 21, device="meta"), (30, 20)), "transformed_image is on meta"),
    (lambda p: p.predict(point_coords=torch.zeros(1, 2, device="meta"), point_labels=[1]), "point_coords is a tensor on the meta"),
    (lambda p: p.predict(box=torch.zeros(4, device="meta")), "box is a tensor on the meta"),
    (lambda p: p.predict(mask_input=torch.zeros(1, LOW, LOW, device="meta")), "mask_input is a tensor on the meta"),
    (lambda p: p.predict_torch(None, None, torch.zeros(1, 4, device="meta")), "boxes is on meta.*predictor.device"),
    (lambda p: p.predict_torch(None, None, None, torch.zeros(1, 1, LOW, LOW, device="meta")), "mask_input is on meta"),
    (lambda p: p.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1, device="meta")), "point_labels is on meta"),
]


@bad_input
@pytest.mark.parametrize("case", range(len(META_TORCH_IMAGE_CASES)))
def test_wrong_device_tensors(pred, case):
    """Tensors on another device than the model (meta: the one every machine has)."""
    call, msg = META_TORCH_IMAGE_CASES[case]
    with pytest.raises(ValueError, match=msg):
        call(pred)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 17), (3, 1)])
@pytest.mark.parametrize("mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_one_pixel_images_generate(model, shape, mode):
    img = np.full((*shape, 3), 200, np.uint8)
    for layers in (0, 1):
        gen = SamAutomaticMaskGenerator(model, points_per_side=2, crop_n_layers=layers, output_mode=mode,
                                        min_mask_region_area=1, **KEEP_ALL)
        for r in gen.generate(img):
            seg = r["segmentation"]
            size = seg.shape if mode == "binary_mask" else tuple(seg["size"])
            assert tuple(size) == shape and 0 <= r["area"] <= shape[0] * shape[1]


def test_one_pixel_image_all_prompts(model):
    p = SamPredictor(model)
    p.set_image(np.zeros((1, 1, 3), np.uint8))
    m, s, low = p.predict(point_coords=np.array([[0.0, 0.0]]), point_labels=np.array([0]),
                          box=np.array([0, 0, 0, 0]), mask_input=np.zeros((1, LOW, LOW)), multimask_output=False)
    assert m.shape == (1, 1, 1) and s.shape == (1,) and low.shape == (1, LOW, LOW)


# ---------------------------------------------------------------- AMG parameters (beyond test_validation)
BAD_AMG_MORE = [
    (dict(points_per_side=validation.MAX_POINTS_PER_SIDE + 1), ValueError, "points_per_side must be <= 1024.*exhaust memory"),
    (dict(points_per_side=10**9), ValueError, "points_per_side must be <= 1024"),
    (dict(crop_n_layers=validation.MAX_CROP_N_LAYERS + 1), ValueError, r"crop_n_layers must be <= 6.*4\*\*i crops"),
    (dict(crop_n_layers=40), ValueError, "crop_n_layers must be <= 6"),
    (dict(points_per_batch=-3), ValueError, "points_per_batch must be >= 1"),
    (dict(points_per_batch=2.0), TypeError, "points_per_batch must be an int"),
    (dict(points_per_side="32"), TypeError, "points_per_side must be an int"),
    (dict(pred_iou_thresh=None), TypeError, "pred_iou_thresh must be a number"),
    (dict(stability_score_thresh=float("inf")), ValueError, "stability_score_thresh must be finite"),
    (dict(stability_score_offset=-1.0), ValueError, "stability_score_offset must be > 0"),
    (dict(crop_overlap_ratio=-0.5), ValueError, "crop_overlap_ratio must be >= 0"),
    (dict(min_mask_region_area=float("inf")), ValueError, "min_mask_region_area must be finite"),
    (dict(output_mode=None), ValueError, "output_mode must be one of"),
    (dict(points_per_side=None, point_grids=[np.array([[0.5, np.nan]])]), ValueError, r"point_grids\[0\] contains NaN"),
    (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), ValueError, "N >= 1"),
    (dict(points_per_side=None, point_grids=[[["a", "b"]]]), TypeError, "numeric"),
]


@bad_input
@pytest.mark.parametrize("kw,err,msg", BAD_AMG_MORE, ids=range(len(BAD_AMG_MORE)))
def test_bad_amg_params_more(model, kw, err, msg):
    with pytest.raises(err, match=msg):
        SamAutomaticMaskGenerator(model, **kw)


def test_amg_bounds_inclusive(model):
    """The documented maxima themselves are accepted (grids are built lazily per crop)."""
    SamAutomaticMaskGenerator(model, points_per_side=validation.MAX_POINTS_PER_SIDE)
    SamAutomaticMaskGenerator(model, points_per_side=64, crop_n_layers=validation.MAX_CROP_N_LAYERS)
    SamAutomaticMaskGenerator(model, points_per_side=np.int64(4), points_per_batch=np.int32(8), pred_iou_thresh=np.float32(0.5))


BAD_BATCH_CALLS = [
    (lambda g: g.generate_batch([IMG], encoder_batch_size=0), ValueError, "encoder_batch_size must be >= 1"),
    (lambda g: g.generate_batch([IMG, IMG.astype(np.float32)]), ValueError, "uint8"),
    (lambda g: g.generate_batch([IMG, np.zeros((0, 4, 3), np.uint8)]), ValueError, "empty"),
]


@bad_input
@pytest.mark.parametrize("case", range(len(BAD_BATCH_CALLS)))
def test_bad_generate_batch(model, case):
    call, err, msg = BAD_BATCH_CALLS[case]
    with pytest.raises(err, match=msg):
        call(SamAutomaticMaskGenerator(model, points_per_side=2))


# ---------------------------------------------------------------- CLI paths
CLI = ["--model-type", "tiny", "--device", "cpu", "--points-per-side", "2", *sum(
    ([f"--{k.replace('_', '-')}", "0"] for k in KEEP_ALL), [])]


@pytest.fixture
def one_image(tmp_path):
    path = tmp_path / "img.png"
    assert cv2.imwrite(str(path), CONTIG)
    return path


def _leftovers(folder):
    return sorted(os.path.join(d, f) for d, ds, fs in os.walk(folder) for f in ds + fs)


@bad_input
@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "deep_under_a_file"])
def test_cli_output_not_writable(tmp_path, one_image, capsys, where):
    """Runs as root in CI, so chmod cannot block writes: a regular file in the path does."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = {"under_a_file": blocker / "sub", "is_a_file": blocker, "deep_under_a_file": blocker / "a" / "b"}[where]
    assert amg.main(["--input", str(one_image), "--output", str(out), *CLI]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "keep me"


BAD_CLI_FLAGS = [
    (["--points-per-side", "5000"], 2, "points_per_side must be <= 1024"),
    (["--crop-n-layers", "9"], 2, "crop_n_layers must be <= 6"),
    (["--points-per-batch", "0"], 2, "points_per_batch must be >= 1"),
    (["--crop-overlap-ratio", "1.0"], 2, "crop_overlap_ratio must be < 1"),
    (["--batch-images", "0"], "exit", "--batch-images must be >= 1"),
    (["--device", "gpu0"], "exit", "not a torch device"),
    (["--points-per-side", "many"], "exit", "invalid int value"),
]


@bad_input
@pytest.mark.parametrize("flags,rc,msg", BAD_CLI_FLAGS, ids=[" ".join(f) for f, _, _ in BAD_CLI_FLAGS])
def test_cli_bad_flags(tmp_path, one_image, capsys, flags, rc, msg):
    """Out-of-range values reach the central validation and come back as one error line."""
    argv = ["--input", str(one_image), "--output", str(tmp_path / "out"), *CLI, *flags]
    if rc == "exit":
        with pytest.raises(SystemExit) as e:
            amg.main(argv)
        assert e.value.code == 2
    else:
        assert amg.main(argv) == rc
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a rejected command line


@bad_input
def test_cli_truncated_checkpoint(tmp_path, one_image, capsys):
    ckpt = tmp_path / "sam.pth"
    torch.save(build_sam(MICRO).state_dict(), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert amg.main(["--input", str(one_image), "--output", str(tmp_path / "out"), *CLI, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class _FailingWrites:
    """File wrapper whose write() stores a few bytes and then fails with ``code``."""

    def __init__(self, f, code):
        self.f, self.code = f, code

    def write(self, data):
        self.f.write(data[:8])
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


DISK_ERRORS = [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk is full"),
               (errno.EACCES, "no permission to write")]


@bad_input
@pytest.mark.parametrize("code,msg", DISK_ERRORS, ids=[errno.errorcode[c] for c, _ in DISK_ERRORS])
@pytest.mark.parametrize("fmt", ["folder", "rle", "overlay"])
def test_cli_disk_full(tmp_path, one_image, capsys, monkeypatch, code, msg, fmt):
    """Every write to a temporary fails: the image is reported failed with a message that says
    what to do, exit status 1, and no half-written file or folder is left behind."""
    import builtins

    real_open = builtins.open

    def failing_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FailingWrites(f, code) if "w" in mode and amg.TMP_TAG in str(path) else f

    monkeypatch.setattr(amg, "open", failing_open, raising=False)
    if fmt == "folder":  # PNGs go through ndarray.tofile, not open(): fail those too
        monkeypatch.setattr(amg, "_write_png", lambda path, image: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    out = tmp_path / "out"
    extra = {"folder": [], "rle": ["--convert-to-rle"], "overlay": ["--convert-to-rle", "--overlay"]}[fmt]
    assert amg.main(["--input", str(one_image), "--output", str(out), *CLI, *extra]) == 1
    err = capsys.readouterr().err
    assert msg in err and "1 image(s) failed" in err and "Traceback" not in err
    assert _leftovers(out) == []


def test_explain_os_error_passes_other_errors_through():
    e = OSError(errno.ENOENT, "No such file")
    assert validation.explain_os_error(e, "x") is e
    full = validation.explain_os_error(OSError(errno.ENOSPC, "No space left on device"), "/o/a.json")
    assert "'/o/a.json'" in str(full) and "disk is full" in str(full) and full.errno == errno.ENOSPC


CHECK_OUTPUT_BAD = [
    (lambda t: ("file.txt/sub", True), "is a file, not a folder"),
    (lambda t: ("file.txt", True), "existing file, not a folder"),
    (lambda t: (".", False), "is a folder; give a file path"),
    (lambda t: ("", True), "must be a path"),
]


@bad_input
@pytest.mark.parametrize("case", range(len(CHECK_OUTPUT_BAD)))
def test_check_output_path(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    make, msg = CHECK_OUTPUT_BAD[case]
    path, directory = make(tmp_path)
    with pytest.raises(ValueError, match=msg):
        validation.check_output_path(path, "--output", directory=directory)
    assert validation.check_output_path("new/deeper", "--output") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_output_path_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="no write permission"):
            validation.check_output_path(str(ro / "out"))
    finally:
        ro.chmod(0o700)


@bad_input
@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_cli_empty_and_truncated_png(tmp_path, capsys, content):
    (tmp_path / "bad.png").write_bytes(content)
    assert amg.main(["--input", str(tmp_path / "bad.png"), "--output", str(tmp_path / "out"), *CLI]) == 1
    err = capsys.readouterr().err
    assert "could not be decoded" in err and "bad.png" in err


@pytest.mark.parametrize("kind", ["1x1", "gray", "rgba", "16bit"])
def test_cli_odd_image_files(tmp_path, capsys, kind):
    img = {"1x1": np.full((1, 1, 3), 9, np.uint8), "gray": CONTIG[..., 0],
           "rgba": np.concatenate([CONTIG, CONTIG[..., :1]], axis=2),
           "16bit": CONTIG.astype(np.uint16) * 257}[kind]
    assert cv2.imwrite(str(tmp_path / "x.png"), img)
    out = tmp_path / "out"
    assert amg.main(["--input", str(tmp_path / "x.png"), "--output", str(out), "--convert-to-rle", *CLI]) == 0
    import json

    for m in json.load(open(out / "x.json")):
        assert m["segmentation"]["size"] == list(img.shape[:2])


def test_eval_combo_output_not_writable(tmp_path, capsys):
    from experiments import eval_combo as ec
    from segment_anything_fast.data.synthetic_coco import write_coco_dataset

    write_coco_dataset(str(tmp_path / "coco"), 1, seed=1, size=(160, 120))
    (tmp_path / "file.txt").write_text("x")
    rc = ec.main(["--coco-root", str(tmp_path / "coco"), "--model-type", "tiny", "--device", "cpu",
                  "--num-workers", "0", "--cache-dir", "none", "--output", str(tmp_path / "file.txt" / "r.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "file.txt" in err and "not a folder" in err


# ---------------------------------------------------------------- out of memory
class _OOMDecoder(torch.nn.Module):
    """Wraps a mask decoder; raises ``exc`` when more than ``limit`` prompts come at once."""

    def __init__(self, inner, limit, exc=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")):
        super().__init__()
        self.inner, self.limit, self.exc, self.sizes = inner, limit, exc, []

    def forward(self, **kw):
        n = kw["sparse_prompt_embeddings"].shape[0]
        self.sizes.append(n)
        if n > self.limit:
            raise self.exc
        return self.inner(**kw)


@pytest.fixture
def oom_model(model):
    """install(limit, exc) swaps in an _OOMDecoder; the real decoder is put back afterwards."""
    real = model.mask_decoder

    def install(limit, exc=None):
        dec = _OOMDecoder(real, limit, *(() if exc is None else (exc,)))
        model.mask_decoder = dec
        return dec
    yield install
    model.mask_decoder = real


@pytest.mark.parametrize("exc", [None, RuntimeError("CUDA error: out of memory")])
def test_amg_halves_points_per_batch_on_decoder_oom(model, oom_model, exc):
    kw = dict(points_per_side=4, points_per_batch=16, output_mode="uncompressed_rle", **KEEP_ALL)
    ref = SamAutomaticMaskGenerator(model, **kw).generate(IMG)
    dec = oom_model(5, exc)
    gen = SamAutomaticMaskGenerator(model, **kw)
    with pytest.warns(UserWarning) as rec:
        out = gen.generate(IMG)
    assert [str(w.message) for w in rec] == [f"out of memory: retrying with points_per_batch={n}" for n in (8, 4)]
    assert gen.points_per_batch == 4 and max(dec.sizes) == 16 and dec.sizes[-1] <= 4
    assert out == ref  # same masks, only computed in smaller batches


def test_amg_oom_at_batch_one_explains(model, oom_model):
    oom_model(0)
    gen = SamAutomaticMaskGenerator(model, points_per_side=2, points_per_batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="out of memory with points_per_batch=1; use a smaller image") as e:
            gen.generate(IMG)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_amg_other_errors_not_swallowed(model, oom_model):
    oom_model(0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    gen = SamAutomaticMaskGenerator(model, points_per_side=2, points_per_batch=4)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gen.generate(IMG)
    assert gen.points_per_batch == 4


class _OOMEncoder(torch.nn.Module):
    """Wraps an image encoder; raises out-of-memory for batches larger than ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.img_size, self.sizes = inner, limit, inner.img_size, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return self.inner(x)


@pytest.mark.parametrize("limit", [1, 0])
def test_generate_batch_halves_encoder_batch_on_oom(model, limit):
    imgs = [IMG, CONTIG, np.ascontiguousarray(IMG[:, ::-1])]
    kw = dict(points_per_side=2, output_mode="uncompressed_rle", **KEEP_ALL)
    ref = SamAutomaticMaskGenerator(model, **kw).generate_batch(imgs, encoder_batch_size=1)
    real = model.image_encoder
    model.image_encoder = enc = _OOMEncoder(real, limit)
    try:
        gen = SamAutomaticMaskGenerator(model, **kw)
        if limit == 0:
            with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="image encoder on a single image") as e:
                gen.generate_batch(imgs, encoder_batch_size=4)
            assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
            return
        with pytest.warns(UserWarning) as rec:
            out = gen.generate_batch(imgs, encoder_batch_size=4)
    finally:
        model.image_encoder = real
    assert [str(w.message) for w in rec] == [
        f"out of memory in the image encoder: retrying with encoder_batch_size={n}" for n in (2, 1)]
    assert enc.sizes == [3, 2, 1, 1, 1] and out == ref


def test_predict_torch_oom_with_points_suggests_smaller_batch(model, oom_model):
    p = SamPredictor(model)
    p.set_image(IMG)
    oom_model(3)
    coords = torch.rand(7, 2, 2) * 30
    with pytest.raises(torch.OutOfMemoryError, match=r"7 prompt\(s\) with masks of 20x30 pixels: split the prompts "
                       "into smaller batches") as e:
        p.predict_torch(coords, torch.ones(7, 2, dtype=torch.int))
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    masks, scores, low = p.predict_torch(coords[:3], torch.ones(3, 2, dtype=torch.int))  # a smaller batch fits
    assert masks.shape == (3, 3, 20, 30)


# ---------------------------------------------------------------- fuzzing (seeded, counted)
def _fuzz_settings(n=FUZZ_EXAMPLES):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class Tally:
    """Outcomes of one fuzzed entry point; anything but a documented error is a crash."""

    def __init__(self, report, name, documented=(ValueError, TypeError)):
        self.stats = report.setdefault(name, {"run": 0, "ok": 0, "documented_error": 0, "crash": 0})
        self.documented = documented

    def __call__(self, fn, check):
        self.stats["run"] += 1
        try:
            out = fn()
        except self.documented as e:
            msg = str(e)
            assert len(msg) > 20 and msg[0].isalpha(), f"unhelpful message: {msg!r}"
            self.stats["documented_error"] += 1
            return
        except BaseException:
            self.stats["crash"] += 1
            raise
        try:
            check(out)
        except BaseException:  # wrong shape / dtype counts as a crash too
            self.stats["crash"] += 1
            raise
        self.stats["ok"] += 1


coord = st.one_of(
    st.floats(-100, 150, allow_nan=False, width=32),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 29.0, 19.0, 1e30, -1e30]),
)


def _arr(shapes, elem, dtypes=(np.float64,)):
    def build(shape):
        n = int(np.prod(shape))
        return st.tuples(st.lists(elem, min_size=n, max_size=n), st.sampled_from(dtypes)).map(
            lambda v: np.array(v[0], dtype=v[1]).reshape(shape) if v[1] is not list else
            np.array(v[0]).reshape(shape).tolist())
    return st.sampled_from(shapes).flatmap(build)


ANY_PROMPTS = st.fixed_dictionaries(
    {},
    optional={
        "point_coords": _arr([(1, 2), (3, 2), (0, 2), (2,), (2, 3), (1, 1, 2)], coord, (np.float64, np.float32, list)),
        "point_labels": _arr([(1,), (3,), (0,), (1, 1), ()], st.sampled_from([0, 1, 1, -1, 2, 0.5]), (np.float64, np.int64, list)),
        "box": _arr([(4,), (1, 4), (2, 4), (5,), (0,)], coord, (np.float64, np.float32, list)),
        "mask_input": st.tuples(st.sampled_from([(1, LOW, LOW), (LOW, LOW), (1, 8, 8), (2, LOW, LOW)]),
                                st.sampled_from([0.0, -3.0, 5.0, 20.0, np.nan, np.inf])).map(
            lambda v: np.full(v[0], v[1], np.float32)),
        "multimask_output": st.booleans(),
        "return_logits": st.booleans(),
    },
)
finite = st.floats(-60, 90, allow_nan=False, width=32)


@st.composite
def valid_prompts(draw):
    """Well-formed prompts (at least one kind), coordinates possibly outside the image."""
    kinds = draw(st.sets(st.sampled_from(["points", "box", "mask"]), min_size=1))
    kw = {"multimask_output": draw(st.booleans()), "return_logits": draw(st.booleans())}
    if "points" in kinds:
        n = draw(st.integers(1, 5))
        kw["point_coords"] = np.array(draw(st.lists(st.tuples(finite, finite), min_size=n, max_size=n)))
        kw["point_labels"] = np.array(draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)))
    if "box" in kinds:
        x0, y0, w, h = draw(st.tuples(finite, finite, st.floats(0, 60), st.floats(0, 60)))
        kw["box"] = np.array([x0, y0, x0 + w, y0 + h])
    if "mask" in kinds:
        kw["mask_input"] = np.full((1, LOW, LOW), draw(st.floats(-20, 20)), np.float32)
    return kw


PROMPTS = st.one_of(valid_prompts(), ANY_PROMPTS)


def test_fuzz_predict(pred, robustness_report):
    """predict() on random (often invalid) prompts: documented shape/dtype or ValueError/TypeError."""
    tally = Tally(robustness_report, "SamPredictor.predict")

    @_fuzz_settings()
    @given(kw=PROMPTS)
    def run(kw):
        c = 3 if kw.get("multimask_output", True) else 1

        def check(out):
            m, s, low = out
            assert m.shape == (c, 20, 30) and m.dtype == (np.float32 if kw.get("return_logits") else bool)
            assert s.shape == (c,) and s.dtype == np.float32 and low.shape == (c, LOW, LOW) and low.dtype == np.float32

        tally(lambda: pred.predict(**kw), check)

    run()
    assert tally.stats["run"] >= FUZZ_EXAMPLES and tally.stats["crash"] == 0
    assert tally.stats["ok"] > 100 and tally.stats["documented_error"] > 100  # both paths exercised


VALID_IMAGES = st.tuples(
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)),
    st.just(np.uint8),
    st.sampled_from(["none", "flip", "fortran", "readonly", "strided"]),
    st.sampled_from(["RGB", "BGR", None]),
    st.just("ndarray"),
)
ANY_IMAGES = st.tuples(
    st.sampled_from([(0, 5, 3), (1, 1, 3), (5, 7, 3), (7, 5, 4), (6, 6), (6, 6, 1), (2, 300, 3), (1, 64, 3),
                     (3, 4, 5), (3, 9, 8), (2, 5, 6, 3), (40, 1, 3), (33, 31, 3)]),
    st.sampled_from([np.uint8, np.uint8, np.uint16, np.float32, np.float64, np.int32, np.int8, bool, object]),
    st.sampled_from(["none", "nan", "inf", "flip", "fortran", "readonly", "strided"]),
    st.sampled_from(["RGB", "BGR", "rgb", None]),
    st.sampled_from(["ndarray", "tensor", "list"]),
)


def _make_image(shape, dtype, twist, seed):
    img = np.random.RandomState(seed).randint(0, 256, shape).astype(dtype)
    if twist in ("nan", "inf") and img.dtype.kind == "f" and img.size:
        img.flat[seed % img.size] = np.nan if twist == "nan" else np.inf
    elif twist == "flip":
        img = img[::-1]
    elif twist == "fortran":
        img = np.asfortranarray(img)
    elif twist == "readonly":
        img.flags.writeable = False
    elif twist == "strided" and img.ndim >= 2:
        img = np.repeat(img, 2, axis=1)[:, ::2]
    return img


def test_fuzz_set_image(model, robustness_report):
    """set_image() on random shapes, dtypes, layouts and formats: embeds or raises a documented error."""
    tally = Tally(robustness_report, "SamPredictor.set_image")
    p = SamPredictor(model)

    @_fuzz_settings()
    @given(spec=st.one_of(VALID_IMAGES, ANY_IMAGES), seed=st.integers(0, 2**16))
    def run(spec, seed):
        shape, dtype, twist, fmt, container = spec
        img = _make_image(shape, dtype, twist, seed)
        if container == "tensor" and img.dtype != object:
            img = torch.tensor(np.array(img, order="C"))
        elif container == "list":
            img = img.tolist()

        def call():
            p.reset_image()
            return p.set_image(img) if fmt is None else p.set_image(img, image_format=fmt)

        def check(_):
            assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape[2:] == (3,)
            assert p.is_image_set and p.original_size == img.shape[:2]
            assert p.features.shape == (1, MICRO.prompt_embed_dim, 4, 4) and bool(torch.isfinite(p.features).all())

        tally(call, check)

    run()
    assert tally.stats["run"] >= FUZZ_EXAMPLES and tally.stats["crash"] == 0
    assert tally.stats["ok"] > 50 and tally.stats["documented_error"] > 100


VALID_AMG_KW = st.fixed_dictionaries({
    "points_per_side": st.integers(1, 4),
    "points_per_batch": st.integers(1, 20),
    "crop_n_layers": st.sampled_from([0, 0, 0, 1]),
    "crop_n_points_downscale_factor": st.sampled_from([1, 1, 2]),
    "pred_iou_thresh": st.sampled_from([0.0, 0.0, 0.5]),
    "stability_score_thresh": st.sampled_from([0.0, 0.0, 0.9]),
    "box_nms_thresh": st.sampled_from([0.7, 0.0, 1.0]),
    "min_mask_region_area": st.sampled_from([0, 0, 3]),
    "output_mode": st.sampled_from(["binary_mask", "uncompressed_rle", "coco_rle"]),
})
ANY_AMG_KW = st.fixed_dictionaries({
    "points_per_side": st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 2.5, None, 2000])),
    "points_per_batch": st.sampled_from([1, 3, 64, 0]),
    "crop_n_layers": st.sampled_from([0, 0, 0, 1, -1]),
    "crop_n_points_downscale_factor": st.sampled_from([1, 1, 2]),
    "pred_iou_thresh": st.sampled_from([0.0, 0.0, 0.5, 1.5]),
    "stability_score_thresh": st.sampled_from([0.0, 0.0, 0.9, float("nan")]),
    "box_nms_thresh": st.sampled_from([0.7, 0.0, 1.0]),
    "min_mask_region_area": st.sampled_from([0, 0, 3]),
    "output_mode": st.sampled_from(["binary_mask", "uncompressed_rle", "coco_rle", "png"]),
})


def test_fuzz_generate(model, robustness_report):
    """generate() with random parameters and images (1-40 px a side, sometimes invalid)."""
    tally = Tally(robustness_report, "SamAutomaticMaskGenerator.generate")

    @_fuzz_settings()
    @given(kw=st.one_of(VALID_AMG_KW, ANY_AMG_KW), size=st.tuples(st.integers(0, 40), st.integers(1, 40)),
           dtype=st.sampled_from([np.uint8] * 9 + [np.float32]))
    def run(kw, size, dtype):
        img = np.random.RandomState(size[0] * 41 + size[1]).randint(0, 256, (*size, 3)).astype(dtype)
        mode = kw["output_mode"]

        def call():
            return SamAutomaticMaskGenerator(model, **kw).generate(img)

        def check(records):
            assert isinstance(records, list)
            for r in records:
                seg = r["segmentation"]
                if mode == "binary_mask":
                    assert seg.shape == size and seg.dtype == bool and int(seg.sum()) == r["area"]
                else:
                    assert list(seg["size"]) == list(size)
                assert isinstance(r["area"], int) and len(r["bbox"]) == 4 and len(r["crop_box"]) == 4
                assert 0.0 <= r["stability_score"] <= 1.0 and len(r["point_coords"]) == 1

        tally(call, check)

    run()
    assert tally.stats["run"] >= FUZZ_EXAMPLES and tally.stats["crash"] == 0
    assert tally.stats["ok"] > 100 and tally.stats["documented_error"] > 100


@st.composite
def torch_prompts(draw):
    """Batched tensor prompts for predict_torch: mostly consistent, sometimes not."""
    b = draw(st.integers(1, 4))
    bad = draw(st.sampled_from([None] * 6 + ["batch", "labels", "box_order", "nan", "shape", "dtype", "mask"]))
    kinds = draw(st.sets(st.sampled_from(["points", "boxes", "mask"]), min_size=1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kw = {"multimask_output": draw(st.booleans()), "return_logits": draw(st.booleans())}
    coords = labels = boxes = mask = None
    if "points" in kinds or bad in ("labels", "dtype"):
        n = draw(st.integers(1, 4))
        coords = torch.rand(b, n, 2, generator=g) * 40 - 4
        labels = torch.randint(-1, 2, (b, n), generator=g)
        if bad == "labels":
            labels[0, 0] = 3
        elif bad == "dtype":
            labels = labels.float() + 0.5
        elif bad == "shape":
            coords = coords[..., :1]
    if "boxes" in kinds or bad == "box_order":
        xy = torch.rand(b, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + torch.rand(b, 2, generator=g) * 20], 1)
        if bad == "box_order":
            boxes = boxes[:, [2, 1, 0, 3]]
        elif bad == "batch":
            boxes = torch.cat([boxes, boxes])
    if "mask" in kinds or bad == "mask":
        mask = torch.randn(b, 1, LOW, LOW, generator=g)
        if bad == "mask":
            mask = mask[:, :, :8]
    if bad == "nan":
        for t in (coords, boxes, mask):
            if t is not None:
                t.view(-1)[0] = float("nan")
    return b, (coords, labels, boxes, mask), kw


def test_fuzz_predict_torch(pred, robustness_report):
    """predict_torch() on batched tensor prompts: BxCxHxW outputs or ValueError/TypeError."""
    tally = Tally(robustness_report, "SamPredictor.predict_torch")

    @_fuzz_settings()
    @given(spec=torch_prompts())
    def run(spec):
        _, (coords, labels, boxes, mask), kw = spec
        b = next(t.shape[0] for t in (coords, boxes, mask) if t is not None)
        c = 3 if kw["multimask_output"] else 1

        def check(out):
            m, s, low = out
            assert m.shape == (b, c, 20, 30) and m.dtype == (torch.float32 if kw["return_logits"] else torch.bool)
            assert s.shape == (b, c) and s.dtype == torch.float32 and low.shape == (b, c, LOW, LOW)

        tally(lambda: pred.predict_torch(coords, labels, boxes, mask, **kw), check)

    run()
    assert tally.stats["run"] >= FUZZ_EXAMPLES and tally.stats["crash"] == 0
    assert tally.stats["ok"] > 100 and tally.stats["documented_error"] > 100
