"""Builders for SAM models: named official configurations, small custom ones, checkpoints."""
import os
import pickle
import re
from dataclasses import dataclass, fields
from functools import partial
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .attention import check_backend
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model. The official variants are entries of ``SAM_CONFIGS``."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: Tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(
            self, "encoder_global_attn_indexes", tuple(int(i) for i in self.encoder_global_attn_indexes)
        )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("encoder_global_attn_indexes", "mlp_ratio"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"SamConfig.{f.name} must be a positive int, got {v!r}.")
        if not self.mlp_ratio > 0:
            raise ValueError(f"SamConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}.")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"encoder_num_heads ({self.encoder_num_heads})."
            )
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"encoder_global_attn_indexes {bad} are outside 0..{self.encoder_depth - 1} "
                f"(encoder_depth={self.encoder_depth})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )
        if self.prompt_embed_dim % 8 or self.prompt_embed_dim % (2 * self.decoder_num_heads):
            raise ValueError(
                f"prompt_embed_dim ({self.prompt_embed_dim}) must be divisible by 8 and by "
                f"2 * decoder_num_heads ({2 * self.decoder_num_heads})."
            )
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans ({self.mask_in_chans}) must be divisible by 4.")

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_CONFIGS: Dict[str, SamConfig] = {
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    # Test-sized model: 128 px input -> 8x8 tokens; window 3 does not divide 8, so windowed
    # layers pad. Not an official checkpoint (absent from sam_model_registry).
    "tiny": SamConfig(
        encoder_embed_dim=32, encoder_depth=4, encoder_num_heads=2,
        encoder_global_attn_indexes=(1, 3), image_size=128, patch_size=16, window_size=3,
        prompt_embed_dim=32, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=64,
        decoder_num_heads=2, iou_head_depth=3, iou_head_hidden_dim=32,
    ),
    # The demo model of scripts/train_demo.py (3.8M parameters): 256 px input -> 16x16 tokens,
    # windows of 8, two global blocks; fast enough for CPU inference. Its trained weights are
    # bundled (DEMO_CHECKPOINT, sam_model_registry["demo"]).
    "demo": SamConfig(
        encoder_embed_dim=192, encoder_depth=6, encoder_num_heads=6,
        encoder_global_attn_indexes=(2, 5), image_size=256, patch_size=16, window_size=8,
        prompt_embed_dim=128, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=512,
        decoder_num_heads=4, iou_head_depth=3, iou_head_hidden_dim=128,
    ),
}
OFFICIAL_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
AUTO = "auto"  # build_sam config: the checkpoint's stored config, else its official type

# Weights of SAM_CONFIGS["demo"] trained by scripts/train_demo.py on generated scenes, shipped
# with the package (package_data). Not an official SAM: it only knows synthetic shapes.
DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "sam_demo.pt")
BUNDLED_CHECKPOINTS = {"demo": DEMO_CHECKPOINT}
# SamAutomaticMaskGenerator settings that suit the demo model: its masks score lower than
# SAM's, so the official thresholds (0.88 / 0.95) keep none of them; 16x16 points suffice at
# its 256 px input. scripts/amg.py uses them for --checkpoint demo unless the flags are given.
DEMO_AMG_SETTINGS = {"points_per_side": 16, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.8}

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _resolve_config(config: Union[str, SamConfig]) -> SamConfig:
    if isinstance(config, SamConfig):
        return config
    if isinstance(config, str):
        if config == "default":
            config = "vit_h"
        if config in SAM_CONFIGS:
            return SAM_CONFIGS[config]
        raise ValueError(
            f"Unknown SAM model type {config!r}; choose one of {sorted(SAM_CONFIGS)}, "
            f"{AUTO!r} (with a checkpoint) or pass a SamConfig."
        )
    raise TypeError(f"config must be a model type name or a SamConfig, got {type(config).__name__}.")


def _config_name(cfg: SamConfig) -> str:
    for name, c in SAM_CONFIGS.items():
        if c == cfg:
            return name
    return "custom SamConfig"


def _looks_like_path(s: str) -> bool:
    return s.endswith((".pth", ".pt", ".bin", ".ckpt")) or os.sep in s or os.path.exists(s)


def build_sam(
    config: Union[str, SamConfig] = "vit_h",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    attention: str = "math",
) -> Sam:
    """Build a SAM model in eval mode.

    Args:
        config: "vit_h" / "vit_l" / "vit_b" / "default", "tiny" (test-sized), "demo" (the
            bundled demo model's architecture; random weights like every name here: load its
            weights with ``build_sam_demo()`` or ``checkpoint=DEMO_CHECKPOINT``), a
            :class:`SamConfig` (small models), or "auto": the architecture stored in the
            checkpoint's "config" entry (see :func:`checkpoint_config`), else the official type
            its weights' shapes match.
            For compatibility with the original ``build_sam(checkpoint)``, a checkpoint path
            given here (with ``checkpoint`` unset) builds vit_h from that file.
        checkpoint: optional path to a state-dict file (official SAM checkpoints load as is).
            A file that stores its config refuses a different explicit ``config``.
        attention: image-encoder attention backend (see ``attention.available_backends()``).
    """
    if (
        isinstance(config, (str, os.PathLike))
        and checkpoint is None
        and not (isinstance(config, str) and (config in SAM_CONFIGS or config in ("default", AUTO)))
        and _looks_like_path(os.fspath(config))
    ):
        config, checkpoint = "vit_h", config
    if config == AUTO and checkpoint is None:
        raise ValueError(
            "config='auto' takes the architecture from the checkpoint file; pass checkpoint= "
            "or a model type name / SamConfig."
        )
    cfg = None if config == AUTO else _resolve_config(config)
    check_backend(attention)
    if checkpoint is None:
        return _construct(cfg, attention).eval()
    # Read and check the file first (fast, clear errors), then skip the random init: build
    # on the meta device and adopt the checkpoint's tensors.
    source = os.fspath(checkpoint)
    obj = _read_checkpoint(source)
    state_dict = _unwrap_state_dict(obj, source)
    stored = _stored_config(obj, source)
    if cfg is None:
        cfg = stored or _official_config(state_dict, source)
    elif stored is not None and stored != cfg:
        diff = [f"{f.name}={getattr(stored, f.name)!r} (asked {getattr(cfg, f.name)!r})"
                for f in fields(SamConfig) if getattr(stored, f.name) != getattr(cfg, f.name)]
        raise ValueError(
            f"The checkpoint {source!r} stores its architecture, which is not the requested "
            f"{_config_name(cfg)}: {', '.join(diff[:4])}"
            f"{f' and {len(diff) - 4} more' if len(diff) > 4 else ''}. "
            "Build it with config='auto' (command line: leave out --model-type, or pass "
            "--model-type auto)."
        )
    with torch.device("meta"):
        sam = _construct(cfg, attention)
    check_state_dict(sam, state_dict, _config_name(cfg), source=source)
    state_dict = {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()
    }
    sam.load_state_dict(state_dict, strict=True, assign=True)
    for m in sam.modules():
        if hasattr(m, "init_nonpersistent_buffers"):
            m.init_nonpersistent_buffers(torch.device("cpu"))
    return sam.eval()


def _official_config(state_dict, source: str) -> SamConfig:
    """config='auto' for a file without a stored config: the official type its shapes match."""
    detected = detect_model_type(state_dict)
    if detected is None or detected in OFFICIAL_MODEL_TYPES:
        return SAM_CONFIGS[detected or "vit_h"]  # not SAM at all: check_state_dict says so
    raise ValueError(
        f"The checkpoint {source!r} has no 'config' entry and its weights match no official model "
        f"(they look like {detected}); build it with its SamConfig (command line: --config-json "
        "or --model-type tiny)."
    )


def _construct(cfg: SamConfig, attention: str) -> Sam:
    emb = cfg.image_embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth,
            num_heads=cfg.encoder_num_heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            attention=attention,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )


def build_sam_vit_h(checkpoint=None, *, attention: str = "math") -> Sam:
    return build_sam("vit_h", checkpoint, attention=attention)


def build_sam_vit_l(checkpoint=None, *, attention: str = "math") -> Sam:
    return build_sam("vit_l", checkpoint, attention=attention)


def build_sam_vit_b(checkpoint=None, *, attention: str = "math") -> Sam:
    return build_sam("vit_b", checkpoint, attention=attention)


def build_sam_demo(checkpoint=None, *, attention: str = "math") -> Sam:
    """The small demo model (``SAM_CONFIGS["demo"]``) with the bundled trained weights, or
    those of ``checkpoint`` (e.g. your own ``scripts/train_demo.py`` run). Not an official SAM:
    it segments generated shapes like those of ``data/demo_scenes.py``."""
    return build_sam("demo", demo_weights(checkpoint), attention=attention)


def demo_weights(checkpoint=None) -> str:
    """The weights file of the demo builders: ``checkpoint``, by default the bundled one."""
    return resolve_checkpoint("demo" if checkpoint is None else checkpoint)


sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "demo": build_sam_demo,
}


def resolve_checkpoint(path_or_name):
    """A checkpoint argument as a file path: a name of ``BUNDLED_CHECKPOINTS`` ("demo") is
    the file shipped with the package; anything else (None included) is returned unchanged
    (a local file literally named "demo" is reached as "./demo").

    Raises FileNotFoundError, saying how to fix it, when the bundled file is missing from
    the install.
    """
    if not isinstance(path_or_name, str) or path_or_name not in BUNDLED_CHECKPOINTS:
        return path_or_name
    path = BUNDLED_CHECKPOINTS[path_or_name]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The bundled {path_or_name!r} checkpoint is missing: {path!r} does not exist. "
            "The package was installed without its assets; reinstall it from the repository "
            "(pip install -e .) or pass the path of a checkpoint file instead."
        )
    return path


# ----------------------------------------------------------------------------- checkpoints

_NOT_SAM = "{path} is not a SAM checkpoint state_dict"


def load_state_dict_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``; raise clear errors.

    Accepts a bare state dict or one wrapped as ``{"model": sd}`` / ``{"state_dict": sd}``
    (a ``module.`` prefix on every key, as written by DataParallel, is removed).
    """
    path = os.fspath(path)
    return _unwrap_state_dict(_read_checkpoint(path), path)


def checkpoint_config(path: Union[str, os.PathLike]) -> Optional[SamConfig]:
    """The :class:`SamConfig` stored in a checkpoint's "config" entry (as written by
    ``scripts/train_demo.py``: ``{"model": sd, "config": {field: value}}``), or None when the
    file has none (official checkpoints). The tensors are memory-mapped, not read, when the
    file allows it. Raises ValueError for an entry that is not a valid SamConfig."""
    path = os.fspath(path)
    return _stored_config(_read_checkpoint(path, mmap=True), path)


def _stored_config(obj, path: str) -> Optional[SamConfig]:
    if not isinstance(obj, Mapping) or "config" not in obj:
        return None
    c = obj["config"]
    try:
        if not isinstance(c, Mapping):
            raise TypeError(f"it is a {type(c).__name__}, expected a dict of SamConfig fields")
        return SamConfig(**c)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"The checkpoint {path!r} has a 'config' entry that is not a valid SamConfig: {e}"
        ) from None


def _read_checkpoint(path: str, mmap: bool = False):
    """The object in ``path`` (torch.load, weights_only); ``mmap`` maps the tensors lazily
    (files in the zip format; older ones are read whole)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path!r}. Download an official checkpoint "
            "(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth) or fix the path."
        )
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass the checkpoint file itself.")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap or None)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):  # mmap needs the zip format
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            raise ValueError(
                f"{_NOT_SAM.format(path=repr(path))}: it contains Python objects other than "
                "tensors, which are refused because loading them could run code "
                "(torch.load(weights_only=True)). Re-save it with "
                "torch.save(model.state_dict(), path) from a trusted environment."
            ) from None
        raise ValueError(
            f"{_NOT_SAM.format(path=repr(path))}: the file could not be unpickled ({msg.splitlines()[0]}). "
            "Is it truncated or a different file type?"
        ) from None
    except Exception as e:  # corrupt data makes the unpickler fail in many ways
        first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ValueError(
            f"{_NOT_SAM.format(path=repr(path))}: torch.load could not read it ({first}). "
            "The file is probably truncated (re-download it) or not a PyTorch checkpoint."
        ) from None
    return obj


def _unwrap_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{_NOT_SAM.format(path=repr(path))}: it holds a {type(obj).__name__}"
            f"{' (empty)' if isinstance(obj, Mapping) else ''}, expected a dict of parameter "
            "names to tensors."
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{_NOT_SAM.format(path=repr(path))}: entries {[str(b) for b in bad[:5]]} are not "
            "named tensors."
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Guess the architecture of a SAM state dict from its shapes.

    Returns "vit_h"/"vit_l"/"vit_b", a description like "custom (embed dim 32, 4 blocks)",
    or None when it does not look like a SAM image encoder at all.
    """
    pos = state_dict.get("image_encoder.pos_embed")
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    width = None
    if isinstance(pos, torch.Tensor) and pos.dim() == 4:
        width = int(pos.shape[-1])
    elif isinstance(patch, torch.Tensor) and patch.dim() == 4:
        width = int(patch.shape[0])
    if width is None:
        return None
    blocks = {
        int(m.group(1))
        for k in state_dict
        for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)]
        if m
    }
    depth = len(blocks)
    for name in OFFICIAL_MODEL_TYPES:
        cfg = SAM_CONFIGS[name]
        if cfg.encoder_embed_dim == width and cfg.encoder_depth == depth:
            return name
    return f"custom (embed dim {width}, {depth} blocks)"


def _shape_summary(state_dict, detected: str) -> str:
    if detected not in SAM_CONFIGS:
        return ""
    cfg = SAM_CONFIGS[detected]
    return f" (embed dim {cfg.encoder_embed_dim}, {cfg.encoder_depth} blocks)"


def _fmt(names, n=5) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(
    model: Sam, state_dict: Mapping[str, torch.Tensor], model_type: str, source: str = ""
) -> None:
    """Raise ValueError unless ``state_dict`` has exactly ``model``'s keys and shapes.

    The message names the model type the checkpoint looks like and the first offending keys.
    Works on a model built on the meta device.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape_bad = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shape_bad):
        return
    detected = detect_model_type(state_dict)
    what = f"The checkpoint {source!r}" if source else "The checkpoint"
    if detected is None:
        raise ValueError(
            f"{what} is not a SAM checkpoint state_dict (no image_encoder weights found). "
            f"Missing keys: {_fmt(missing)}; unexpected keys: {_fmt(unexpected)}."
        )
    parts = []
    if detected != model_type:
        hint = (
            f" Build it with sam_model_registry[{detected!r}](checkpoint=...)."
            if detected in OFFICIAL_MODEL_TYPES
            else " Build it with a matching SamConfig."
        )
        parts.append(
            f"{what} looks like {detected}{_shape_summary(state_dict, detected)}, "
            f"but the model being built is {model_type}.{hint}"
        )
    else:
        parts.append(f"{what} does not match the {model_type} model.")
    if shape_bad:
        parts.append(f"{len(shape_bad)} shape mismatches (checkpoint vs model): {_fmt(shape_bad, 3)}.")
    if missing:
        parts.append(f"{len(missing)} missing keys: {_fmt(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_fmt(unexpected)}.")
    raise ValueError(" ".join(parts))
