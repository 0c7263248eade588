"""Ahead-of-time compiled packages and persistent compile caches (fast cold start).

* :func:`export_image_encoder` exports the image encoder with ``torch.export``, compiles it
  with AOTInductor and writes one ``.pt2`` package (weights included) holding also a JSON
  record of what it was built for: model architecture and weights, static batch size, dtype,
  torch version, device kind, GPU name and compute capability (or CPU instruction set).
  With ``include_mask_decoder=True`` the mask decoder goes in too, exported once for any
  prompt count up to ``max_prompts`` and 1..``max_prompt_tokens`` sparse tokens (dynamic
  shapes instead of compiled buckets).
* :func:`attach_compiled_package` loads a package with ``torch._inductor.aoti_load_package``
  and makes ``sam.image_encoder`` (and ``sam.mask_decoder`` when the package has it) run
  through it (:class:`AOTImageEncoder`, :class:`AOTMaskDecoder`), so
  ``SamPredictor`` / ``SamAutomaticMaskGenerator`` use it unchanged. A package built for
  another GPU architecture, torch version, dtype, model or weights, or a smaller batch than
  asked for, raises :class:`PackageMismatchError`, unless ``recompile_on_mismatch=True``.
* :func:`enable_persistent_caches`: inductor / autotune / Triton caches in one documented
  directory so that a second process reuses the first one's ``torch.compile`` work.
"""
import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .compile import _Proxy

PACKAGE_FORMAT = "segment_anything_fast.aot"
PACKAGE_FORMAT_VERSION = 1
METADATA_FILE = "segment_anything_fast.json"  # stored under the archive's extra/ folder
ENCODER_MODEL = "model"  # the name aoti_load_package loads by default
DECODER_MODEL = "mask_decoder"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "segment_anything_fast")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PackageMismatchError(RuntimeError):
    """A compiled package does not fit this machine, torch build, model or request."""


# ----------------------------------------------------------------------------- helpers


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, also given by name ("bf16", "fp16", "fp32" too)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
            dtype.lower(), dtype.lower()
        ).replace("torch.", "")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or fp32/bf16/fp16), got {dtype!r}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e}).") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"AOT packages support device 'cpu' or 'cuda', got {str(dev)!r}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device='cuda' but CUDA is not available on this machine; a CUDA package must be "
                "built and loaded on the GPU it will run on (use device='cpu' for a CPU package)."
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_record(device: Union[str, torch.device]) -> Dict[str, Any]:
    """What a package depends on besides the model: torch build and the device it runs on."""
    dev = _resolve_device(device)
    rec: Dict[str, Any] = {
        "torch_version": torch.__version__,
        "device_type": dev.type,
        "gpu_name": None,
        "gpu_capability": None,
        "cuda_version": torch.version.cuda,
        "cpu_capability": None,
    }
    if dev.type == "cuda":
        rec["gpu_name"] = torch.cuda.get_device_name(dev)
        rec["gpu_capability"] = list(torch.cuda.get_device_capability(dev))
    else:
        rec["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return rec


def _unwrap(module: nn.Module) -> nn.Module:
    """The eager module behind compile.py's wrappers (or an AOTMaskDecoder)."""
    if isinstance(module, AOTImageEncoder):
        raise ValueError(
            "sam.image_encoder already runs a compiled package; export from a model built with "
            "build_sam(...) / build_sam_fast(..., compile_mode=None)."
        )
    inner = getattr(module, "_modules", {}).get("inner")  # StaticBatchEncoder, BucketedMaskDecoder
    return inner if isinstance(inner, nn.Module) else module


def decoder_architecture(decoder: nn.Module) -> Dict[str, Any]:
    """Shapes of a ``MaskDecoder``'s weights (hashed) and its number of mask outputs."""
    decoder = _unwrap(decoder)
    if not hasattr(decoder, "predict_masks") or not hasattr(decoder, "num_mask_tokens"):
        raise TypeError(f"expected a SAM MaskDecoder, got {type(decoder).__name__}.")
    shapes = sorted((k, list(v.shape)) for k, v in decoder.state_dict().items())
    return {
        "num_mask_tokens": int(decoder.num_mask_tokens),
        "transformer_dim": int(decoder.transformer_dim),
        "state_shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
    }


class _DecoderCore(nn.Module):
    """Exported part of the mask decoder: every mask token's mask and IoU (no slicing)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings, image_pe, sparse, dense):
        return self.decoder.predict_masks(image_embeddings, image_pe, sparse, dense)


def encoder_architecture(encoder: nn.Module) -> Dict[str, Any]:
    """Architecture of an ``ImageEncoderViT`` as plain data (compared when loading)."""
    encoder = _unwrap(encoder)
    try:
        blocks = list(encoder.blocks)
        proj = encoder.patch_embed.proj
        arch = {
            "img_size": int(encoder.img_size),
            "patch_size": int(proj.kernel_size[0]),
            "embed_dim": int(proj.out_channels),
            "depth": len(blocks),
            "num_heads": int(blocks[0].attn.num_heads),
            "window_size": max(int(b.window_size) for b in blocks),
            "global_attn_indexes": [i for i, b in enumerate(blocks) if int(b.window_size) == 0],
            "out_chans": int(encoder.neck[0].out_channels),
        }
    except (AttributeError, IndexError, TypeError) as e:
        raise TypeError(
            f"expected a SAM ImageEncoderViT (segment_anything_fast.modeling), got "
            f"{type(encoder).__name__} ({e})."
        ) from None
    shapes = sorted((k, list(v.shape)) for k, v in encoder.state_dict().items())
    arch["state_shapes_sha256"] = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return arch


def model_type_of(arch: Dict[str, Any]) -> str:
    """"vit_h"/"vit_l"/"vit_b" when ``arch`` is an official configuration, else "custom"."""
    from .build_sam import SAM_CONFIGS

    for name, c in SAM_CONFIGS.items():
        if (
            c.encoder_embed_dim == arch["embed_dim"]
            and c.encoder_depth == arch["depth"]
            and c.encoder_num_heads == arch["num_heads"]
            and list(c.encoder_global_attn_indexes) == arch["global_attn_indexes"]
            and c.image_size == arch["img_size"]
            and c.patch_size == arch["patch_size"]
            and c.window_size == arch["window_size"]
        ):
            return name
    return "custom"


@torch.no_grad()
def weights_fingerprint(module: nn.Module, dtype: torch.dtype) -> Optional[str]:
    """Hash of names, shapes and up to 64 sampled values (cast to ``dtype``) per tensor.

    Tells checkpoints apart cheaply (no full pass over the weights). None when the weights
    cannot be sampled (e.g. quantized tensor subclasses).
    """
    module = _unwrap(module)
    h = hashlib.sha256()
    samples = []
    try:
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{name}{list(t.shape)}".encode())
            if t.is_floating_point() and t.numel():
                flat = t.detach().reshape(-1)
                m = min(64, flat.numel())
                idx = torch.arange(m) * (flat.numel() - 1) // max(m - 1, 1)  # exact on any device
                samples.append(flat[idx.to(flat.device)].to(dtype).float())
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return h.hexdigest()[:24]


def _module_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


def _package_version() -> str:
    from . import __version__

    return __version__


def _atomic_target(path: Union[str, os.PathLike]) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not path.endswith(".pt2"):
        raise ValueError(f"the package path must end in .pt2 (AOTInductor's format), got {path!r}.")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"folder {parent!r} for the package does not exist; create it first.")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file name ending in .pt2.")
    return path


# ----------------------------------------------------------------------------- export


def export_image_encoder(
    sam: nn.Module,
    path: Union[str, os.PathLike],
    *,
    batch_size: int = 1,
    dtype: Union[str, torch.dtype] = torch.bfloat16,
    device: Union[str, torch.device] = "cuda",
    max_autotune: bool = True,
    inductor_configs: Optional[Dict[str, Any]] = None,
    include_mask_decoder: bool = False,
    max_prompts: int = 1024,
    max_prompt_tokens: int = 64,
) -> Dict[str, Any]:
    """Export + AOT-compile ``sam.image_encoder`` for ``batch_size`` images; write ``path``.

    The encoder is compiled for exactly ``batch_size`` images of ``img_size`` pixels in
    ``dtype`` on ``device`` (a copy is cast/moved if needed; ``sam`` is not modified). The
    ``.pt2`` is written to a temporary file next to ``path`` and renamed into place, so a
    crash never leaves a half-written package. ``max_autotune`` benchmarks GEMM / conv
    kernels while compiling (CUDA; slower export, faster package). ``inductor_configs`` are
    passed to AOTInductor on top. ``include_mask_decoder`` also compiles ``sam.mask_decoder``
    for one image embedding and 1..``max_prompts`` prompts of 1..``max_prompt_tokens`` sparse
    tokens each (dynamic shapes: one compiled model serves every prompt count). Returns the
    metadata stored in the package.
    """
    for name, v in (("batch_size", batch_size), ("max_prompts", max_prompts),
                    ("max_prompt_tokens", max_prompt_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if max_prompts < 2 or max_prompt_tokens < 2:
        raise ValueError("max_prompts and max_prompt_tokens must be at least 2 (dynamic dimensions).")
    dtype = parse_dtype(dtype)
    dev = _resolve_device(device)
    target = _atomic_target(path)
    encoder = _unwrap(sam.image_encoder)
    arch = encoder_architecture(encoder)
    if _module_dtype(encoder) != dtype or _module_device(encoder) != dev:
        encoder = copy.deepcopy(encoder).to(device=dev, dtype=dtype)
    encoder.eval()
    backends = sorted({b.attn.backend for b in encoder.blocks if hasattr(b.attn, "backend")})

    meta: Dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        "package_version": _package_version(),
        "created_unix": int(time.time()),
        "model_type": model_type_of(arch),
        "encoder_architecture": arch,
        "weights_fingerprint": weights_fingerprint(encoder, dtype),
        "attention": backends,
        "mlp_epilogue": any(getattr(b.mlp, "fused_epilogue", False) for b in encoder.blocks),
        "batch_size": batch_size,
        "dtype": _dtype_name(dtype),
        "input_shape": [batch_size, 3, arch["img_size"], arch["img_size"]],
        "models": {"image_encoder": ENCODER_MODEL},
    }
    meta.update(device_record(dev))

    options: Dict[str, Any] = {}
    if max_autotune and dev.type == "cuda":
        options.update({"max_autotune": True, "max_autotune_gemm": True})
    options.update(inductor_configs or {})
    options["aot_inductor.package"] = True

    example = torch.randn(meta["input_shape"], device=dev, dtype=dtype)
    with torch.no_grad():
        ep = torch.export.export(encoder, (example,), strict=False)
        aoti_files = {ENCODER_MODEL: torch._inductor.aot_compile(ep.module(), (example,), options=options)}
    del ep, example
    if include_mask_decoder:
        aoti_files[DECODER_MODEL] = _compile_decoder(
            sam, meta, dtype, dev, max_prompts, max_prompt_tokens, options
        )

    from torch.export.pt2_archive._package import package_pt2

    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(target), prefix="." + os.path.basename(target)[:-4] + ".", suffix=".pt2"
    )
    os.close(fd)
    try:
        package_pt2(
            tmp,
            aoti_files=aoti_files,
            extra_files={METADATA_FILE: json.dumps(meta, indent=1, sort_keys=True)},
        )
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return meta


def _compile_decoder(sam, meta, dtype, dev, max_prompts, max_tokens, options) -> list:
    decoder = _unwrap(sam.mask_decoder)
    arch = decoder_architecture(decoder)
    if _module_dtype(decoder) != dtype or _module_device(decoder) != dev:
        decoder = copy.deepcopy(decoder).to(device=dev, dtype=dtype)
    core = _DecoderCore(decoder).eval()
    c, g = arch["transformer_dim"], meta["encoder_architecture"]["img_size"] // meta[
        "encoder_architecture"]["patch_size"]
    n, k = min(3, max_prompts), 2
    example = (
        torch.randn(1, c, g, g, device=dev, dtype=dtype),
        torch.randn(1, c, g, g, device=dev, dtype=dtype),
        torch.randn(n, k, c, device=dev, dtype=dtype),
        torch.randn(n, c, g, g, device=dev, dtype=dtype),
    )
    prompts = torch.export.Dim("prompts", min=1, max=max_prompts)
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    with torch.no_grad():
        ep = torch.export.export(
            core, example, dynamic_shapes=({}, {}, {0: prompts, 1: tokens}, {0: prompts}), strict=False
        )
        files = torch._inductor.aot_compile(ep.module(), example, options=options)
    meta["models"]["mask_decoder"] = DECODER_MODEL
    meta["decoder"] = {
        "architecture": arch,
        "weights_fingerprint": weights_fingerprint(decoder, dtype),
        "max_prompts": max_prompts,
        "max_prompt_tokens": max_tokens,
    }
    return files


# ----------------------------------------------------------------------------- load


def read_package_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON record stored by :func:`export_image_encoder` (read without loading code)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"compiled package not found: {path!r}. Build one with scripts/export_package.py."
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + METADATA_FILE)]
            if not names:
                raise ValueError(
                    f"{path!r} is a .pt2 archive without segment_anything_fast metadata; it was not "
                    "written by segment_anything_fast.aot.export_image_encoder. Re-export it with "
                    "scripts/export_package.py."
                )
            meta = json.loads(z.read(names[0]).decode())
    except zipfile.BadZipFile:
        raise ValueError(
            f"{path!r} is not a .pt2 package (not a zip archive; truncated download?). Re-export it "
            "with scripts/export_package.py."
        ) from None
    if meta.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{path!r} has foreign metadata (format {meta.get('format')!r}).")
    if meta.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageMismatchError(
            f"{path!r} uses package format {meta.get('format_version')!r}; this "
            f"segment_anything_fast reads format {PACKAGE_FORMAT_VERSION}. Re-export it."
        )
    return meta


def package_mismatches(
    meta: Dict[str, Any],
    *,
    device: Union[str, torch.device],
    sam: Optional[nn.Module] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    batch_size: Optional[int] = None,
    with_decoder: bool = False,
) -> List[str]:
    """Every reason the package described by ``meta`` cannot serve this request (empty: fits).

    Checked: torch version, device kind, GPU compute capability (or CPU instruction set), and
    when given: ``dtype``, ``batch_size`` (must not exceed the static batch) and ``sam``'s
    encoder architecture and weights (``with_decoder``: the mask decoder's too, and its
    dtype). A different GPU name of the same architecture is not a mismatch (the kernels
    run; loading warns).
    """
    here = device_record(device)
    problems = []
    if meta["torch_version"] != here["torch_version"]:
        problems.append(
            f"built with torch {meta['torch_version']}, this process runs torch {here['torch_version']}"
        )
    if meta["device_type"] != here["device_type"]:
        problems.append(f"built for device {meta['device_type']!r}, the model is on {here['device_type']!r}")
    elif here["device_type"] == "cuda" and list(meta["gpu_capability"] or []) != here["gpu_capability"]:
        cap = meta["gpu_capability"] or []
        problems.append(
            f"built for GPU {meta['gpu_name']} (compute capability {'.'.join(map(str, cap))}), this "
            f"is {here['gpu_name']} ({'.'.join(map(str, here['gpu_capability']))})"
        )
    elif here["device_type"] == "cpu" and meta.get("cpu_capability") != here["cpu_capability"]:
        problems.append(
            f"built for CPU instruction set {meta.get('cpu_capability')}, this CPU runs "
            f"{here['cpu_capability']}"
        )
    if dtype is not None and _dtype_name(parse_dtype(dtype)) != meta["dtype"]:
        problems.append(f"package dtype is {meta['dtype']}, requested {_dtype_name(parse_dtype(dtype))}")
    if batch_size is not None and batch_size > meta["batch_size"]:
        problems.append(
            f"package static batch size is {meta['batch_size']}, requested batches of {batch_size}"
        )
    if sam is not None:
        arch = encoder_architecture(sam.image_encoder)
        if arch != meta["encoder_architecture"]:
            problems.append(
                f"package holds a {meta['model_type']} encoder, the model is {model_type_of(arch)} "
                f"(architecture {meta['encoder_architecture']} vs {arch})"
            )
        else:
            fp = weights_fingerprint(sam.image_encoder, parse_dtype(meta["dtype"]))
            if fp is not None and meta.get("weights_fingerprint") not in (None, fp):
                problems.append(
                    "package was exported from different encoder weights than the model's "
                    "(another checkpoint?)"
                )
    if sam is not None and with_decoder and meta.get("decoder"):
        dec = meta["decoder"]
        ddtype = _module_dtype(_unwrap(sam.mask_decoder))
        if decoder_architecture(sam.mask_decoder) != dec["architecture"]:
            problems.append("the model's mask decoder has another architecture than the packaged one")
        elif ddtype is not None and _dtype_name(ddtype) != meta["dtype"]:
            problems.append(f"package dtype is {meta['dtype']}, the model's mask decoder is {_dtype_name(ddtype)}")
        else:
            fp = weights_fingerprint(sam.mask_decoder, parse_dtype(meta["dtype"]))
            if fp is not None and dec.get("weights_fingerprint") not in (None, fp):
                problems.append("package was exported from different mask decoder weights than the model's")
    return problems


class AOTImageEncoder(nn.Module):
    """Runs an AOTInductor-compiled image encoder in place of ``ImageEncoderViT``.

    Batches smaller than the package's static batch are zero-padded and the output sliced;
    larger ones raise ValueError. Input is cast to the package dtype; the output has that
    dtype. The weights live inside the package (this module has no parameters), and it
    stays on the device the package was loaded on.
    """

    def __init__(self, runner, meta: Dict[str, Any], device: torch.device, path: str = ""):
        super().__init__()
        self.runner = runner
        self.metadata = meta
        self.path = path
        self.img_size = int(meta["encoder_architecture"]["img_size"])
        self.batch_size = int(meta["batch_size"])
        self.dtype = parse_dtype(meta["dtype"])
        self.device = device

    def extra_repr(self) -> str:
        return (
            f"{self.metadata['model_type']}, batch_size={self.batch_size}, dtype={self.dtype}, "
            f"device={self.device}, path={self.path!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, s, s):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"image encoder input must be (B, 3, {s}, {s}), got {shape}.")
        n = x.shape[0]
        if n > self.batch_size:
            raise ValueError(
                f"the compiled package takes at most {self.batch_size} images per call (its static "
                f"batch size), got {n}. Split the batch, or export a package with --batch-size {n}."
            )
        if x.device != self.device:
            raise ValueError(
                f"input is on {x.device}, the compiled package runs on {self.device}; move the "
                "model with the package loaded on that device (sam.to() does not move a package)."
            )
        x = x.to(self.dtype).contiguous()
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, 3, s, s))], dim=0)
        out = self.runner(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out[:n] if n < self.batch_size else out


class AOTMaskDecoder(_Proxy):
    """Runs an AOTInductor-compiled mask decoder in place of ``MaskDecoder``.

    The eager decoder stays as ``inner`` (its state-dict keys are unchanged) and runs the
    calls the package was not compiled for: more than one image embedding, no sparse
    prompt tokens (mask-only prompts) or more than ``max_prompt_tokens`` of them. More than
    ``max_prompts`` prompts run through the package in chunks.
    """

    def __init__(self, inner: nn.Module, runner, meta: Dict[str, Any], device: torch.device):
        super().__init__(inner, runner)
        self.dtype = parse_dtype(meta["dtype"])
        self.max_prompts = int(meta["decoder"]["max_prompts"])
        self.max_prompt_tokens = int(meta["decoder"]["max_prompt_tokens"])
        self.device = device

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        n, k = sparse_prompt_embeddings.shape[:2]
        if (
            image_embeddings.shape[0] != 1
            or not 1 <= k <= self.max_prompt_tokens
            or dense_prompt_embeddings.shape[0] != n
            or any(a.device != self.device for a in args)
        ):
            return self.inner(*args, multimask_output)
        # AOTInductor assumes the exported (contiguous) strides; prompt encoders hand out views.
        emb, pe, sparse, dense = (a.to(self.dtype).contiguous() for a in args)
        outs = [
            self._fn(emb, pe, s, d)
            for s, d in zip(sparse.split(self.max_prompts), dense.split(self.max_prompts))
        ]
        masks = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        iou = torch.cat([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]


def _load(path, sam, *, device=None, dtype=None, batch_size=None, with_decoder=False):
    meta = read_package_metadata(path)
    if device is None:
        device = sam.device if sam is not None else ("cuda" if meta["device_type"] == "cuda" else "cpu")
    dev = _resolve_device(device)
    if sam is not None and dtype is None:
        dtype = _module_dtype(_unwrap(sam.image_encoder))
    with_decoder = with_decoder and "decoder" in meta
    problems = package_mismatches(
        meta, device=dev, sam=sam, dtype=dtype, batch_size=batch_size, with_decoder=with_decoder
    )
    if problems:
        raise PackageMismatchError(_mismatch_message(path, meta, problems))
    if meta["gpu_name"] and dev.type == "cuda" and torch.cuda.get_device_name(dev) != meta["gpu_name"]:
        warnings.warn(
            f"package {os.fspath(path)!r} was autotuned on {meta['gpu_name']}, running on "
            f"{torch.cuda.get_device_name(dev)} (same architecture: it works, speed may differ).",
            stacklevel=3,
        )
    index = dev.index if dev.type == "cuda" and dev.index is not None else -1
    if with_decoder:
        from torch.export.pt2_archive._package import load_pt2

        runners = load_pt2(os.fspath(path), device_index=index).aoti_runners
        encoder = AOTImageEncoder(runners[ENCODER_MODEL], meta, dev, os.fspath(path))
        decoder = AOTMaskDecoder(_unwrap(sam.mask_decoder), runners[DECODER_MODEL], meta, dev)
        return encoder, decoder
    runner = torch._inductor.aoti_load_package(os.fspath(path), device_index=index)
    return AOTImageEncoder(runner, meta, dev, os.fspath(path)), None


def load_image_encoder_package(
    path: Union[str, os.PathLike],
    sam: Optional[nn.Module] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    batch_size: Optional[int] = None,
) -> AOTImageEncoder:
    """Load a package's image encoder as an :class:`AOTImageEncoder` after checking it fits.

    ``device`` defaults to ``sam.device`` (else the current GPU for a CUDA package, or the
    CPU). With ``sam`` its encoder architecture, weights and (unless ``dtype`` is given) dtype
    must match. Raises :class:`PackageMismatchError` listing every mismatch.
    """
    return _load(path, sam, device=device, dtype=dtype, batch_size=batch_size)[0]


def _mismatch_message(path, meta, problems: List[str]) -> str:
    return (
        f"compiled package {os.fspath(path)!r} does not fit: " + "; ".join(problems) + ". "
        f"Re-export it here (python scripts/export_package.py --model-type {meta['model_type']} "
        f"--batch-size N --dtype {meta['dtype']} --device {meta['device_type']} --output PATH.pt2), "
        "or pass recompile_on_mismatch=True to attach_compiled_package to compile a fitting "
        "package into the cache directory."
    )


def attach_compiled_package(
    sam: nn.Module,
    path: Union[str, os.PathLike],
    *,
    batch_size: Optional[int] = None,
    recompile_on_mismatch: bool = False,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> nn.Module:
    """Make ``sam.image_encoder`` (and ``sam.mask_decoder`` if packaged) run the package.

    Returns ``sam``. ``sam`` must be the model the package was exported from (same
    architecture, weights and dtype, on the package's device). ``batch_size`` is the largest
    batch you will encode at once (default: the package's). On any mismatch (see
    :func:`package_mismatches`) a :class:`PackageMismatchError` is raised and ``sam`` is left
    unchanged, unless ``recompile_on_mismatch=True``: then a package is re-exported from
    ``sam`` itself as it is (its dtype, device, the larger of the two batch sizes, the
    decoder if the given package had one), written to ``<cache_dir>/packages/`` (default
    ``~/.cache/segment_anything_fast``; ``path`` is left untouched), reused from there by
    later processes, and a warning names it. The eager encoder is dropped (its weights live
    in the package), so ``sam.state_dict()`` no longer holds ``image_encoder.*``.
    """
    if not isinstance(recompile_on_mismatch, bool):
        raise TypeError(f"recompile_on_mismatch must be a bool, got {recompile_on_mismatch!r}.")
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")

    def attach(p, bs):
        encoder, decoder = _load(p, sam, batch_size=bs, with_decoder=True)
        sam.image_encoder = encoder
        if decoder is not None:
            sam.mask_decoder = decoder
        return sam

    try:
        return attach(path, batch_size)
    except PackageMismatchError as e:
        if not recompile_on_mismatch:
            raise
        reason = str(e)
    meta = read_package_metadata(path)
    dtype = _module_dtype(_unwrap(sam.image_encoder)) or torch.float32
    bs = max(batch_size or 1, int(meta.get("batch_size", 1)))
    dec = meta.get("decoder")
    target = _recompiled_path(sam, dtype, bs, dec, cache_dir)
    if os.path.exists(target):
        try:
            attach(target, bs)
            warnings.warn(f"{reason} Using the package recompiled earlier: {target}", stacklevel=2)
            return sam
        except (PackageMismatchError, ValueError):
            pass  # stale entry (e.g. torch upgraded): rebuild it below
    warnings.warn(f"{reason} Recompiling a package for this model into {target} ...", stacklevel=2)
    extra = {}
    if dec:
        extra = dict(include_mask_decoder=True, max_prompts=dec["max_prompts"],
                     max_prompt_tokens=dec["max_prompt_tokens"])
    export_image_encoder(sam, target, batch_size=bs, dtype=dtype, device=sam.device, **extra)
    return attach(target, bs)


def build_sam_from_package(
    path: Union[str, os.PathLike],
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    batch_size: Optional[int] = None,
    recompile_on_mismatch: bool = False,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> nn.Module:
    """Build the official model a package was exported for and attach the package.

    Reads the model type, dtype, device kind and attention backend from the package, builds
    ``build_sam(model_type, checkpoint)`` (``checkpoint`` must be the one the package was
    exported from; it also provides the prompt encoder), casts it, moves it to the device
    (the current GPU for a CUDA package) and calls :func:`attach_compiled_package`.
    """
    from .build_sam import build_sam
    from .compile import cast_model

    meta = read_package_metadata(path)
    if meta["model_type"] not in ("vit_h", "vit_l", "vit_b"):
        raise ValueError(
            f"package {os.fspath(path)!r} holds a custom architecture; build that model with "
            "build_sam(SamConfig(...), checkpoint) and call attach_compiled_package(sam, path)."
        )
    attention = meta["attention"][0] if len(meta.get("attention") or []) == 1 else "math"
    sam = build_sam(meta["model_type"], checkpoint, attention=attention)
    cast_model(sam, parse_dtype(meta["dtype"]))
    sam.to(_resolve_device(meta["device_type"])).eval()
    return attach_compiled_package(
        sam, path, batch_size=batch_size, recompile_on_mismatch=recompile_on_mismatch,
        cache_dir=cache_dir,
    )


def _recompiled_path(sam, dtype, batch_size, decoder, cache_dir) -> str:
    root = os.path.join(os.path.expanduser(os.fspath(cache_dir or DEFAULT_CACHE_DIR)), "packages")
    os.makedirs(root, exist_ok=True)
    arch = encoder_architecture(sam.image_encoder)
    rec = device_record(sam.device)
    key = [arch, weights_fingerprint(sam.image_encoder, dtype), _dtype_name(dtype), batch_size, rec]
    if decoder:
        key += [decoder["max_prompts"], decoder["max_prompt_tokens"],
                weights_fingerprint(sam.mask_decoder, dtype)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{model_type_of(arch)}-{_dtype_name(dtype)}-b{batch_size}{'-dec' if decoder else ''}"
    return os.path.join(root, f"{name}-{rec['device_type']}-{digest}.pt2")


# ----------------------------------------------------------------------------- caches


def enable_persistent_caches(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, str]:
    """Keep ``torch.compile``'s work on disk in ``cache_dir`` for later processes.

    Default directory: ``~/.cache/segment_anything_fast`` (torch's default lives under /tmp,
    which containers and reboots wipe). Call it before the first ``torch.compile`` /
    ``build_sam_fast`` in the process. It turns on inductor's FX graph cache, the AOTAutograd
    cache, the local autotune cache and bundles Triton kernels into the FX graph cache
    entries (``torch._inductor.config`` / ``torch._functorch.config``), and points the cache
    folders there. torch reads the folders only from environment variables, so this
    function sets ``TORCHINDUCTOR_CACHE_DIR=<cache_dir>/inductor`` and
    ``TRITON_CACHE_DIR=<cache_dir>/triton`` in ``os.environ`` of this process (and so of its
    children). Returns the paths used.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir or DEFAULT_CACHE_DIR)))
    paths = {
        "root": root,
        "inductor": os.path.join(root, "inductor"),
        "triton": os.path.join(root, "triton"),
        "packages": os.path.join(root, "packages"),
    }
    for p in paths.values():
        try:
            os.makedirs(p, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create cache directory {p!r}: {e}") from None
        if not os.access(p, os.W_OK):
            raise RuntimeError(f"cache directory {p!r} is not writable; pass another cache_dir.")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = paths["inductor"]
    os.environ["TRITON_CACHE_DIR"] = paths["triton"]
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    inductor_config.bundle_triton_into_fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    from torch._inductor.utils import clear_caches

    clear_caches()  # forget cache paths memoised before this call
    return paths
