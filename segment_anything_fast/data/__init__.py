"""Datasets used by the experiments and tests (a generated COCO-format dataset)."""
from .synthetic_coco import CATEGORIES, Scene, make_scene, write_coco_dataset

__all__ = ["CATEGORIES", "Scene", "make_scene", "write_coco_dataset"]
