"""segment_anything_fast: a drop-in, faster Segment Anything.

``import segment_anything_fast as segment_anything`` exposes the original's public names.
Submodules are imported on first use, so ``import segment_anything_fast`` stays cheap.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "Sam": "segment_anything_fast.modeling",
    "sam_model_registry": "segment_anything_fast.build_sam",
    "build_sam": "segment_anything_fast.build_sam",
    "build_sam_vit_h": "segment_anything_fast.build_sam",
    "build_sam_vit_l": "segment_anything_fast.build_sam",
    "build_sam_vit_b": "segment_anything_fast.build_sam",
    "build_sam_demo": "segment_anything_fast.build_sam",
    "SamConfig": "segment_anything_fast.build_sam",
    "sam_model_fast_registry": "segment_anything_fast.build_sam_fast",
    "build_sam_fast": "segment_anything_fast.build_sam_fast",
    "SamPredictor": "segment_anything_fast.predictor",
    "SamAutomaticMaskGenerator": "segment_anything_fast.automatic_mask_generator",
    "ResizeLongestSide": "segment_anything_fast.utils.transforms",
}

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """Importing the submodule ``build_sam`` (or ``build_sam_fast``) would set the package
    attribute of that name to the module; as in the original package, the name stays the
    function (the submodule is still in ``sys.modules`` for ``from ... import``)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segment_anything_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
