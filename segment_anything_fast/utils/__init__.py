"""Image/prompt transforms and automatic-mask-generation helpers."""
from .transforms import ResizeLongestSide

__all__ = ["ResizeLongestSide"]
